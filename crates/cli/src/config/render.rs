//! Writing options as a config file: each key with its flag's help as a
//! comment, in the order `--help` lists them.

use std::fmt::Write as _;

use anyhow::Context;

use super::{ConfigFile, clap_defaults};

/// Width of the help comments.
const WIDTH: usize = 76;

/// `value` as a TOML config file. Options without a value (an optional
/// flag not given) are written commented out with a placeholder; with
/// `example`, so are those at their default, so that a file installed from
/// it follows the defaults of later versions.
pub fn render<T: ConfigFile>(value: &T, example: bool) -> anyhow::Result<String> {
    let table = toml::Table::try_from(value).context("writing the options as TOML")?;
    let defaults = toml::Table::try_from(clap_defaults::<T>()).context("writing the defaults")?;
    let cmd = T::augment_args(clap::Command::new("options"));
    let mut out = format!(
        "# virtman {}. A key is a long option's name with `_` for `-`; a key\n\
         # left out (or commented out) has the option's default. Options given\n\
         # on the command line override this file.\n",
        T::FILE_NAME
    );
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let current = table.get(id);
        let default = defaults.get(id);
        if arg.is_hide_set() && current == default {
            continue;
        }
        out.push('\n');
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        for line in wrap(&help) {
            let _ = writeln!(out, "#{}{line}", if line.is_empty() { "" } else { " " });
        }
        match current {
            Some(v) if example && current == default => {
                let _ = writeln!(out, "# {id} = {v}");
            }
            Some(v) => {
                let _ = writeln!(out, "{id} = {v}");
            }
            None => {
                let name = arg
                    .get_value_names()
                    .and_then(|n| n.first())
                    .map_or_else(|| "VALUE".to_owned(), ToString::to_string);
                let _ = writeln!(out, "# {id} = {name:?}");
            }
        }
    }
    Ok(out)
}

/// `text`'s paragraphs wrapped at [`WIDTH`], an empty line between them.
fn wrap(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for (i, para) in text.split("\n\n").enumerate() {
        if i > 0 {
            lines.push(String::new());
        }
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > WIDTH {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn help_is_wrapped_by_words_and_paragraphs() {
        let text = format!("{}\n\nsecond", "word ".repeat(30));
        let lines = wrap(&text);
        assert!(lines.iter().all(|l| l.len() <= super::WIDTH), "{lines:?}");
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[2], "");
        assert_eq!(lines[3], "second");
    }
}
