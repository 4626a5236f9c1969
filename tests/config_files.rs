//! Every file under tests/configs/valid loads; every file under tests/configs/invalid
//! fails naming the file, the line and the key its first line announces, with exit 78.

mod common;

use std::path::Path;

use common::BIN;
use watchalong::base::config::Config;

fn files(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/configs")
        .join(dir);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no config files in {}", dir.display());
    v
}

#[test]
fn valid_config_files_load() {
    for f in files("valid") {
        let o = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&f)
            .arg("check")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn invalid_config_files_name_file_line_and_key_and_exit_78() {
    for f in files("invalid") {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("# expect: ")
            .expect("an expect line");
        let mut line = "";
        let mut key = "";
        for part in expect.split_whitespace() {
            match part.split_once('=') {
                Some(("line", v)) => line = v,
                Some(("key", v)) => key = v,
                _ => panic!("bad expect line in {}", f.display()),
            }
        }
        for cmd in ["check", "daemon"] {
            let o = std::process::Command::new(BIN)
                .arg("--config")
                .arg(&f)
                .arg(cmd)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(78), "{} ({cmd}): {err}", f.display());
            let want = format!("{}:{line}: `{key}`", f.display());
            assert!(
                err.contains(&want),
                "{} ({cmd}): wanted {want:?} in {err:?}",
                f.display()
            );
            assert_eq!(err.trim().lines().count(), 1, "{err}");
            // ...and says what would be right.
            let told = err.split_once(&want).map(|(_, rest)| rest).unwrap_or("");
            assert!(
                told.contains("expected"),
                "{} ({cmd}) does not say what is expected: {err:?}",
                f.display()
            );
        }
    }
}

#[test]
fn the_commented_example_config_is_valid_and_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/watchalong.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let c = Config::parse(&path, &text).unwrap();
    let mut d = Config::default();
    d.node.name = c.node.name.clone();
    assert_eq!(c, d, "the example should show the built-in defaults");
}

#[test]
fn a_missing_named_config_file_exits_78() {
    let o = std::process::Command::new(BIN)
        .args(["--config", "/nonexistent/w.toml", "check"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/w.toml"));
}
