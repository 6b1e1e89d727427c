//! The source tree's layering, as `lib.rs` states it: every `crate::`/`super::` path in `src/` points to a
//! unit of the same level or a lower one, and the units' import graph has no cycle. A unit is a file, or a
//! directory module whose files work on one type together (`page::heap` with its page cache and scavenger,
//! `object::sizeclass` with its table and generator, `malloc` with its paths), or one of `source`.
//!
//! Levels, bottom up: 0 the platform contracts (`cpu`, `source`) and `lib.rs`'s constants; 1 the page level;
//! 2 `check`; 3 the object level; 4 `stats`; 5 `malloc`; 6 the platform adapters (`hosted`, `x86_64`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `(unit, level)`, most specific first where one is a prefix of another.
const UNITS: &[(&str, u32)] = &[
    ("cpu", 0),
    ("source", 0),
    ("page::fixalloc", 1),
    ("page::pagealloc", 1),
    ("page::span", 1),
    ("page::heap", 1),
    ("page", 1),
    ("check", 2),
    ("object::sizeclass", 3),
    ("object::class", 3),
    ("object::central", 3),
    ("object::cpucache", 3),
    ("object", 3),
    ("stats", 4),
    ("malloc", 5),
    ("hosted", 6),
    ("x86_64", 6),
];

fn unit_of(path: &str) -> (&'static str, u32) {
    for &(u, level) in UNITS {
        if path == u || path.starts_with(&format!("{u}::")) {
            return (u, level);
        }
    }
    // A crate-root item (`crate::PAGE_SIZE`, `crate::Malloc` re-export is not used inside the crate).
    ("lib", 0)
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a source file: `src/page/heap/grow.rs` → `page::heap::grow`, `mod.rs` → its dir.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b` and `super::a` path in the code (comments and strings with `::` aside).
fn paths_in(code: &str, module: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let line = line.split("//").next().unwrap();
        for (i, _) in line.match_indices("crate::").chain(line.match_indices("super::")) {
            if i > 0 && line.as_bytes()[i - 1].is_ascii_alphanumeric() {
                continue;
            }
            let rest: String =
                line[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
            let mut segs: Vec<&str> = rest.split("::").filter(|s| !s.is_empty()).collect();
            let mut base: Vec<String> = Vec::new();
            if segs[0] == "super" {
                // `super` is the parent module (`module_of` already maps `mod.rs` to its directory).
                base = module.to_vec();
                base.pop();
                while segs.first() == Some(&"super") {
                    segs.remove(0);
                    if segs.first() == Some(&"super") {
                        base.pop();
                    }
                }
            } else {
                segs.remove(0);
            }
            base.extend(segs.iter().map(|s| s.to_string()));
            out.push(base.join("::"));
        }
    }
    out
}

#[test]
fn every_import_points_down_and_units_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut upward = Vec::new();
    for f in &files {
        let module = module_of(&src, f);
        if module.is_empty() {
            continue; // lib.rs declares the modules
        }
        let from = unit_of(&module.join("::"));
        let code = std::fs::read_to_string(f).unwrap();
        for p in paths_in(&code, &module) {
            let to = unit_of(&p);
            if to.0 == from.0 {
                continue;
            }
            if to.1 > from.1 {
                upward.push(format!("{} (level {}) imports {p} (level {})", f.display(), from.1, to.1));
            }
            edges.entry(from.0).or_default().insert(to.0);
        }
    }
    assert!(upward.is_empty(), "imports from a higher level:\n{}", upward.join("\n"));
    // Depth-first search for a cycle among units.
    fn visit<'a>(
        u: &'a str,
        edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) {
        match state.get(u) {
            Some(2) => return,
            Some(1) => panic!("import cycle: {} -> {u}", stack.join(" -> ")),
            _ => {}
        }
        state.insert(u, 1);
        stack.push(u);
        for &v in edges.get(u).into_iter().flatten() {
            visit(v, edges, state, stack);
        }
        stack.pop();
        state.insert(u, 2);
    }
    let mut state = BTreeMap::new();
    for &u in edges.keys() {
        visit(u, &edges, &mut state, &mut Vec::new());
    }
    // The walk saw the tiers (a broken parser would see nothing and pass).
    assert!(edges.get("object::cpucache").is_some_and(|e| e.contains("object::central") && e.contains("page::heap")));
    assert!(edges.get("malloc").is_some_and(|e| e.contains("object::cpucache")));
}

#[test]
fn the_check_catches_an_upward_import() {
    let module = vec!["page".to_string(), "span".to_string()];
    let paths = paths_in("use crate::object::sizeclass::obj_index;\n// crate::malloc in a comment\n", &module);
    assert_eq!(paths, ["object::sizeclass::obj_index"]);
    assert!(unit_of(&paths[0]).1 > unit_of("page::span").1);
    let heap = vec!["page".to_string(), "heap".to_string(), "grow".to_string()];
    assert_eq!(paths_in("use super::Heap;", &heap), ["page::heap::Heap"]);
    let heap_mod = vec!["page".to_string(), "heap".to_string()];
    assert_eq!(paths_in("use super::span::Span;", &heap_mod), ["page::span::Span"]);
}
