//! Every saved input of `regressions/TARGET/` (crashes found once, and seeds
//! of each format) runs through its target: none may panic.

use std::path::Path;

#[test]
fn every_saved_input_runs_through_its_target_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut ran = 0;
    for (name, target) in virtman_fuzz::TARGETS {
        let dir = root.join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e.expect("a directory entry").path();
            let data = std::fs::read(&path).expect("a saved input");
            target(&data);
            ran += 1;
        }
    }
    assert!(ran > 0, "no saved inputs under {}", root.display());
}
