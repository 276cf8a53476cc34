//! The layering check: nsm-sdk's modules form floors and no import cycles.
//!
//! It reads `nsm-sdk/src`, collects every `crate::`, `super::` and `self::` path each
//! module uses outside its tests, and fails on
//! - a floor using a floor above it (floors bottom-up: [`FLOORS`]), and
//! - an import cycle between modules at the same level (sibling files or folders).
//!
//! Test code (`#[cfg(test)] mod ... { }` blocks and `tests.rs` files) is left out: a test
//! may build a chain from handlers above the module it tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The floors, from the ground up; a module may use its own floor and those below.
const FLOORS: &[&str] = &[
    "error",
    "wire",
    "security",
    "core",
    "config",
    "token",
    "registry",
    "ipam",
    "transport",
    "handlers",
    "chains",
    "serving",
    "sandbox",
];

/// A module, as its path below the crate root (`["handlers", "heal"]`).
type Module = Vec<String>;

#[test]
fn no_floor_uses_a_floor_above_it() {
    let uses = crate_uses(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let bad = floor_violations(&uses);
    assert!(
        bad.is_empty(),
        "floors use floors above them (bottom-up: {FLOORS:?}):\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_import_cycle_between_sibling_modules() {
    let uses = crate_uses(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let cycles = sibling_cycles(&uses);
    let shown: Vec<String> = cycles.iter().map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", shown.join("\n"));
}

#[test]
fn every_top_level_module_has_a_floor() {
    let uses = crate_uses(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let unknown: BTreeSet<&str> = uses
        .keys()
        .filter_map(|m| m.first())
        .map(String::as_str)
        .filter(|top| !FLOORS.contains(top))
        .collect();
    assert!(unknown.is_empty(), "modules without a floor: {unknown:?}");
}

// The checker must be able to fail: these run it on made-up graphs.

fn graph(edges: &[(&str, &str)]) -> BTreeMap<Module, BTreeSet<Module>> {
    let split = |s: &str| -> Module { s.split("::").map(String::from).collect() };
    let mut g: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (from, to) in edges {
        g.entry(split(from)).or_default().insert(split(to));
        g.entry(split(to)).or_default();
    }
    g
}

#[test]
fn the_checker_finds_a_cycle_between_siblings() {
    let g = graph(&[
        ("handlers::discover", "handlers::round_robin::Selected"),
        ("handlers::round_robin", "handlers::discover::Candidates"),
        ("handlers::heal", "core::rt"),
    ]);
    let cycles = sibling_cycles(&g);
    assert_eq!(
        cycles,
        vec![vec![
            "handlers::discover".to_string(),
            "handlers::round_robin".to_string(),
            "handlers::discover".to_string()
        ]]
    );
}

#[test]
fn the_checker_finds_a_cycle_through_folders() {
    // transport::a::x uses transport::b, transport::b uses transport::a::y: the folders
    // a and b are the siblings in the cycle.
    let g = graph(&[
        ("transport::a::x", "transport::b"),
        ("transport::b", "transport::a::y"),
        ("transport::a::x", "transport::a::y"),
    ]);
    let cycles = sibling_cycles(&g);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert_eq!(cycles[0].first().map(String::as_str), Some("transport::a"));
}

#[test]
fn the_checker_accepts_a_graph_without_cycles_and_flags_a_floor_reaching_up() {
    let g = graph(&[
        ("handlers::a", "handlers::b"),
        ("handlers::b", "core::rt"),
        ("registry::local_bypass", "transport::Url"),
    ]);
    assert!(sibling_cycles(&g).is_empty());
    let bad = floor_violations(&g);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].contains("registry::local_bypass"), "{bad:?}");
}

#[test]
fn the_parser_expands_groups_and_resolves_super() {
    let src = "use crate::{core::{Cx, rt::Backoff}, registry::Query};\n\
               use super::round_robin::Selected;\n\
               fn f() { let _ = crate::transport::Url::default(); }\n\
               #[cfg(test)]\nmod tests { use crate::chains::client; }\n";
    let me: Module = vec!["handlers".into(), "discover".into()];
    let got: BTreeSet<String> = paths_in(src, &me)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = [
        "core::Cx",
        "core::rt::Backoff",
        "registry::Query",
        "handlers::round_robin::Selected",
        "transport::Url::default",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, want);
}

// The checker.

/// Every module of the crate in `src` and the paths it uses (outside tests).
fn crate_uses(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut out = BTreeMap::new();
    for file in rust_files(src) {
        let rel = file.strip_prefix(src).expect("below src");
        let Some(module) = module_of(rel) else {
            continue;
        };
        let text = fs::read_to_string(&file).expect("readable source");
        let used: BTreeSet<Module> = paths_in(&text, &module).into_iter().collect();
        out.entry(module).or_insert_with(BTreeSet::new).extend(used);
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// `handlers/heal.rs` -> `handlers::heal`, `registry/mod.rs` -> `registry`; `None` for
/// test files and the crate root.
fn module_of(rel: &Path) -> Option<Module> {
    let mut parts: Module = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if stem == "tests" || parts.iter().any(|p| p == "tests") {
        return None;
    }
    match stem {
        "mod" => {}
        "lib" if parts.is_empty() => return None,
        _ => parts.push(stem.to_string()),
    }
    Some(parts)
}

/// The crate paths `text` (the source of `module`) uses, resolved from the crate root.
fn paths_in(text: &str, module: &Module) -> Vec<Module> {
    let code = strip_tests(&strip_comments(text));
    let mut out = Vec::new();
    // `use` statements, with their groups expanded.
    for stmt in use_statements(&code) {
        for path in expand(&stmt) {
            out.extend(resolve(&path, module));
        }
    }
    // Inline paths: `crate::a::b`, `super::x` outside `use`.
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || "_:$".contains(c)) {
                continue;
            }
            let mut end = at;
            while end < bytes.len()
                && (bytes[end].is_ascii_alphanumeric() || b"_:".contains(&bytes[end]))
            {
                end += 1;
            }
            let path = code[at..end].trim_end_matches(':');
            if path.contains("::") && !in_use_statement(&code, at) {
                out.extend(resolve(path, module));
            }
        }
    }
    out
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Removes every `#[cfg(test)] mod name { ... }` block.
fn strip_tests(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        if !trimmed.starts_with("mod ") {
            out.push_str("#[cfg(test)]");
            rest = after;
            continue;
        }
        let Some(open) = trimmed.find(['{', ';']) else {
            rest = "";
            break;
        };
        if trimmed.as_bytes()[open] == b';' {
            rest = &trimmed[open + 1..];
            continue;
        }
        let mut depth = 0usize;
        let mut end = trimmed.len();
        for (j, c) in trimmed[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &trimmed[end..];
    }
    out.push_str(rest);
    out
}

/// The `use ...;` statements of `code` that start at `crate`, `super` or `self`, without
/// `use` and `;`.
fn use_statements(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find("use ") {
        let at = from + i;
        from = at + 4;
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = code[from..].find(';') else {
            break;
        };
        let stmt = normalize(&code[from..from + end]);
        if ["crate::", "super::", "self::"]
            .iter()
            .any(|p| stmt.starts_with(p))
        {
            out.push(stmt);
        }
    }
    out
}

/// Whitespace runs become one space, and none is left beside `::`, braces or commas,
/// so `a :: { B as C ,\n d }` reads `a::{B as C,d}`.
fn normalize(stmt: &str) -> String {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    let mut out = words.join(" ");
    for p in ["::", "{", "}", ","] {
        out = out
            .replace(&format!(" {p}"), p)
            .replace(&format!("{p} "), p);
    }
    out
}

fn in_use_statement(code: &str, at: usize) -> bool {
    let line_start = code[..at].rfind(['\n', ';', '{']).map_or(0, |i| i + 1);
    let head = code[line_start..at].trim_start();
    let head = head.strip_prefix("pub(crate) ").unwrap_or(head);
    let head = head.strip_prefix("pub ").unwrap_or(head);
    head.starts_with("use ")
        || (code[..at]
            .rfind("use ")
            .is_some_and(|u| !code[u..at].contains(';')))
}

/// `a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e` (`self` in a group is its prefix).
fn expand(stmt: &str) -> Vec<String> {
    let Some(open) = stmt.find('{') else {
        return vec![stmt.split(" as ").next().unwrap_or(stmt).to_string()];
    };
    let prefix = stmt[..open].trim_end_matches("::");
    let inner = &stmt[open + 1..stmt.rfind('}').unwrap_or(stmt.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(expand)
        .map(|p| {
            if p == "self" {
                prefix.to_string()
            } else {
                format!("{prefix}::{p}")
            }
        })
        .collect()
}

/// A `crate::`/`super::`/`self::` path, as segments from the crate root.
fn resolve(path: &str, module: &Module) -> Option<Module> {
    let mut segs = path.split("::").filter(|s| !s.is_empty());
    let mut base: Module = match segs.next()? {
        "crate" => Vec::new(),
        "self" => module.clone(),
        "super" => {
            let mut m = module.clone();
            m.pop();
            m
        }
        _ => return None,
    };
    let mut segs = segs.peekable();
    while segs.peek() == Some(&"super") {
        segs.next();
        base.pop();
    }
    base.extend(segs.filter(|s| *s != "*").map(String::from));
    (!base.is_empty()).then_some(base)
}

fn floor_of(m: &[String]) -> Option<usize> {
    FLOORS
        .iter()
        .position(|f| Some(*f) == m.first().map(String::as_str))
}

/// "a -> b" for each use of a floor above the user's. Paths through the crate root
/// (`crate::Error`, `crate::Cx`) re-export the two lowest floors and are let through.
fn floor_violations(uses: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<String> {
    let mut out = Vec::new();
    for (from, used) in uses {
        let Some(mine) = floor_of(from) else { continue };
        for to in used {
            if let Some(theirs) = floor_of(to) {
                if theirs > mine {
                    out.push(format!("{} -> {}", from.join("::"), to.join("::")));
                }
            }
        }
    }
    out
}

/// The cycles among the children of any module, each as `a -> b -> ... -> a`, one per
/// strongly connected group of siblings.
fn sibling_cycles(uses: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<String>> {
    // parent -> sibling -> siblings it uses.
    let mut levels: BTreeMap<Module, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, used) in uses {
        for to in used {
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            // A module using its own descendant or ancestor is not a sibling edge.
            if common >= from.len() || common >= to.len() {
                continue;
            }
            // `to` may name an item rather than a module: the sibling is still its
            // first segment past the common parent.
            let parent = from[..common].to_vec();
            levels
                .entry(parent)
                .or_default()
                .entry(from[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
    }
    let mut out = Vec::new();
    for (parent, edges) in levels {
        for cycle in cycles_in(&edges) {
            let name = |s: &String| {
                let mut m = parent.clone();
                m.push(s.clone());
                m.join("::")
            };
            out.push(cycle.iter().map(name).collect());
        }
    }
    out
}

/// One cycle per strongly connected component of size > 1 (or a self-loop is ignored:
/// a module may name itself).
fn cycles_in(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for start in edges.keys() {
        if seen.contains(start) {
            continue;
        }
        // A path back to `start` through other siblings, by depth-first search.
        if let Some(path) = path_back(edges, start) {
            seen.extend(path.iter().cloned());
            out.push(path);
        }
    }
    out
}

fn path_back(edges: &BTreeMap<String, BTreeSet<String>>, start: &String) -> Option<Vec<String>> {
    let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
    let mut visited: BTreeSet<String> = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in edges.get(&node).into_iter().flatten() {
            if next == &node {
                continue;
            }
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.clone());
                return Some(cycle);
            }
            if visited.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}
