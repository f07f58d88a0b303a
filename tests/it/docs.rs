//! The documentation against the code: the README's examples are the files
//! the tests run, and every link into the repository resolves.

use std::path::PathBuf;

use testkit::{read_file as read, repo_dir as repo};

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

/// The Markdown files a reader follows links through.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md"), repo().join("CHANGELOG.md"), repo().join("deploy/README.md")];
    for entry in std::fs::read_dir(repo().join("docs")).expect("docs/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The Python consumer shown in the README (and in docs/CONSUMERS.md) is
/// `examples/remind.py`, which the `make run` test runs through
/// `tidemark consume`.
#[test]
fn readme_python_consumer_is_examples_remind_py() {
    let file = read(&repo().join("examples/remind.py"));
    for doc in ["README.md", "docs/CONSUMERS.md"] {
        let shown: Vec<String> = code_blocks(&read(&repo().join(doc)))
            .into_iter()
            .filter(|(info, body)| info == "python" && body.contains("remind.py"))
            .map(|(_, body)| body)
            .collect();
        assert_eq!(shown.len(), 1, "one remind.py block in {doc}");
        assert_eq!(shown[0], file, "{doc}'s remind.py and examples/remind.py differ");
    }
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown text's headings (repeats get `-1`, `-2`…).
fn anchors(markdown: &str) -> Vec<String> {
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out = Vec::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if in_code || hashes == 0 || hashes > 6 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let s = slug(&line[hashes..]);
        let n = seen.entry(s.clone()).or_insert(0);
        out.push(if *n == 0 { s.clone() } else { format!("{s}-{n}") });
        *n += 1;
    }
    out
}

/// The targets of a Markdown text's inline links `[text](target)`,
/// outside code blocks and code spans.
fn links(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // Drop code spans: a `](` inside one is not a link.
        let text: String = line.split('`').step_by(2).collect::<Vec<_>>().join("");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            out.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    out
}

/// Every relative link of the README, of docs/ and of deploy/README.md
/// resolves: the file (or directory) exists, and an `#anchor` is a heading
/// of the target. The README links into every file of docs/.
#[test]
fn links_into_docs_and_the_repository_resolve() {
    let mut checked = 0;
    let mut readme_to_docs = std::collections::BTreeSet::new();
    for file in markdown_files() {
        let text = read(&file);
        let dir = file.parent().expect("a directory");
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() { file.clone() } else { dir.join(path) };
            assert!(
                resolved.exists(),
                "{}: link {target:?} points at {}, which does not exist",
                file.display(),
                resolved.display()
            );
            if let Some(anchor) = anchor {
                assert!(
                    resolved.extension().is_some_and(|e| e == "md"),
                    "{}: anchor link {target:?} into a non-Markdown file",
                    file.display()
                );
                let known = anchors(&read(&resolved));
                assert!(
                    known.iter().any(|a| a == anchor),
                    "{}: {target:?}: no heading #{anchor} in {} (it has {known:?})",
                    file.display(),
                    resolved.display()
                );
            }
            if file.ends_with("README.md") && file.parent() == Some(repo().as_path()) && path.starts_with("docs/") {
                readme_to_docs.insert(path.to_owned());
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} links found: is the link parser broken?");
    for entry in std::fs::read_dir(repo().join("docs")).unwrap() {
        let name = format!("docs/{}", entry.unwrap().file_name().to_string_lossy());
        assert!(readme_to_docs.contains(&name), "the README never links to {name}");
    }
}

/// The README is for a newcomer: short, with the sections a user needs,
/// and says where the binary is and how to install it.
#[test]
fn readme_has_what_a_newcomer_needs() {
    let readme = read(&repo().join("README.md"));
    let lines = readme.lines().count();
    assert!(lines < 600, "the README has {lines} lines: move depth into docs/");
    let headings = anchors(&readme);
    for section in [
        "install",
        "quick-start",
        "how-it-works",
        "wire-format",
        "command-line",
        "consumers",
        "configuration",
        "operations",
        "guarantees-and-what-they-rest-on",
        "performance",
        "security",
    ] {
        assert!(headings.iter().any(|h| h == section), "no section #{section} in the README: {headings:?}");
    }
    let makefile = read(&repo().join("Makefile"));
    assert!(makefile.contains("BIN := target/release/tidemark"), "make build's binary moved");
    for says in ["cargo install --path .", "target/release/tidemark", "make build"] {
        assert!(readme.contains(says), "the README does not say {says:?}");
    }
}

/// The production block that opens `config/tidemark.toml`, uncommented,
/// is a valid configuration with the keys it names.
#[test]
fn bundled_config_opens_with_a_valid_production_block() {
    let text = read(&repo().join("config/tidemark.toml"));
    let rule = "# ---------------------------------------------------------------------------";
    let mut parts = text.split(rule);
    let (head, block) = (parts.next().expect("a head"), parts.next().expect("the production block"));
    assert!(head.lines().count() < 5, "the file opens with the production block");
    let toml: String = block
        .lines()
        .filter_map(|l| l.strip_prefix("#   "))
        .map(|l| l.split(" # ").next().unwrap_or(l).trim_end())
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    for key in ["url", "password_file", "groups", "addr", "output_max_age", "dead_maxlen"] {
        assert!(toml.contains(&format!("{key} = ")), "the production block does not show {key}:\n{toml}");
    }
    assert!(block.contains("WITHOUT ANY GROUP, :out IS NEVER TRIMMED"), "{block}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("production.toml");
    std::fs::write(&file, &toml).unwrap();
    let mut overrides = tidemark::config::Overrides::default();
    overrides.config_file = Some(file);
    let raw = tidemark::config::RawConfig::load(&overrides, &NoEnv).unwrap_or_else(|e| panic!("{e}:\n{toml}"));
    assert_eq!(raw.daemon.groups, ["billing", "mail"]);
    assert_eq!(raw.http.addr.as_deref(), Some("0.0.0.0:9464"));
    assert_eq!(raw.housekeeping.output_max_age, std::time::Duration::from_secs(7 * 86_400));
}

/// No environment: only the file and the defaults count.
struct NoEnv;

impl tidemark::config::Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
    fn vars(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The README's headless-Chromium screenshot command, as written (with
/// `--no-sandbox`, which it says to add as root), takes a real screenshot
/// of a real daemon's dashboard; and with those flags the page has shown
/// its data before Chromium is done (that is what the budget is for).
#[test]
fn readme_screenshot_command_works() {
    use testkit::{Daemon, RedisServer};
    let browser = crate::dashboard::chromium();
    let readme = read(&repo().join("README.md"));
    let command = code_blocks(&readme)
        .into_iter()
        .flat_map(|(_, body)| body.lines().map(str::to_owned).collect::<Vec<_>>())
        .find(|l| l.starts_with("chromium --headless"))
        .expect("a chromium --headless command in the README");
    assert!(command.contains("--virtual-time-budget="), "{command}");
    let redis = RedisServer::start();
    let daemon = Daemon::spawn(&["run", "--redis-url", &redis.url(), "--consumer", "d1", "--http", "127.0.0.1:0"], &[]);
    let addr = daemon.http_addr(std::time::Duration::from_secs(60)).to_string();
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile");
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(&browser)
            .args(&args)
            .arg("--no-sandbox")
            .arg(format!("--user-data-dir={}", profile.display()))
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .output()
            .expect("run chromium");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let args: Vec<String> = command
        .split_whitespace()
        .skip(1)
        .map(|a| a.replace("http://127.0.0.1:9464/", &format!("http://{addr}/")))
        .collect();
    run(args.clone());
    let png = std::fs::read(dir.path().join("dashboard.png")).expect("the screenshot was written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 1280, "the --window-size of the command");
    // The same flags, the DOM instead of the picture: the data was shown.
    let dom_args: Vec<String> =
        args.into_iter().map(|a| if a.starts_with("--screenshot") { "--dump-dom".to_owned() } else { a }).collect();
    let dom = run(dom_args);
    assert!(dom.contains(r#"data-state="ok""#), "the page had not shown its data:\n{dom}");
}
