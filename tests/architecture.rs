//! Guards of ARCHITECTURE.md's structural invariants: the billing core does
//! no I/O, and no two modules of `src/` import each other (directly or
//! around a loop).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The code of a file without its comment lines.
fn code(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_billing_core_does_no_io() {
    let files = rust_files(&src().join("billing"));
    assert!(files.len() >= 10, "{files:?}");
    for f in files {
        let text = code(&f);
        for forbidden in ["tokio", "rdkafka", "rocksdb", "std::fs", "std::net", "std::io::stdin", "SystemTime"] {
            assert!(!text.contains(forbidden), "{} uses {forbidden}: the billing core performs no I/O", f.display());
        }
    }
}

/// The module a file defines: `store`, `pipeline`, `pipeline::batch`, ...
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap().with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).filter(|p| p != "mod").collect();
    parts.join("::")
}

#[test]
fn no_import_cycle_among_modules() {
    let files: Vec<PathBuf> = rust_files(&src()).into_iter().filter(|f| !f.starts_with(src().join("billing"))).collect();
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    // The billing core is one node: it imports nothing outside itself (checked above by what it may use).
    let resolve = |path: &str| -> Option<String> {
        let segs: Vec<&str> = path.split("::").collect();
        for n in (1..=segs.len()).rev() {
            let m = segs[..n].join("::");
            if modules.contains(&m) || m == "billing" {
                return Some(m);
            }
        }
        None
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let me = module_of(f);
        let parent = me.rsplit_once("::").map(|(p, _)| p.to_string());
        let text = code(f);
        let mut targets = BTreeSet::new();
        for (i, _) in text.match_indices("crate::") {
            let rest: String = text[i + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            targets.extend(resolve(rest.trim_end_matches(':')));
        }
        if let Some(parent) = &parent {
            for (i, _) in text.match_indices("super::") {
                let rest: String = text[i + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                // `use super::*` is a test module's import of its own file.
                if !rest.is_empty() {
                    targets.extend(resolve(&format!("{parent}::{rest}")));
                }
            }
        }
        // A module's own submodules, used by name (`use batch::...`).
        for m in &modules {
            if let Some(child) = m.strip_prefix(&format!("{me}::")) {
                if text.contains(&format!("use {child}::")) || text.contains(&format!(" {child}::")) {
                    targets.insert(m.clone());
                }
            }
        }
        targets.remove(&me);
        targets.remove("lib");
        edges.insert(me, targets);
    }
    assert!(edges["pipeline"].contains("pipeline::ingest"), "{edges:#?}");
    assert!(edges["worker"].contains("pipeline"), "{edges:#?}");
    // The two drivers side by side: what both need is in `driver`.
    for (a, b) in [("worker", "file_replay"), ("file_replay", "worker")] {
        assert!(!edges[a].contains(b), "{a} imports {b}: put what both drivers need in src/driver.rs");
    }
    assert!(edges["file_replay"].contains("driver") && edges["worker"].contains("driver"), "{edges:#?}");
    // Depth-first search for a back edge.
    fn visit(n: &str, edges: &BTreeMap<String, BTreeSet<String>>, stack: &mut Vec<String>, done: &mut BTreeSet<String>) {
        if done.contains(n) {
            return;
        }
        if let Some(i) = stack.iter().position(|s| s == n) {
            panic!("import cycle: {} -> {n}", stack[i..].join(" -> "));
        }
        stack.push(n.to_string());
        for t in edges.get(n).into_iter().flatten() {
            visit(t, edges, stack, done);
        }
        stack.pop();
        done.insert(n.to_string());
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        visit(n, &edges, &mut Vec::new(), &mut done);
    }
}
