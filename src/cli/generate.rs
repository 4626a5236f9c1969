//! `watchalong generate man|completions DIR`: the man pages (clap_mangen) and the bash,
//! zsh and fish completions (clap_complete) made from the same clap definitions the
//! command parses with, so a package never ships pages that disagree with the binary.
//! It writes files into the folder it is given; it must not need a configuration or a
//! daemon (a package build has neither).

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::args::{Cli, Generated};

/// Writes what `what` names into `dir` (created if missing); returns the files written.
pub fn generate(what: Generated, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    match what {
        Generated::Man => man_pages(&cmd, dir),
        Generated::Completions => completions(&mut cmd, dir),
    }
}

/// `watchalong.1`, then `watchalong-CMD.1` for every visible command (and its own
/// commands, `watchalong-sync-release.1`).
fn man_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    let mut todo = vec![(cmd.get_name().to_string(), cmd.clone())];
    while let Some((name, c)) = todo.pop() {
        // clap's own `help` command repeats what each page says.
        for sub in c
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            let sub_name = format!("{name}-{}", sub.get_name());
            todo.push((sub_name.clone(), sub.clone().name(sub_name)));
        }
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(c.clone().name(name.clone()))
            .render(&mut out)
            .with_context(|| format!("cannot render the man page of {name}"))?;
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

fn completions(cmd: &mut clap::Command, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use clap_complete::Shell;
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, cmd, &name, dir).with_context(|| {
            format!(
                "cannot write the {shell} completions into {}",
                dir.display()
            )
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_visible_command_and_completions_every_shell() {
        let dir = tempfile::tempdir().unwrap();
        let pages = generate(Generated::Man, dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "watchalong.1",
            "watchalong-get.1",
            "watchalong-mount.1",
            "watchalong-sync-release.1",
        ] {
            assert!(
                names.contains(&want.to_string()),
                "{want} missing from {names:?}"
            );
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("generate") || n.contains("help")),
            "the hidden command or clap's help got a page: {names:?}"
        );
        let get = std::fs::read_to_string(dir.path().join("watchalong-get.1")).unwrap();
        assert!(
            get.contains(".TH") && get.contains("watchalong\\-get"),
            "{get}"
        );

        let shells = tempfile::tempdir().unwrap();
        let files = generate(Generated::Completions, shells.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["watchalong.bash", "_watchalong", "watchalong.fish"]);
        let bash = std::fs::read_to_string(shells.path().join("watchalong.bash")).unwrap();
        assert!(
            bash.contains("mount") && bash.contains("complete"),
            "{bash}"
        );
    }
}
