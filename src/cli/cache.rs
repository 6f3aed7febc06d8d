//! `slm-chat cache`: list, delete, or locate the stored context trees.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use slm_chat::config::Config;
use slm_chat::{store, sys};

#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// Every stored tree: key, state, size, tokens, source file.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Delete stored trees: by key (or its start), by the file they were built from, or all.
    Rm {
        /// Keys, key prefixes, or document files.
        targets: Vec<String>,
        #[arg(long, conflicts_with = "targets")]
        all: bool,
    },
    /// The directory trees are kept in.
    Path,
}

pub fn run(config: &Config, what: CacheCommand) -> Result<ExitCode> {
    let dir = config.trees_dir();
    match what {
        CacheCommand::Path => println!("{}", dir.display()),
        CacheCommand::Ls { json } => {
            let trees = store::list(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&trees)?);
            } else if trees.is_empty() {
                println!("no stored trees in {}", dir.display());
            } else {
                for t in &trees {
                    println!(
                        "{}  {:>9}  {:>8} tokens  {:>5} chunks  {}  {}",
                        t.key,
                        sys::human_bytes(t.bytes),
                        t.tokens,
                        t.chunks,
                        t.state,
                        t.source
                    );
                }
            }
        }
        CacheCommand::Rm { targets, all } => {
            let trees = store::list(&dir)?;
            if !all && targets.is_empty() {
                anyhow::bail!("name the trees to delete (keys from `slm-chat cache ls`, or files), or pass --all");
            }
            let mut doomed: Vec<&store::Listing> = Vec::new();
            for t in &targets {
                // A path names the document: every tree built from its bytes.
                let doc = Path::new(t)
                    .is_file()
                    .then(|| store::hash_file(Path::new(t)))
                    .transpose()?;
                let hits: Vec<&store::Listing> = trees
                    .iter()
                    .filter(|l| {
                        l.key.starts_with(t.as_str())
                            || doc.as_ref().is_some_and(|d| l.key.starts_with(&d[..16]))
                    })
                    .collect();
                if hits.is_empty() {
                    anyhow::bail!("no stored tree matches {t} (see `slm-chat cache ls`)");
                }
                doomed.extend(hits);
            }
            if all {
                doomed = trees.iter().collect();
            }
            doomed.sort_by(|a, b| a.key.cmp(&b.key));
            doomed.dedup_by(|a, b| a.key == b.key);
            for t in doomed {
                store::remove(&t.path)?;
                println!(
                    "removed {}  {}  {}",
                    t.key,
                    sys::human_bytes(t.bytes),
                    t.source
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
