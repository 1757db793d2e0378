//! Config files of the daemons (`virtman agent`, `virtman coordinator`).
//!
//! ```text
//!   clap defaults ─► FILE (--config, else /etc/virtman/NAME.toml if present)
//!                ─► flags and env given on the command line ─► effective options
//! ```
//!
//! Each daemon's options are one struct that derives both clap's `Args` and
//! serde: a key in the file is the long flag's name with `_` for `-`
//! (`cache_size = "10G"` is `--cache-size 10G`), and a key left out has the
//! flag's default. Which flags the command line gave is clap's
//! `ArgMatches::value_source`; those replace the file's keys. The file is
//! read with `deny_unknown_fields`, and an error names the file, the line
//! and the key (from the span `toml` reports). `--print-config` writes the
//! effective options back as TOML, each key with its flag's help as a
//! comment; `--example-config` writes the same with the keys at their
//! defaults commented out (`dist/agent.toml`, `dist/coordinator.toml`).

pub mod fields;
mod render;

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use render::render;

/// Where the daemons look for their config file when `--config` is not given.
pub const CONFIG_DIR: &str = "/etc/virtman";

/// Replaces [`CONFIG_DIR`] (tests, and hosts that keep configs elsewhere).
pub const CONFIG_DIR_ENV: &str = "VIRTMAN_CONFIG_DIR";

/// The config file options a daemon takes besides its own.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Read options from this TOML file: a key is a long option's name with
    /// `_` for `-` (`cache_size = "10G"`); options given on the command line
    /// override it. Default: /etc/virtman/agent.toml (coordinator.toml for
    /// the coordinator), when it exists ($VIRTMAN_CONFIG_DIR replaces
    /// /etc/virtman).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (defaults, then the file, then the
    /// command line) as TOML, and exit. The output is a config file.
    #[arg(long)]
    pub print_config: bool,

    /// Print a commented example config file (every option with its help;
    /// those at their defaults commented out) from the command line's
    /// options alone, and exit.
    #[arg(long, conflicts_with = "print_config")]
    pub example_config: bool,
}

/// A daemon's options that a config file can hold.
pub trait ConfigFile: clap::Args + FromArgMatches + Serialize + DeserializeOwned {
    /// The file's name in [`CONFIG_DIR`], e.g. `agent.toml`.
    const FILE_NAME: &'static str;
}

/// The options as clap has them with no flag given: the file's defaults.
pub fn clap_defaults<T: clap::Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(std::iter::empty::<&str>())
        .expect("no arguments parse: every option has a default or is optional");
    T::from_arg_matches(&matches).expect("the defaults build the options")
}

/// The options to run with after the file and the command line, or `None`
/// when `--print-config` or `--example-config` printed them (nothing to
/// run). `subcommand` is this daemon's (`agent`), to tell which flags the
/// command line gave.
pub fn options_or_print<T: ConfigFile>(
    cli: T,
    args: &ConfigArgs,
    subcommand: &str,
) -> anyhow::Result<Option<T>> {
    if args.example_config {
        print!("{}", render(&cli, true)?);
        return Ok(None);
    }
    let matches = subcommand_matches(subcommand)?;
    let (options, _) = resolve(cli, &matches, args.config.as_deref())?;
    if args.print_config {
        print!("{}", render(&options, false)?);
        return Ok(None);
    }
    Ok(Some(options))
}

/// The options from the file (`explicit`, else the default path when it
/// exists), overridden by what `matches` says the command line gave; and
/// the file read, if any.
pub fn resolve<T: ConfigFile>(
    cli: T,
    matches: &ArgMatches,
    explicit: Option<&Path>,
) -> anyhow::Result<(T, Option<PathBuf>)> {
    let path = config_path(explicit, &default_dir(), T::FILE_NAME)?;
    let file = match &path {
        Some(p) => Some(load::<T>(p)?),
        None => None,
    };
    Ok((effective(cli, matches, file)?, path))
}

/// The file to read: `explicit` (which must exist), else `dir/name` when it
/// exists, else none.
pub fn config_path(
    explicit: Option<&Path>,
    dir: &Path,
    name: &str,
) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!(
                "config file {} does not exist (or is not a file)",
                p.display()
            );
        }
        return Ok(Some(p.to_owned()));
    }
    let p = dir.join(name);
    Ok(p.is_file().then_some(p))
}

fn default_dir() -> PathBuf {
    std::env::var_os(CONFIG_DIR_ENV).map_or_else(|| PathBuf::from(CONFIG_DIR), PathBuf::from)
}

/// The command line's matches of `subcommand`, parsed again from the
/// process's arguments (the derive structs do not keep where a value came
/// from).
pub fn subcommand_matches(subcommand: &str) -> anyhow::Result<ArgMatches> {
    use clap::CommandFactory;
    let matches = crate::Cli::command()
        .try_get_matches_from(std::env::args_os())
        .context("parsing the command line again")?;
    matches
        .subcommand_matches(subcommand)
        .cloned()
        .ok_or_else(|| anyhow!("the command line has no `{subcommand}` subcommand"))
}

/// Reads a config file; an unknown key, a value of the wrong type or out of
/// range is an error naming the file, line and key.
pub fn load<T: ConfigFile>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    parse::<T>(&text).map_err(|e| anyhow!("{}:{e}", path.display()))
}

/// Parses a config file's text; the error starts with the line (`LINE: key
/// `K`: what is wrong`).
pub fn parse<T: ConfigFile>(text: &str) -> Result<T, String> {
    toml::from_str::<T>(text).map_err(|e| describe(text, &e))
}

fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    let Some(span) = e.span() else {
        return format!(" {message}");
    };
    let at = span.start.min(text.len());
    let line = text[..at].matches('\n').count() + 1;
    match key_at(text, at) {
        Some(key) => format!("{line}: key `{key}`: {message}"),
        None => format!("{line}: {message}"),
    }
}

/// The key of the `key = value` line holding byte `at`, or of the nearest
/// one above it (a value spread over lines).
fn key_at(text: &str, at: usize) -> Option<String> {
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    text[..end].lines().rev().find_map(|line| {
        let (key, _) = line.split_once('=')?;
        let key = key.trim();
        let key = match key.strip_prefix('"') {
            Some(quoted) => quoted.strip_suffix('"')?,
            None => key,
        };
        let bare = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
        bare.then(|| key.to_owned())
    })
}

/// `file`'s options with every option the command line (or its environment
/// variable) gave taken from `cli` instead.
pub fn effective<T: ConfigFile>(
    cli: T,
    matches: &ArgMatches,
    file: Option<T>,
) -> anyhow::Result<T> {
    let Some(file) = file else {
        return Ok(cli);
    };
    let mut merged = toml::Table::try_from(&file).context("writing the file's options")?;
    let given = toml::Table::try_from(&cli).context("writing the command line's options")?;
    let cmd = T::augment_args(clap::Command::new("options"));
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let from_command_line = matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if from_command_line {
            match given.get(id) {
                Some(v) => merged.insert(id.to_owned(), v.clone()),
                None => merged.remove(id),
            };
        }
    }
    merged
        .try_into()
        .context("combining the config file with the command line")
}

#[cfg(test)]
mod tests;
