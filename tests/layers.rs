//! The house's arrows, checked: every `crate::…` path in `src/` points to the same layer
//! or one below it (the order in `src/lib.rs`), `sync` and `watch` stand side by side
//! without importing each other, and no two modules import each other, directly or round
//! a circle. Reads the source; needs neither root nor a build of anything else.
//!
//!     cargo test --test layers

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each folder of `src/` and its floor: a module may import folders on its floor or
/// lower. `sync` and `watch` share a floor but may not import each other.
const LAYERS: &[(&str, u8)] = &[
    ("base", 0),
    ("group", 1),
    ("net", 2),
    ("data", 3),
    ("sync", 4),
    ("watch", 4),
    ("control", 5),
    ("daemon", 6),
    ("cli", 7),
];

fn floor(layer: &str) -> Option<u8> {
    LAYERS.iter().find(|(l, _)| *l == layer).map(|(_, f)| *f)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's module path: `src/data/transfer.rs` is `data::transfer`, `src/daemon/mod.rs`
/// is `daemon`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// Every module a file names through `crate::`, as `layer` or `layer::module`, with
/// `use crate::{a::x, b::{c, d}}` lists opened up. Comments are skipped.
fn imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let end = if rest.starts_with('{') {
            close_of(rest) + 1
        } else {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len())
        };
        for path in expand(&rest[..end]) {
            add_path(&path, &mut found);
        }
        rest = &rest[end.min(rest.len())..];
    }
    found
}

/// The index of the brace closing the one `s` starts with.
fn close_of(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    s.len().saturating_sub(1)
}

/// `a::{b, c::{d, e}}` as `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.to_string()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..open + close_of(&tree[open..])];
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|i| expand(i).into_iter().map(move |e| format!("{prefix}{e}")))
        .collect()
}

/// Records `layer::module` from the start of a path (`layer` alone when the next part is
/// not a module name, such as `{` or a type).
fn add_path(path: &str, found: &mut BTreeSet<String>) {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let layer = ident(path);
    if floor(&layer).is_none() {
        return;
    }
    let after = &path[layer.len()..];
    let module = after
        .strip_prefix("::")
        .map(ident)
        .filter(|m| m.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    found.insert(match module {
        Some(m) => format!("{layer}::{m}"),
        None => layer,
    });
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g = BTreeMap::new();
    for f in files {
        let module = module_of(&src, &f);
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let mut to = imports(&text);
        to.retain(|m| *m != module && !module.starts_with(&format!("{m}::")));
        g.insert(module, to);
    }
    g
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Imports that point to a higher layer, or sideways into another folder of the same floor.
fn against_layers(g: &Graph) -> Vec<String> {
    let mut wrong = Vec::new();
    for (module, to) in g {
        let from = module.split("::").next().unwrap_or_default();
        let f = floor(from).unwrap_or_else(|| panic!("{module} is in no layer of LAYERS"));
        for t in to {
            let layer = t.split("::").next().unwrap_or_default();
            let tf = floor(layer).unwrap_or(u8::MAX);
            if tf > f || (tf == f && layer != from) {
                wrong.push(format!("{module} imports {t}"));
            }
        }
    }
    wrong
}

/// Every circle of imports, found depth first: a module met again while still on the
/// path closes one.
fn circles(g: &Graph) -> Vec<String> {
    fn visit(
        m: &str,
        g: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|p| p == m) {
            found.push(format!("{} -> {m}", path[at..].join(" -> ")));
            return;
        }
        if !done.insert(m.to_string()) {
            return;
        }
        path.push(m.to_string());
        for t in g.get(m).into_iter().flatten() {
            visit(t, g, path, done, found);
        }
        path.pop();
    }
    let (mut done, mut found) = (BTreeSet::new(), Vec::new());
    for m in g.keys() {
        visit(m, g, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

#[test]
fn every_import_points_to_the_same_layer_or_a_lower_one() {
    let wrong = against_layers(&graph());
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_module_imports_itself_round_a_circle() {
    let found = circles(&graph());
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

#[test]
fn an_upward_or_sideways_import_and_a_circle_are_caught() {
    let g: Graph = [
        ("data::transfer", vec!["daemon::node", "group::auth"]),
        ("sync::folder", vec!["watch::hub"]),
        ("group::mesh", vec!["group::gossip"]),
        ("group::gossip", vec!["group::mesh"]),
        ("daemon::node", vec![]),
        ("watch::hub", vec![]),
        ("group::auth", vec![]),
    ]
    .into_iter()
    .map(|(m, to)| (m.to_string(), to.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        against_layers(&g),
        [
            "data::transfer imports daemon::node",
            "sync::folder imports watch::hub"
        ]
    );
    assert_eq!(
        circles(&g),
        ["group::gossip -> group::mesh -> group::gossip"]
    );
}

#[test]
fn the_checker_sees_lists_nested_paths_and_ignores_comments() {
    let found = imports(
        "use crate::{base::clock::now_ms, group::{link, mesh::Mesh}};\n\
         // crate::cli::player is only a comment\n\
         let x = crate::data::share::clean_path(p);\n",
    );
    let want: BTreeSet<String> = ["base::clock", "group::link", "group::mesh", "data::share"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
}
