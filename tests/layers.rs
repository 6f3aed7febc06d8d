//! Imports run one way (DESIGN.md): document and model at the bottom, then tree, store,
//! engine, the measuring commands, the TUI, and the settings on top; the binary's `cli`
//! sits above them all and is not checked. A `crate::` path from a module to one of the
//! same or a higher layer fails here, with the file and the line.

use std::path::{Path, PathBuf};

/// Each library module's layer; a module may use only modules of lower layers.
const LAYERS: &[(&str, usize)] = &[
    ("sys", 0),
    ("document", 1),
    ("model", 1),
    ("tree", 2),
    ("store", 3),
    ("engine", 4),
    ("eval", 5),
    ("bench", 5),
    ("tui", 6),
    ("config", 7),
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src readable").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules a line names through `crate::`, grouped imports included.
fn crate_paths(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            out.extend(
                inner
                    .split(',')
                    .filter_map(|p| p.trim().split("::").next())
                    .filter(|m| !m.is_empty())
                    .map(String::from),
            );
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

#[test]
fn imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a path");
        let module = first.as_os_str().to_string_lossy();
        let module = module.trim_end_matches(".rs");
        // The binary (main.rs, cli/) is the top; lib.rs only declares the modules.
        let Some(own) = layer(module) else {
            assert!(
                ["main", "lib", "cli"].contains(&module),
                "{}: module `{module}` has no layer in tests/layers.rs",
                rel.display()
            );
            continue;
        };
        let text = std::fs::read_to_string(file).expect("source readable");
        // A multi-line `use crate::{…}` is read as one line.
        let joined = text.replace(",\n", ", ").replace("{\n", "{");
        for (n, line) in joined.lines().enumerate() {
            for used in crate_paths(line) {
                checked += 1;
                if used == module {
                    continue;
                }
                match layer(&used) {
                    Some(l) if l < own => {}
                    Some(l) => wrong.push(format!(
                        "{} (line ~{}): `{module}` (layer {own}) uses `{used}` (layer {l})",
                        rel.display(),
                        n + 1
                    )),
                    None => wrong.push(format!(
                        "{}: `{used}` is not a module with a layer",
                        rel.display()
                    )),
                }
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} crate paths found: is the parser broken?"
    );
    assert!(
        wrong.is_empty(),
        "imports against the flow:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_parser_reads_grouped_and_inline_paths() {
    assert_eq!(
        crate_paths("use crate::{bench, eval::x, store};"),
        ["bench", "eval", "store"]
    );
    assert_eq!(
        crate_paths("let x = crate::sys::rss(); // crate::tui"),
        ["sys"]
    );
    assert_eq!(
        crate_paths("use crate::tree::search::{self, Budget};"),
        ["tree"]
    );
}
