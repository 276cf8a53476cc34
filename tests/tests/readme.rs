//! The code the README quotes is the code CI builds: the endpoint guide quotes
//! `examples/src/bin/hello-endpoint.rs` whole, the client and manager guides quote the
//! parts of `embed-client.rs` and `my-nsmgr.rs` between `// guide: begin` and
//! `// guide: end`.

use std::path::PathBuf;

fn repo_file(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The marked excerpts of a source file, without their markers.
fn excerpts(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in source.lines() {
        match (line.trim(), current.as_mut()) {
            ("// guide: begin", None) => current = Some(Vec::new()),
            ("// guide: end", Some(lines)) => {
                out.push(lines.join("\n").trim_matches('\n').to_string());
                current = None;
            }
            (_, Some(lines)) => lines.push(line),
            (_, None) => {}
        }
    }
    assert!(current.is_none(), "a `// guide: begin` without its end");
    out
}

/// The body of the first ```rust,ignore block after `heading`.
fn quoted_after(readme: &str, heading: &str) -> String {
    let at = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let open = "```rust,ignore\n";
    let start = readme[at..].find(open).expect("a rust block") + at + open.len();
    let end = readme[start..].find("\n```\n").expect("a closed block") + start;
    readme[start..end].to_string()
}

#[test]
fn the_endpoint_guide_quotes_hello_endpoint_whole() {
    let readme = repo_file("README.md");
    let source = repo_file("examples/src/bin/hello-endpoint.rs");
    assert_eq!(
        quoted_after(&readme, "## Write your own endpoint"),
        source.trim_end(),
        "README's endpoint guide and hello-endpoint.rs differ"
    );
}

#[test]
fn the_client_and_manager_guides_quote_the_programs() {
    let readme = repo_file("README.md");
    for program in ["embed-client", "my-nsmgr"] {
        let source = repo_file(&format!("examples/src/bin/{program}.rs"));
        let parts = excerpts(&source);
        assert!(!parts.is_empty(), "{program}.rs has no guide excerpt");
        for part in parts {
            assert!(
                readme.contains(&format!("```rust,ignore\n{part}\n```")),
                "README does not quote this part of {program}.rs:\n{part}"
            );
        }
    }
}

#[test]
fn excerpts_are_found_between_their_markers() {
    let source =
        "a\n// guide: begin\nb\n  c\n// guide: end\nd\n    // guide: begin\ne\n// guide: end\n";
    assert_eq!(
        excerpts(source),
        vec!["b\n  c".to_string(), "e".to_string()]
    );
}
