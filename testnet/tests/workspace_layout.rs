//! The workspace's shape, checked on every test run: the top level holds only what the design
//! names (hidden entries and `target/` aside), each module's `//!` layout list names the
//! files beside it (and names no file that is gone), no source file is over 1,000 lines before
//! its `#[cfg(test)] mod tests`, and no function is over 150 lines. Files under `tests/` are
//! exempt from the size limits.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::path::{Path, PathBuf};

/// The crates of the workspace, relative to its root.
const CRATES: &[&str] = &[
    "protocol",
    "transport",
    "node",
    "node/python",
    "testnet",
    "benches",
];

/// What the workspace's top level may hold besides hidden entries and `target/`: the crates,
/// the manifest and lock file, the README, and the tools' configuration files.
const TOP_LEVEL: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    "README.md",
    "protocol",
    "transport",
    "node",
    "testnet",
    "benches",
    "clippy.toml",
    "rustfmt.toml",
];

/// A source file may hold this many lines before its tests.
const MAX_FILE_LINES: usize = 1_000;

/// A function may span this many lines.
const MAX_FUNCTION_LINES: usize = 150;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The `//!` text of a file.
fn module_docs(text: &str) -> String {
    text.lines()
        .take_while(|l| l.starts_with("//!") || l.starts_with("#![") || l.trim().is_empty())
        .filter(|l| l.starts_with("//!"))
        .map(|l| l.trim_start_matches("//!"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `foo.rs` / `a/b.rs` names a doc text mentions.
fn named_files(docs: &str) -> Vec<String> {
    let mut names = Vec::new();
    for word in docs.split(|c: char| !(c.is_ascii_alphanumeric() || "_-/.".contains(c))) {
        let word = word.trim_end_matches('.');
        if word.ends_with(".rs") && word.len() > 3 {
            names.push(word.to_owned());
        }
    }
    names
}

/// For a module root (`lib.rs`, `main.rs`, or `foo.rs` with a `foo/` folder): the folder whose
/// files it declares.
fn module_dir(root: &Path) -> Option<PathBuf> {
    let name = root.file_name()?.to_str()?;
    if name == "lib.rs" {
        return root.parent().map(Path::to_owned);
    }
    let dir = root.with_extension("");
    dir.is_dir().then_some(dir)
}

#[test]
fn layout_lists_match_the_files() {
    let root = workspace_root();
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root.join(krate).join("src");
        for file in rust_files(&src) {
            let Some(dir) = module_dir(&file) else {
                continue;
            };
            let docs = module_docs(&std::fs::read_to_string(&file).unwrap());
            let named = named_files(&docs);
            // Every file of the module is named (by its name, or its path from a parent).
            for child in std::fs::read_dir(&dir).unwrap() {
                let child = child.unwrap().path();
                let Some(child_name) = child.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if child.is_dir()
                    || !child_name.ends_with(".rs")
                    || child == file
                    || ["main.rs", "lib.rs"].contains(&child_name)
                {
                    continue;
                }
                if !named
                    .iter()
                    .any(|n| n.rsplit('/').next() == Some(child_name))
                {
                    problems.push(format!(
                        "{}: its layout list does not name {child_name}",
                        file.strip_prefix(&root).unwrap().display()
                    ));
                }
            }
            // Every file it names exists (relative to the module folder, its parent or src/,
            // or, for a name in a list such as `blob/{get.rs, put.rs}`, below the module folder).
            let below: Vec<PathBuf> = rust_files(&dir);
            for name in &named {
                let candidates = [
                    dir.join(name),
                    dir.parent().unwrap().join(name),
                    src.join(name),
                    root.join(krate).join(name),
                    root.join(name),
                ];
                let nested = !name.contains('/')
                    && below
                        .iter()
                        .any(|f| f.file_name().and_then(|n| n.to_str()) == Some(name.as_str()));
                if !candidates.iter().any(|c| c.is_file()) && !nested {
                    problems.push(format!(
                        "{}: its docs name {name}, which does not exist",
                        file.strip_prefix(&root).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// The start of a function definition at the start of a line: its indentation.
fn function_start(line: &str) -> Option<usize> {
    let trimmed = line.trim_start();
    let indent = line.len() - trimmed.len();
    let mut rest = trimmed;
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "async ",
        "const ",
        "unsafe ",
    ] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    rest.starts_with("fn ").then_some(indent)
}

#[test]
fn no_file_or_function_is_too_long() {
    let root = workspace_root();
    let mut problems = Vec::new();
    for krate in CRATES {
        for file in rust_files(&root.join(krate).join("src")) {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            let shown = file.strip_prefix(&root).unwrap().display().to_string();
            let before_tests = lines
                .iter()
                .position(|l| l.starts_with("#[cfg(test)]"))
                .unwrap_or(lines.len());
            if before_tests > MAX_FILE_LINES {
                problems.push(format!("{shown}: {before_tests} lines before its tests"));
            }
            for (start, line) in lines.iter().enumerate() {
                let Some(indent) = function_start(line) else {
                    continue;
                };
                if line.trim_end().ends_with(';') {
                    continue; // A declaration (trait method without a body).
                }
                let close = format!("{}}}", " ".repeat(indent));
                let Some(length) = lines[start + 1..].iter().position(|l| *l == close) else {
                    continue;
                };
                let length = length + 2;
                if length > MAX_FUNCTION_LINES {
                    problems.push(format!(
                        "{shown}:{}: a function of {length} lines",
                        start + 1
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_top_level_holds_only_the_named_entries() {
    let root = workspace_root();
    let mut strays: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| {
            !name.starts_with('.') && name != "target" && !TOP_LEVEL.contains(&name.as_str())
        })
        .collect();
    strays.sort();
    assert!(
        strays.is_empty(),
        "{}: not part of the workspace's top level: {strays:?}",
        root.display()
    );
}
