//! Guards of ARCHITECTURE.md's structural invariants: the billing core does
//! no I/O, no two modules of `src/` import each other (directly or around a
//! loop), and the pipeline's functions and `impl` blocks stay short enough
//! to read.

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

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Rust source with its comments, string literals and character literals
/// blanked out (their braces, `::` and `fn` are not code); lines and
/// columns stay where they were.
fn strip(text: &str) -> String {
    let s: Vec<char> = text.chars().collect();
    let mut out = s.clone();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for c in &mut out[from..to.min(s.len())] {
            if *c != '\n' {
                *c = ' ';
            }
        }
    };
    let mut i = 0;
    while i < s.len() {
        let at = |k: usize| s.get(k).copied().unwrap_or('\0');
        let after_ident = i > 0 && is_ident(s[i - 1]);
        // A `b` prefix (b'x', br"x") is no identifier before the literal.
        let after_prefix = i > 0 && s[i - 1] == 'b' && (i < 2 || !is_ident(s[i - 2]));
        if s[i] == '/' && at(i + 1) == '/' {
            let end = (i..s.len()).find(|&k| s[k] == '\n').unwrap_or(s.len());
            blank(&mut out, i, end);
            i = end;
        } else if s[i] == '/' && at(i + 1) == '*' {
            let (mut depth, mut k) = (1, i + 2);
            while k < s.len() && depth > 0 {
                if s[k] == '/' && at(k + 1) == '*' {
                    depth += 1;
                    k += 1;
                } else if s[k] == '*' && at(k + 1) == '/' {
                    depth -= 1;
                    k += 1;
                }
                k += 1;
            }
            blank(&mut out, i, k);
            i = k;
        } else if s[i] == 'r' && (at(i + 1) == '"' || at(i + 1) == '#') && (!after_ident || after_prefix) {
            // A raw string: r"...", r#"..."#, br#"..."#.
            let hashes = (i + 1..s.len()).take_while(|&k| s[k] == '#').count();
            if at(i + 1 + hashes) != '"' {
                i += 1;
                continue;
            }
            let body = i + 2 + hashes;
            let end = (body..s.len()).find(|&k| s[k] == '"' && (1..=hashes).all(|h| at(k + h) == '#')).map_or(s.len(), |k| k + 1 + hashes);
            blank(&mut out, i + 1, end);
            i = end;
        } else if s[i] == '"' {
            let mut k = i + 1;
            while k < s.len() && s[k] != '"' {
                k += if s[k] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, i, k + 1);
            i = k + 1;
        } else if s[i] == '\'' && (!after_ident || after_prefix) {
            // A character literal ('x', '\n', '\u{7b}'), else a lifetime.
            let end = if at(i + 1) == '\\' { (i + 2..s.len()).find(|&k| s[k] == '\'') } else { (at(i + 2) == '\'').then_some(i + 2) };
            match end {
                Some(end) => {
                    blank(&mut out, i, end + 1);
                    i = end + 1;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// The paths a use tree names, from its start (the text after `crate::`,
/// `super::` or a module's name): `a::b`, `{a, b::{self, c}}`, `*`. A
/// path in an expression (`store::open(dir)`) is read up to where it ends.
/// Returns the paths, and where the tree ends.
fn use_tree(s: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && s[*i].is_whitespace() {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if s.get(i) == Some(&'{') {
        let mut paths = Vec::new();
        i += 1;
        loop {
            skip_ws(&mut i);
            match s.get(i) {
                None => return (paths, i),
                Some('}') => return (paths, i + 1),
                Some(',') => i += 1,
                Some(_) => {
                    let (inner, end) = use_tree(s, i);
                    paths.extend(inner);
                    // Neither a path nor a brace: skip the character.
                    i = if end == i { i + 1 } else { end };
                }
            }
        }
    }
    let start = i;
    while i < s.len() && (is_ident(s[i]) || s[i] == '*') {
        i += 1;
    }
    if i == start {
        return (Vec::new(), i);
    }
    let segment: String = s[start..i].iter().collect();
    if s.get(i) == Some(&':') && s.get(i + 1) == Some(&':') {
        let (rest, end) = use_tree(s, i + 2);
        if !rest.is_empty() {
            let paths = rest.into_iter().map(|r| std::iter::once(segment.clone()).chain(r).collect()).collect();
            return (paths, end);
        }
    }
    (vec![vec![segment]], i)
}

/// The paths, from the crate root, that a module's code names through
/// `crate::`, `super::` (any number, as in `super::super::x`, and counting
/// the inline modules it is written in: a test module's `use super::*` is
/// its own file), `self::`, or the name of one of its own submodules
/// (`children`: `use batch::X`). `self` ending a path (`super::{self, x}`)
/// names the module before it; `*` is dropped.
fn imported_paths(module: &str, code: &str, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let s: Vec<char> = strip(code).chars().collect();
    let me: Vec<String> = module.split("::").filter(|p| !p.is_empty()).map(String::from).collect();
    let starts = |i: usize, w: &str| {
        w.chars().enumerate().all(|(k, c)| s.get(i + k) == Some(&c)) && s.get(i + w.len()).is_none_or(|c| !is_ident(*c))
    };
    // `w` as a word beginning a path, not inside one.
    let word = |i: usize, w: &str| (i == 0 || !(is_ident(s[i - 1]) || s[i - 1] == ':' || s[i - 1] == '$')) && starts(i, w);
    // Where the path goes on after `w::` at `i`.
    let path_after = |i: usize, w: &str| {
        (starts(i, w) && s.get(i + w.len()) == Some(&':') && s.get(i + w.len() + 1) == Some(&':')).then_some(i + w.len() + 2)
    };
    // Brace depths at which the inline modules (`mod tests {`) around a
    // position opened.
    let (mut depth, mut inline, mut opening_mod) = (0usize, Vec::new(), false);
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            '{' => {
                depth += 1;
                if std::mem::take(&mut opening_mod) {
                    inline.push(depth);
                }
                i += 1;
                continue;
            }
            '}' => {
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
                continue;
            }
            ';' => opening_mod = false,
            _ => {}
        }
        if word(i, "mod") {
            opening_mod = true;
            i += 3;
            continue;
        }
        let (base, from) = if let Some(from) = path_after(i, "crate").filter(|_| word(i, "crate")) {
            (Some(Vec::new()), from)
        } else if let Some(mut from) = path_after(i, "super").filter(|_| word(i, "super")) {
            let mut supers = 1;
            while let Some(next) = path_after(from, "super") {
                supers += 1;
                from = next;
            }
            // The first `super`s leave the inline modules this is written
            // in (a test module's `use super::*` is its own file); the
            // rest go up from the file's module.
            let up = supers - supers.min(inline.len());
            ((up > 0 && up <= me.len()).then(|| me[..me.len() - up].to_vec()), from)
        } else if let Some(from) = path_after(i, "self").filter(|_| word(i, "self") && inline.is_empty()) {
            (Some(me.clone()), from)
        } else if children.iter().any(|c| word(i, c) && path_after(i, c).is_some()) && inline.is_empty() {
            (Some(me.clone()), i)
        } else {
            (None, i + 1)
        };
        let Some(base) = base else {
            i = from.max(i + 1);
            continue;
        };
        let (paths, end) = use_tree(&s, from);
        for p in paths {
            let mut full = base.clone();
            full.extend(p.into_iter().filter(|seg| seg != "*"));
            if full.last().is_some_and(|seg| seg == "self") {
                full.pop();
            }
            out.push(full);
        }
        i = end.max(i + 1);
    }
    out
}

/// The import graph of modules given as (name, code) pairs: each module
/// and the modules it imports. A path is its longest prefix that is a
/// module given (`pipeline::batch::Pending` -> `pipeline::batch`); paths
/// to none (`std::`, an item of the crate root) add no edge, nor does a
/// module's import of itself. A module given with no code is one node for
/// everything below it (the billing core).
fn import_graph(modules: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let names: BTreeSet<&str> = modules.iter().map(|(m, _)| m.as_str()).collect();
    let resolve = |path: &[String]| (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| names.contains(m.as_str()));
    let mut edges = BTreeMap::new();
    for (me, code) in modules {
        let children: BTreeSet<String> =
            names.iter().filter_map(|m| m.strip_prefix(&format!("{me}::"))).filter(|c| !c.contains("::")).map(String::from).collect();
        let mut targets: BTreeSet<String> = imported_paths(me, code, &children).iter().filter_map(|p| resolve(p)).collect();
        targets.remove(me);
        targets.remove("lib");
        edges.insert(me.clone(), targets);
    }
    edges
}

/// An import cycle of the graph, as `a -> b -> a`, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    // Depth-first search for a back edge.
    fn visit(n: &str, edges: &BTreeMap<String, BTreeSet<String>>, stack: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<String> {
        if done.contains(n) {
            return None;
        }
        if let Some(i) = stack.iter().position(|s| s == n) {
            return Some(format!("{} -> {n}", stack[i..].join(" -> ")));
        }
        stack.push(n.to_string());
        for t in edges.get(n).into_iter().flatten() {
            if let Some(cycle) = visit(t, edges, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

/// The modules of `src/` with their code, the billing core as one node.
fn src_modules() -> Vec<(String, String)> {
    let files = rust_files(&src()).into_iter().filter(|f| !f.starts_with(src().join("billing")));
    // The billing core imports nothing outside itself (checked above by what it may use).
    let mut modules: Vec<(String, String)> = files.map(|f| (module_of(&f), std::fs::read_to_string(&f).unwrap())).collect();
    modules.push(("billing".to_string(), String::new()));
    modules
}

#[test]
fn no_import_cycle_among_modules() {
    let edges = import_graph(&src_modules());
    assert!(edges["pipeline"].contains("pipeline::ingest"), "{edges:#?}");
    assert!(edges["worker"].contains("pipeline"), "{edges:#?}");
    // The two drivers side by side: what both need is in `driver`.
    for (a, b) in [("worker", "file_replay"), ("file_replay", "worker")] {
        assert!(!edges[a].contains(b), "{a} imports {b}: put what both drivers need in src/driver.rs");
    }
    assert!(edges["file_replay"].contains("driver") && edges["worker"].contains("driver"), "{edges:#?}");
    if let Some(cycle) = find_cycle(&edges) {
        panic!("import cycle: {cycle}");
    }
}

fn modules(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(m, c)| (m.to_string(), c.to_string())).collect()
}

/// The forms of `use` the graph reads, each a (module, code, the edges
/// expected from it) case.
#[test]
fn the_import_graph_reads_every_form_of_path() {
    let tree =
        [("store", ""), ("pipeline", ""), ("pipeline::batch", ""), ("pipeline::emit", ""), ("pipeline::emit::plan", ""), ("billing", "")];
    let check = |me: &str, code: &str, expect: &[&str]| {
        let mut all = modules(&tree);
        all.retain(|(m, _)| m != me);
        all.push((me.to_string(), code.to_string()));
        let edges = import_graph(&all);
        let got: Vec<&str> = edges[me].iter().map(String::as_str).collect();
        assert_eq!(got, expect, "{me}: {code}");
    };
    check("pipeline::emit", "use super::{Pipeline, Staged};", &["pipeline"]);
    check("pipeline::emit", "use super::{self, batch::Pending};", &["pipeline", "pipeline::batch"]);
    check("pipeline::emit", "use super::{batch::{self, Pending}, policy};", &["pipeline", "pipeline::batch"]);
    check("pipeline::emit", "use super::batch::Pending;", &["pipeline::batch"]);
    check("pipeline::emit", "use super::*;", &["pipeline"]);
    check("pipeline::emit::plan", "use super::super::Pipeline;", &["pipeline"]);
    check("pipeline::emit::plan", "use super::super::{batch, store};", &["pipeline", "pipeline::batch"]);
    check("pipeline::emit", "use crate::{store::{self, Store}, billing::calendar::Month};", &["billing", "store"]);
    check("pipeline::emit", "fn f() { let s = crate::store::open(); }", &["store"]);
    check("pipeline", "mod emit;\nuse emit::plan::Plan;\nfn f(b: batch::Pending) {}", &["pipeline::batch", "pipeline::emit::plan"]);
    check("pipeline", "pub use self::emit::Emission;", &["pipeline::emit"]);
    // A test module's `use super::*` is its own file; a second `super`
    // leaves it.
    check("pipeline::emit", "fn f() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n", &[]);
    check("pipeline::emit", "mod tests {\n    use super::super::batch::X;\n}\n", &["pipeline::batch"]);
    check("pipeline::emit", "mod tests { use super::*; }\nuse super::Pipeline;", &["pipeline"]);
    // Comments and strings name nothing.
    check("pipeline::emit", "// use super::Pipeline;\nlet s = \"super::Pipeline {\"; let c = '{'; let r = r#\"crate::store\"#;", &[]);
    check("pipeline::emit", "/* crate::store */ fn f<'a>(x: &'a str) -> char { '}' }\nuse super::batch::X;", &["pipeline::batch"]);
    // A brace left in would keep the test module open over the import after it.
    check("pipeline::emit", "mod tests { fn f() -> u8 { b'{' } }\nuse super::Pipeline;", &["pipeline"]);
    check("pipeline::emit", "mod tests { fn f() -> &'static [u8] { br#\"{\"# } }\nuse super::Pipeline;", &["pipeline"]);
}

/// A cycle between a module and its child, planted: the parent uses the
/// child by name, the child imports the parent's items in braces (what
/// `src/pipeline/` did before its rooms). The detector names it.
#[test]
fn a_planted_cycle_through_use_super_braces_is_reported() {
    let planted = modules(&[
        ("pipeline", "pub mod emit;\nuse emit::EmissionPlan;\npub struct Pipeline;\npub struct Staged;"),
        ("pipeline::emit", "use super::{Pipeline, Staged};\npub struct EmissionPlan;"),
        ("worker", "use crate::pipeline::Pipeline;"),
    ]);
    let edges = import_graph(&planted);
    assert_eq!(find_cycle(&edges).as_deref(), Some("pipeline -> pipeline::emit -> pipeline"), "{edges:#?}");
    // And with the import of the parent module itself.
    let planted = modules(&[("pipeline", "use emit::X;"), ("pipeline::emit", "use super::{self, batch::Y};"), ("pipeline::batch", "")]);
    assert_eq!(find_cycle(&import_graph(&planted)).as_deref(), Some("pipeline -> pipeline::emit -> pipeline"));
    // Without the child's import of its parent, no cycle.
    let fixed = modules(&[("pipeline", "use emit::X;"), ("pipeline::emit", "use super::batch::Y;"), ("pipeline::batch", "")]);
    assert_eq!(find_cycle(&import_graph(&fixed)), None);
}

/// The functions and `impl` blocks of a file's code: (what, first line,
/// lines from its `fn` or `impl` line to its closing brace). What is
/// `impl Trait for X` or `fn name`; a function without a body (a trait's)
/// is left out, as is `impl` in a type (`x: impl Iterator`), which does
/// not begin a line.
fn spans(code: &str) -> Vec<(String, usize, usize)> {
    let s: Vec<char> = strip(code).chars().collect();
    let line_at = |i: usize| s[..i].iter().filter(|c| **c == '\n').count() + 1;
    let mut out = Vec::new();
    for (i, _) in s.iter().enumerate() {
        let before = if i == 0 { '\n' } else { s[i - 1] };
        let word = |w: &str| {
            !is_ident(before)
                && w.chars().enumerate().all(|(k, c)| s.get(i + k) == Some(&c))
                && s.get(i + w.len()).is_some_and(|c| c.is_whitespace() || *c == '<')
        };
        let line_start = s[..i].iter().rev().take_while(|c| **c != '\n').all(|c| c.is_whitespace());
        let is_fn = word("fn") && s.get(i + 3).is_some_and(|c| is_ident(*c));
        let is_impl = word("impl") && line_start;
        if !is_fn && !is_impl {
            continue;
        }
        // The body: the first `{` before any `;`, to its matching `}`.
        let Some(open) = (i..s.len()).find(|&k| s[k] == '{' || s[k] == ';').filter(|&k| s[k] == '{') else { continue };
        let mut depth = 0;
        let Some(close) = (open..s.len()).find(|&k| {
            depth += match s[k] {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            depth == 0
        }) else {
            continue;
        };
        let head: String = s[i..open].iter().collect::<String>().split_whitespace().collect::<Vec<_>>().join(" ");
        let what = if is_fn { head.split(['(', '<']).next().unwrap_or("").to_string() } else { head };
        out.push((what, line_at(i), line_at(close) - line_at(i) + 1));
    }
    out
}

/// Longest a function may be, in lines from its `fn` to its closing brace.
const MAX_FN_LINES: usize = 60;
/// Longest an `impl` block may be.
const MAX_IMPL_LINES: usize = 250;

/// The folders and files under `src/` whose functions and `impl` blocks are
/// held to [`MAX_FN_LINES`] and [`MAX_IMPL_LINES`]. To hold more of the
/// code to it, add them here: `"worker"`, `"file_replay.rs"`, `"delivery"`.
const SHORT_CODE: &[&str] = &["pipeline", "worker", "file_replay.rs", "delivery", "driver.rs"];

#[test]
fn functions_and_impl_blocks_are_short() {
    let mut offenders = Vec::new();
    for place in SHORT_CODE {
        let path = src().join(place);
        let files = if path.is_dir() { rust_files(&path) } else { vec![path] };
        assert!(!files.is_empty(), "{place}: no Rust files");
        for f in files {
            for (what, line, len) in spans(&std::fs::read_to_string(&f).unwrap()) {
                let max = if what.starts_with("impl") { MAX_IMPL_LINES } else { MAX_FN_LINES };
                if len > max {
                    offenders.push(format!("{}:{line}: `{what}` is {len} lines (at most {max})", f.strip_prefix(src()).unwrap().display()));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "too long to read on a screen or two:\n{}", offenders.join("\n"));
}

#[test]
fn spans_measure_functions_and_impl_blocks() {
    let code = "impl A {\n    fn f(&self) -> impl Iterator<Item = u8> {\n        let s = \"}\";\n        [1].into_iter()\n    }\n}\n\
                trait T {\n    fn g();\n}\nfn h<'a>(x: impl Fn(&'a str)) {\n    x('}'.to_string().as_str())\n}\n";
    let got = spans(code);
    let got: Vec<(&str, usize, usize)> = got.iter().map(|(w, l, n)| (w.as_str(), *l, *n)).collect();
    assert_eq!(got, vec![("impl A", 1, 6), ("fn f", 2, 4), ("fn h", 10, 3)]);
}
