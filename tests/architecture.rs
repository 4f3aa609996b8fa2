//! The layers of `docs/architecture.md`, held by reading the source: the
//! transport (`server/`) over the application (`room/`) over the domain
//! modules, and no import loop anywhere in `src/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, relative path and code: unit-test modules
/// and comments left out, as they do not make the build's imports.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "tests.rs"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let code = text.split("#[cfg(test)]\nmod ").next().unwrap();
            let code: Vec<&str> = code
                .lines()
                .map(|l| match l.trim_start().starts_with("//") {
                    true => "",
                    false => l,
                })
                .collect();
            let rel = p.strip_prefix(&src).unwrap().display().to_string();
            (rel, code.join("\n"))
        })
        .collect()
}

/// The top-level module a file belongs to: `room` for `room/ask.rs`,
/// `audit` for `audit.rs`.
fn top(rel: &str) -> String {
    rel.split('/')
        .next()
        .unwrap()
        .trim_end_matches(".rs")
        .to_string()
}

/// The names `text` reaches through `prefix` (`crate::` gives `room` of
/// `crate::room::Ask`), braced lists included (`crate::{a, b}`).
fn reached(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &text[at + prefix.len()..];
        // `crate::{a::X, b}` names a and b; `crate::a::X` names a.
        let list = match rest.strip_prefix('{') {
            Some(inner) => inner.split('}').next().unwrap_or_default(),
            None => rest
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default(),
        };
        for item in list.split(',') {
            let name: String = item
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// A loop in `edges`, as the nodes along it, if there is one.
fn find_loop(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(cycle) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}

/// Top-level module -> the top-level modules its code names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, code) in sources() {
        let from = top(&rel);
        if from == "lib" || from == "main" {
            continue;
        }
        let to = edges.entry(from.clone()).or_default();
        to.extend(reached(&code, "crate::").into_iter().filter(|m| *m != from));
    }
    edges
}

#[test]
fn the_modules_of_src_import_each_other_in_no_loop() {
    let edges = module_graph();
    assert!(edges.len() > 10, "{edges:?}");
    assert_eq!(find_loop(&edges), None);
}

#[test]
fn the_files_of_each_folder_import_each_other_in_no_loop() {
    // Within a folder: `super::name` from one file to a sibling file.
    let files = sources();
    let mut folders: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let names: BTreeSet<String> = files.iter().map(|(rel, _)| rel.clone()).collect();
    for (rel, code) in &files {
        let Some((folder, file)) = rel.rsplit_once('/') else {
            continue;
        };
        let file = file.trim_end_matches(".rs").to_string();
        if file == "mod" {
            continue;
        }
        let siblings: BTreeSet<String> = reached(code, "super::")
            .into_iter()
            .filter(|s| *s != file)
            .filter(|s| {
                names.contains(&format!("{folder}/{s}.rs"))
                    || names.contains(&format!("{folder}/{s}/mod.rs"))
            })
            .collect();
        folders
            .entry(folder.to_string())
            .or_default()
            .insert(file, siblings);
    }
    for (folder, edges) in &folders {
        assert_eq!(find_loop(edges), None, "in src/{folder}/");
    }
}

/// The layers from the top: each may name only those below it.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["console"],
    &["server"],
    &["prepare"],
    &["client"],
    &["proto"],
    &["room"],
    &["agreements", "cluster"],
    &["query", "storage"],
    &["upload", "privacy", "synth", "certs"],
    &["policy", "audit"],
    &[
        "identity", "psi", "rules", "names", "clock", "crash", "disk", "prefetch",
    ],
];

#[test]
fn no_module_names_one_of_a_layer_above_it() {
    let layer_of = |m: &str| {
        LAYERS
            .iter()
            .position(|l| l.contains(&m))
            .unwrap_or_else(|| panic!("module {m} is in no layer of this test"))
    };
    for (from, to) in module_graph() {
        for m in to {
            assert!(
                layer_of(&m) > layer_of(&from),
                "{from} names {m}, of a layer not below its own"
            );
        }
    }
}

#[test]
fn the_application_knows_no_wire() {
    for (rel, code) in sources() {
        if top(&rel) != "room" {
            continue;
        }
        for word in ["tonic", "crate::proto", "prost", "http::"] {
            assert!(!code.contains(word), "src/{rel} names {word}");
        }
    }
}

#[test]
fn no_service_of_the_transport_imports_another() {
    // The files that implement a service; the rest of `server/` (auth,
    // status, metrics, tls, mod) serves them all.
    let services = [
        "agreements",
        "audit",
        "datasets",
        "flight",
        "governance",
        "matching",
        "queries",
    ];
    for (rel, code) in sources() {
        let Some(file) = rel.strip_prefix("server/") else {
            continue;
        };
        let file = file.trim_end_matches(".rs");
        if !services.contains(&file) {
            continue;
        }
        for sibling in reached(&code, "super::") {
            assert!(
                !services.contains(&sibling.as_str()),
                "src/{rel} imports the service {sibling}"
            );
        }
    }
}

#[test]
fn the_command_line_reaches_the_server_only_to_serve() {
    let allowed = [
        "serve",
        "ServerOptions",
        "TlsFiles",
        "Deletion",
        "Scrub",
        "serve_worker",
        "WorkerOptions",
        "DEFAULT_WORKER_LISTEN",
        "worker_url",
    ];
    for (rel, code) in sources() {
        if top(&rel) != "cli" {
            continue;
        }
        for name in reached(&code, "server::") {
            assert!(
                allowed.contains(&name.as_str()),
                "src/{rel} reaches server::{name}"
            );
        }
    }
}

#[test]
fn no_file_in_src_passes_700_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut long = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let lines = std::fs::read_to_string(&path).unwrap().lines().count();
                if lines > 700 {
                    long.push(format!("{} ({lines})", path.display()));
                }
            }
        }
    }
    assert!(long.is_empty(), "files over 700 lines: {long:?}");
}

#[test]
fn the_checks_here_catch_what_they_look_for() {
    // The readers above, on text made to break each rule.
    assert_eq!(
        reached("use crate::{room::Ask, proto};", "crate::"),
        BTreeSet::from(["room".to_string(), "proto".to_string()])
    );
    assert_eq!(
        reached(
            "x::crate::room; use super::auth::caller; f(a, b)",
            "super::"
        ),
        BTreeSet::from(["auth".to_string()])
    );
    let edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(
        find_loop(&edges),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
}
