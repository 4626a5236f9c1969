//! Replays every input the fuzzers kept (`fuzz/corpus/<target>/`, the minimised corpus,
//! and `fuzz/crashes/<target>/`, each input that once crashed a decoder) through the same
//! target functions the fuzzers run (`fuzz/harness.rs`), on stable Rust: a decoder that
//! panics again on any of them fails the normal suite, with no nightly and no cargo-fuzz.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The kept inputs of `target`: its corpus and its crashes.
fn kept(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for kind in ["corpus", "crashes"] {
        let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
            continue;
        };
        for e in dir {
            let path = e.expect("readable fuzz folder").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_kept_fuzz_input_of_every_target_decodes_without_a_panic() {
    let mut panicked = Vec::new();
    let mut replayed = 0;
    for (target, run) in harness::TARGETS {
        for path in kept(target) {
            let data = std::fs::read(&path).expect("readable fuzz input");
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panicked.push(path.display().to_string());
            }
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no kept fuzz input was found under {}",
        fuzz_dir().display()
    );
    assert!(
        panicked.is_empty(),
        "these kept fuzz inputs panic again: {panicked:#?}"
    );
}

#[test]
fn every_fuzz_target_has_kept_inputs_and_every_kept_folder_is_a_target() {
    let names: Vec<&str> = harness::TARGETS.iter().map(|(n, _)| *n).collect();
    for name in &names {
        assert!(
            !kept(name).is_empty(),
            "fuzz target {name} has no kept input in fuzz/corpus/{name}/: run scripts/fuzz.sh"
        );
        assert!(
            fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz target {name} has no fuzz/fuzz_targets/{name}.rs"
        );
    }
    for kind in ["corpus", "crashes"] {
        let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for e in dir {
            let folder = e.expect("readable fuzz folder").file_name();
            let folder = folder.to_string_lossy();
            assert!(
                names.contains(&folder.as_ref()),
                "fuzz/{kind}/{folder} belongs to no target in fuzz/harness.rs, so it is never replayed"
            );
        }
    }
}
