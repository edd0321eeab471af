//! The module import graph of each library crate has no cycles: no two files import each other,
//! directly or through others. A file imports another when it names an item of it through a
//! `crate::` or `super::` path (a re-export is followed to the file that defines the item) or, in
//! a parent module, through a child module's name outside its `mod` and `use` lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`["moe", "experts"]`) → its file and source text without comment lines.
type Modules = BTreeMap<Vec<String>, (PathBuf, String)>;

fn modules(src: &Path) -> Modules {
    fn walk(dir: &Path, prefix: &[String], out: &mut Modules) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if path.extension().is_some_and(|e| e == "rs") && name != "main" {
                // `main.rs` is the binary, a crate of its own that uses the library by name.
                let mut p = prefix.to_vec();
                if name != "mod" && name != "lib" {
                    p.push(name);
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let code: Vec<&str> =
                    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
                out.insert(p, (path, code.join("\n")));
            }
        }
    }
    let mut out = Modules::new();
    walk(src, &[], &mut out);
    out
}

fn ident_len(s: &str) -> usize {
    s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len())
}

/// Every path written after `start` in `text` (`crate::a::{b::C, d}` gives `a::b::C` and `a::d`),
/// as segments.
fn paths_after(text: &str, start: &str) -> Vec<Vec<String>> {
    fn parse(s: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
        let mut path = prefix;
        let mut i = 0;
        loop {
            let rest = &s[i..];
            if let Some(group) = rest.strip_prefix('{') {
                let mut j = 0;
                loop {
                    let item = group[j..].trim_start();
                    j = group.len() - item.len();
                    if item.starts_with('}') {
                        return i + 1 + j + 1;
                    }
                    j += parse(item, path.clone(), out);
                    let after = group[j..].trim_start();
                    j = group.len() - after.len();
                    if after.starts_with(',') {
                        j += 1;
                    }
                    if j >= group.len() {
                        return s.len();
                    }
                }
            }
            let n = ident_len(rest);
            if n == 0 {
                out.push(path);
                return i;
            }
            path.push(rest[..n].to_string());
            i += n;
            if s[i..].starts_with("::") {
                i += 2;
            } else {
                out.push(path);
                return i;
            }
        }
    }
    let mut out = Vec::new();
    for (at, _) in text.match_indices(start) {
        let before = text[..at].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        parse(&text[at + start.len()..], Vec::new(), &mut out);
    }
    out
}

/// The file defining what `path` (absolute, from the crate root) names, following `pub use`
/// re-exports of a module file.
fn resolve(mods: &Modules, path: &[String], depth: usize) -> Option<PathBuf> {
    let (len, (file, text)) =
        (0..=path.len()).rev().find_map(|n| mods.get(&path[..n]).map(|m| (n, m)))?;
    let Some(item) = path.get(len) else { return Some(file.clone()) };
    if depth < 8 {
        let statements = text.split(';').filter_map(|st| {
            let at = st
                .find("pub use ")
                .map(|i| i + 8)
                .or_else(|| st.find("pub(crate) use ").map(|i| i + 15))?;
            Some(&st[at..])
        });
        for body in statements {
            let body: String = body.split_whitespace().collect();
            let (base, relative) = match body.strip_prefix("crate::") {
                Some(b) => (Vec::new(), b.to_string()),
                None => (path[..len].to_vec(), body.clone()),
            };
            for p in paths_after(&format!(" {relative}"), " ") {
                if p.last() == Some(item) {
                    let full: Vec<String> = base.iter().cloned().chain(p).collect();
                    return resolve(mods, &full, depth + 1).or(Some(file.clone()));
                }
            }
        }
    }
    Some(file.clone())
}

/// The text outside and inside inline module blocks (`mod name { .. }`).
fn split_inline_modules(text: &str) -> (String, String) {
    let (mut outside, mut inside) = (String::new(), String::new());
    let mut rest = text;
    while let Some(at) = rest.find("mod ") {
        let head = &rest[at + 4..];
        let name = ident_len(head);
        let opens = name > 0 && head[name..].trim_start().starts_with('{');
        let starts_word =
            rest[..at].chars().last().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        if !(opens && starts_word) {
            outside.push_str(&rest[..at + 4]);
            rest = &rest[at + 4..];
            continue;
        }
        outside.push_str(&rest[..at]);
        let open = at + 4 + name + (head[name..].len() - head[name..].trim_start().len());
        let mut depth = 0;
        let mut end = rest.len();
        for (i, c) in rest[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        inside.push_str(&rest[at..end]);
        rest = &rest[end..];
    }
    outside.push_str(rest);
    (outside, inside)
}

fn edges(mods: &Modules) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut graph: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (module, (file, text)) in mods {
        let mut targets = BTreeSet::new();
        for p in paths_after(text, "crate::") {
            targets.extend(resolve(mods, &p, 0));
        }
        // `super::` is the parent module, except inside an inline module (`mod tests { .. }`),
        // where it is this file's own module.
        let (outside, inside) = split_inline_modules(text);
        let parent = &module[..module.len().saturating_sub(1)];
        for (base, part) in [(parent, &outside), (&module[..], &inside)] {
            for p in paths_after(part, "super::") {
                let full: Vec<String> = base.iter().cloned().chain(p).collect();
                targets.extend(resolve(mods, &full, 0));
            }
        }
        // A parent using a child module's items in its code (not in `mod` or `use` lines).
        let code: String = text
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !(t.starts_with("mod ")
                    || t.starts_with("pub mod ")
                    || t.starts_with("pub(crate) mod ")
                    || t.contains("use "))
            })
            .collect::<Vec<_>>()
            .join("\n");
        for (child, _) in
            mods.iter().filter(|(m, _)| m.len() == module.len() + 1 && m.starts_with(module))
        {
            let name = child.last().unwrap();
            for p in paths_after(&code, &format!("{name}::")) {
                let full: Vec<String> = child.iter().cloned().chain(p).collect();
                targets.extend(resolve(mods, &full, 0));
            }
        }
        targets.remove(file);
        graph.insert(file.clone(), targets);
    }
    graph
}

/// A cycle of the graph, if it has one.
fn find_cycle(graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    fn visit(
        n: &PathBuf,
        g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        state: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m) {
                Some(1) => {
                    let at = stack.iter().position(|x| x == m).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if !state.contains_key(n) {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_path_parser_reads_groups_and_the_checker_finds_a_planted_cycle() {
    let paths = paths_after("use crate::a::{b::C, d::{E, f}}; let x = crate::g::h();", "crate::");
    let names: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(names, ["a::b::C", "a::d::E", "a::d::f", "g::h"]);
    let (a, b, c) = (PathBuf::from("a.rs"), PathBuf::from("b.rs"), PathBuf::from("c.rs"));
    let mut graph = BTreeMap::from([
        (a.clone(), BTreeSet::from([b.clone()])),
        (b.clone(), BTreeSet::from([c.clone()])),
        (c.clone(), BTreeSet::new()),
    ]);
    assert_eq!(find_cycle(&graph), None);
    graph.get_mut(&c).unwrap().insert(a.clone());
    assert_eq!(find_cycle(&graph), Some(vec![a.clone(), b, c, a]));
}

#[test]
fn no_two_files_of_a_library_crate_import_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for krate in ["deepseek-core", "deepseek-train", "deepseek-infer"] {
        let mods = modules(&root.join(krate).join("src"));
        let graph = edges(&mods);
        let edges: usize = graph.values().map(BTreeSet::len).sum();
        assert!(edges > 0, "{krate}: the scan found no imports");
        if krate == "deepseek-core" {
            // Known edges, found through a group import, a `super::` path and a re-export.
            let src = root.join(krate).join("src");
            let has = |from: &str, to: &str| graph[&src.join(from)].contains(&src.join(to));
            assert!(has("mla.rs", "cache.rs") && !has("cache.rs", "mla.rs"));
            assert!(has("moe/experts.rs", "moe/dispatch.rs"));
            assert!(
                has("fp8/training.rs", "fp8/block.rs"),
                "super::fake_quantize_blocks, re-exported"
            );
        }
        if let Some(cycle) = find_cycle(&graph) {
            let names: Vec<String> = cycle
                .iter()
                .map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string())
                .collect();
            panic!("{krate}: import cycle {}", names.join(" → "));
        }
    }
}
