//! `virtman image import/ls/verify` as a user runs them.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn virtman(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_virtman"))
        .args(args)
        .env("VIRTMAN_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn import_ls_verify_and_detect_damage() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let (ok, out) = virtman(&[
        "image",
        "import",
        src.to_str().unwrap(),
        "--name",
        "disk",
        "--chunk-size",
        "64K",
        "--store",
        store,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("imported disk: 300000 bytes, 5 chunks of 64 KiB"),
        "{out}"
    );
    let (ok, out) = virtman(&["image", "ls", "--store", store]);
    assert!(
        ok && out.contains("disk") && out.contains("300000"),
        "{out}"
    );
    let (ok, out) = virtman(&["image", "verify", "disk", "--store", store]);
    assert!(ok && out.contains("all 5 chunks match"), "{out}");
    // Same name again: refused.
    let (ok, out) = virtman(&[
        "image",
        "import",
        src.to_str().unwrap(),
        "--name",
        "disk",
        "--store",
        store,
    ]);
    assert!(!ok && out.contains("exists"), "{out}");
    // Bad chunk size: refused.
    let (ok, out) = virtman(&[
        "image",
        "import",
        src.to_str().unwrap(),
        "--name",
        "d2",
        "--chunk-size",
        "3000",
        "--store",
        store,
    ]);
    assert!(!ok && out.contains("chunk size"), "{out}");
    // Damage chunk 2: verify names it and fails.
    let raw = dir.path().join("store/disk/image.raw");
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes[2 * 65536 + 10] ^= 0xff;
    std::fs::write(&raw, &bytes).unwrap();
    let (ok, out) = virtman(&["image", "verify", "disk", "--store", store]);
    assert!(
        !ok && out.contains("1 of 5 chunks") && out.contains(": 2"),
        "{out}"
    );
    let (ok, out) = virtman(&["image", "verify", "nope", "--store", store]);
    assert!(!ok && out.contains("no image"), "{out}");
}

#[test]
fn a_boot_profile_is_stored_from_a_trace_and_bad_traces_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    std::fs::write(&src, vec![7u8; 4 << 16]).unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let (ok, out) = virtman(&[
        "image",
        "import",
        src.to_str().unwrap(),
        "--name",
        "disk",
        "--chunk-size",
        "64K",
        "--store",
        store,
    ]);
    assert!(ok, "{out}");
    let trace = dir.path().join("boot.trace");
    let profile = dir.path().join("store/disk/profile");
    let write = |text: &str| std::fs::write(&trace, text).unwrap();
    let set = || {
        virtman(&[
            "image",
            "profile",
            "disk",
            "--trace",
            trace.to_str().unwrap(),
            "--store",
            store,
        ])
    };
    // Three chunks touched (the second read spans chunks 0 and 1).
    write("virtman-trace 1\nimage-size 262144\n0 196608 4096\n10 65000 1000\n20 0 512\n");
    let (ok, out) = set();
    assert!(ok, "{out}");
    assert!(out.contains("boot profile of 3 chunks (192 KiB)"), "{out}");
    assert!(profile.exists());
    // Refused, and the stored profile kept: a trace of a larger image, a
    // malformed trace, an unknown image.
    write("virtman-trace 1\nimage-size 1048576\n0 0 4096\n");
    let (ok, out) = set();
    assert!(!ok && out.contains("larger than \"disk\""), "{out}");
    write("virtman-trace 1\nimage-size 262144\n0 zero 4096\n");
    let (ok, out) = set();
    assert!(!ok && out.contains("boot.trace"), "{out}");
    assert!(profile.exists());
    let (ok, out) = virtman(&["image", "profile", "nope", "--trace", "x", "--store", store]);
    assert!(!ok && out.contains("nope"), "{out}");
    // Removed, twice.
    let (ok, out) = virtman(&["image", "profile", "disk", "--remove", "--store", store]);
    assert!(ok && out.contains("boot profile removed"), "{out}");
    assert!(!profile.exists());
    let (ok, out) = virtman(&["image", "profile", "disk", "--remove", "--store", store]);
    assert!(ok && out.contains("has no boot profile"), "{out}");
}
