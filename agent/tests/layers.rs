//! The agent's modules import downwards only, and never in a cycle.
//!
//! Reads every `.rs` file under `agent/src`, collects the `crate::…` paths it
//! names (in `use` declarations and inline, including `use crate::{a, b::c}`
//! groups; comments are ignored, so doc links do not count), and maps each
//! file and each path to its unit: the folder directly under `src/`, or the
//! file's module for a top-level file. Then it checks two things:
//! - every unit has a layer in [`LAYERS`], and no unit imports one in a higher
//!   layer (cli → commands → daemon → backup/restore → store → source → config →
//!   policy/encryption → leaves);
//! - the unit graph has no cycle (which would also catch two units of one layer
//!   importing each other).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each unit and its layer: a unit may import only units of a lower layer
/// (or, within one layer, units that do not import it back).
const LAYERS: &[(&str, u8)] = &[
    ("main", 9),
    ("lib", 9),
    ("cli", 8),
    ("commands", 7),
    ("daemon", 6),
    ("backup", 5),
    ("restore", 5),
    ("store", 4),
    ("source", 3),
    ("config", 2),
    ("policy", 1),
    ("encryption", 1),
    ("error_chain", 0),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without `//` comments (line and doc comments).
fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|line| {
            // A `//` inside a string literal ("http://…") is not a comment; the
            // quote count before it tells.
            let mut cut = line.len();
            let mut from = 0;
            while let Some(i) = line[from..].find("//") {
                let at = from + i;
                if line[..at].matches('"').count() % 2 == 0 {
                    cut = at;
                    break;
                }
                from = at + 2;
            }
            &line[..cut]
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every `crate::` path in `src`, groups expanded.
fn crate_paths(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = src;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `my_crate::…`, not ours
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}}`: the top-level names of the group.
            let mut depth = 0;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                    _ => item.push(c),
                }
            }
            items.push(item);
            for item in items {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != "self" {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// The unit a file under `src/` belongs to.
fn unit_of(src_dir: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src_dir).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The unit graph of the crate at `src_dir`: unit -> units it imports.
fn unit_graph(src_dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let unit = unit_of(src_dir, &file);
        let src = strip_comments(&std::fs::read_to_string(&file).unwrap());
        let deps = graph.entry(unit.clone()).or_default();
        for target in crate_paths(&src) {
            if target != unit {
                deps.insert(target);
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one, as the units along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(2) => return None,
            Some(1) => {
                let at = stack.iter().position(|n| n == node).unwrap();
                let mut cycle = stack[at..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// What is wrong with `graph` under `layers`, one line per problem.
fn problems(graph: &BTreeMap<String, BTreeSet<String>>, layers: &[(&str, u8)]) -> Vec<String> {
    let layer: BTreeMap<&str, u8> = layers.iter().copied().collect();
    let mut out = Vec::new();
    for (unit, deps) in graph {
        let Some(&from) = layer.get(unit.as_str()) else {
            out.push(format!("{unit} has no layer in LAYERS (tests/layers.rs)"));
            continue;
        };
        for dep in deps {
            match layer.get(dep.as_str()) {
                None => out.push(format!(
                    "{unit} imports {dep}, which has no layer in LAYERS"
                )),
                Some(&to) if to > from => out.push(format!(
                    "{unit} (layer {from}) imports {dep} (layer {to}): lower never imports higher"
                )),
                Some(_) => {}
            }
        }
    }
    if let Some(cycle) = find_cycle(graph) {
        out.push(format!("import cycle: {}", cycle.join(" -> ")));
    }
    out
}

#[test]
fn agent_modules_import_downwards_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = unit_graph(&src);
    assert!(
        graph.len() > 5,
        "found too few modules under {}",
        src.display()
    );
    let problems = problems(&graph, LAYERS);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_sees_grouped_imports_and_ignores_comments() {
    let src = "use crate::{a::X, b::{c, d}, self};\n// crate::zz\nfn f() { crate::e::g(); \"http://crate::no\"; }";
    let found = crate_paths(&strip_comments(src));
    let want: BTreeSet<String> = ["a", "b", "e", "no"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
}

#[test]
fn the_check_fails_on_a_cycle_and_on_an_upward_import() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("low", vec!["high"]), ("high", vec!["low"])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
    let found = problems(&graph, &[("low", 0), ("high", 1)]);
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("low (layer 0) imports high")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|p| p.starts_with("import cycle:")),
        "{found:?}"
    );
}

#[test]
fn the_workspace_crates_depend_on_nothing_of_the_agent() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    let mut seen = 0;
    for entry in std::fs::read_dir(&crates).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        assert!(
            !text.contains("etcd-backup-agent"),
            "{} depends on the agent",
            manifest.display()
        );
        seen += 1;
    }
    assert!(seen >= 2, "expected the crates under {}", crates.display());
}
