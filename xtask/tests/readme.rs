//! The README's kernel snippets are real code: every code block that follows a line
//! `<!-- verbatim: PATH -->` must appear, line for line (indentation aside), in the file PATH (relative to
//! the repository root), where the build compiles it: `kernel-demo/examples/minimal.rs` (built and booted
//! by `cargo xtask test`) or a doc test in goheap's sources (`/// ` prefixes are stripped before comparing).
//! So a change to the example or the API that the README does not follow fails here.

use std::path::Path;

/// `(path, block lines)` for each marked block of `readme`.
fn marked_blocks(readme: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(path) = line.trim().strip_prefix("<!-- verbatim: ").and_then(|r| r.strip_suffix(" -->")) else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(fence.starts_with("```"), "a code block must follow `{line}` directly, found `{fence}`");
        let block: Vec<String> = lines.by_ref().take_while(|l| !l.starts_with("```")).map(String::from).collect();
        assert!(!block.is_empty(), "empty block after `{line}`");
        out.push((path.to_string(), block));
    }
    out
}

/// A line of a doc test as compared: the doc comment's `/// ` or `//! ` prefix removed, then trimmed.
fn doc_test_line(line: &str) -> &str {
    let t = line.trim();
    let t = t.strip_prefix("///").or_else(|| t.strip_prefix("//!")).map_or(t, |r| r.strip_prefix(' ').unwrap_or(r));
    t.trim()
}

/// Whether `block` appears in `text` as consecutive lines (trimmed); with `doc_tests`, in the text of the
/// doc comments (a crate source whose doc tests the README quotes).
fn contains_lines(text: &str, block: &[String], doc_tests: bool) -> bool {
    let hay: Vec<&str> = text.lines().map(|l| if doc_tests { doc_test_line(l) } else { l.trim() }).collect();
    let needle: Vec<&str> = block.iter().map(|l| l.trim()).collect();
    hay.windows(needle.len()).any(|w| w == needle.as_slice())
}

#[test]
fn readme_kernel_snippets_appear_verbatim_in_compiled_sources() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = marked_blocks(&readme);
    // The kernel section quotes the config, the heap, init, the timer handler, the SMP heap and the idle call.
    assert!(blocks.len() >= 6, "only {} marked snippet(s) in README.md", blocks.len());
    for (path, block) in &blocks {
        let text = std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let doc_tests = path.starts_with("src/");
        assert!(
            contains_lines(&text, block, doc_tests),
            "README snippet not found verbatim in {path}:\n{}",
            block.join("\n")
        );
    }
}

#[test]
fn the_comparison_catches_a_changed_line() {
    let text = "fn a() {\n    let x = 1;\n    let y = 2;\n}\n/// use b;\n/// fn c() {}\n";
    let lines = |b: &[&str]| b.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let ok = |b: &[&str]| contains_lines(text, &lines(b), false);
    assert!(ok(&["let x = 1;", "let y = 2;"]));
    assert!(!ok(&["use b;", "fn c() {}"]), "outside doc tests the `/// ` counts");
    assert!(contains_lines(text, &lines(&["use b;", "fn c() {}"]), true), "doc-test lines match without it");
    assert!(!ok(&["let x = 1;", "let y = 3;"]));
    assert!(!ok(&["let y = 2;", "let x = 1;"]), "order matters");
    let readme = "text\n<!-- verbatim: f.rs -->\n```rust\nlet x = 1;\n```\nmore\n";
    assert_eq!(marked_blocks(readme), vec![("f.rs".to_string(), vec!["let x = 1;".to_string()])]);
}
