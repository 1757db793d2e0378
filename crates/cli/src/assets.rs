//! `virtman generate-assets DIR` (hidden): the man pages and shell
//! completions the Debian package ships, generated from the CLI's own
//! definition so they cannot drift from `--help`.
//!
//! ```text
//!   DIR/man/virtman.1, virtman-agent.1, virtman-agent-set.1, ...   (one per command)
//!   DIR/completions/virtman.bash, _virtman (zsh), virtman.fish
//! ```
//!
//! `dist/build-deb.sh` runs it before `cargo deb`, whose assets must exist.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;

/// Arguments of `virtman generate-assets`.
#[derive(Debug, Args)]
pub struct AssetsArgs {
    /// Directory to write `man/` and `completions/` into (created if missing).
    pub dir: PathBuf,
}

/// Writes every man page and completion script for `cmd` under `args.dir`.
pub fn run(args: &AssetsArgs, cmd: clap::Command) -> anyhow::Result<()> {
    let man = args.dir.join("man");
    let completions = args.dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = cmd;
    cmd.build();
    let mut pages = 0;
    write_pages(&cmd, &man, &mut pages)?;
    for (shell, file) in [
        (Shell::Bash, "virtman.bash"),
        (Shell::Zsh, "_virtman"),
        (Shell::Fish, "virtman.fish"),
    ] {
        let path = completions.join(file);
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "virtman", &mut out);
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "wrote {pages} man pages to {} and bash, zsh and fish completions to {}",
        man.display(),
        completions.display()
    );
    Ok(())
}

/// Writes `cmd`'s page (named after its full name: `virtman-agent-set`), then
/// its visible subcommands' pages.
fn write_pages(cmd: &clap::Command, dir: &Path, pages: &mut usize) -> anyhow::Result<()> {
    let name = cmd.get_name().to_owned();
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .with_context(|| format!("rendering {name}.1"))?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    *pages += 1;
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        // The page's title and NAME section use the full name, as `man
        // virtman-agent` looks it up.
        // clap takes `&'static str` names (its `string` feature is off):
        // this one-shot command leaks a few short strings.
        let full: &'static str = Box::leak(format!("{name}-{}", sub.get_name()).into_boxed_str());
        let parent_bin = cmd.get_bin_name().unwrap_or(&name);
        let bin: &'static str =
            Box::leak(format!("{parent_bin} {}", sub.get_name()).into_boxed_str());
        let sub = sub.clone().name(full).bin_name(bin);
        write_pages(&sub, dir, pages)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_command_and_three_completions() {
        let cmd = clap::Command::new("virtman")
            .version("1.0")
            .about("top")
            .subcommand(
                clap::Command::new("agent")
                    .about("the agent")
                    .arg(clap::Arg::new("cache-size").long("cache-size"))
                    .subcommand(clap::Command::new("set").about("set caps")),
            )
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().unwrap();
        run(
            &AssetsArgs {
                dir: dir.path().to_owned(),
            },
            cmd,
        )
        .unwrap();
        let mut pages: Vec<String> = std::fs::read_dir(dir.path().join("man"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        assert_eq!(
            pages,
            ["virtman-agent-set.1", "virtman-agent.1", "virtman.1"]
        );
        let agent = std::fs::read_to_string(dir.path().join("man/virtman-agent.1")).unwrap();
        assert!(agent.contains(".TH virtman-agent"), "{agent}");
        assert!(agent.contains("cache\\-size"), "{agent}");
        for f in ["virtman.bash", "_virtman", "virtman.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(f)).unwrap();
            assert!(text.contains("cache-size"), "{f}: {text}");
        }
    }
}
