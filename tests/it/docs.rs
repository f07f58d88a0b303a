//! The documentation against the code: the README's examples are the files
//! the tests run, and every link into the repository resolves.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The fenced code blocks of a Markdown text with their info string.
fn code_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, String, usize)> = None;
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    open = Some((info.trim().to_owned(), String::new(), indent));
                }
            }
            Some((info, body, indent)) => {
                if trimmed.starts_with("```") {
                    blocks.push((std::mem::take(info), std::mem::take(body)));
                    open = None;
                } else {
                    body.push_str(line.get(*indent..).unwrap_or(line.trim_start()));
                    body.push('\n');
                }
            }
        }
    }
    blocks
}

/// The README's Python consumer is `examples/remind.py`, which the
/// `make run` test runs through `tidemark consume`.
#[test]
fn readme_python_consumer_is_examples_remind_py() {
    let readme = read(&repo().join("README.md"));
    let file = read(&repo().join("examples/remind.py"));
    let shown: Vec<String> = code_blocks(&readme)
        .into_iter()
        .filter(|(info, body)| info == "python" && body.contains("remind.py"))
        .map(|(_, body)| body)
        .collect();
    assert_eq!(shown.len(), 1, "one remind.py block in the README");
    assert_eq!(shown[0], file, "the README's remind.py and examples/remind.py differ");
}
