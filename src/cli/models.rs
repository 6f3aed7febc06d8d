//! `slm-chat models`: the catalogue, what is downloaded, and `--fetch`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;

use super::Exit;
use slm_chat::bench::SYNTHETIC_SEED;
use slm_chat::config::Config;
use slm_chat::model::{self, synthetic};

#[derive(clap::Args, Debug)]
pub struct ModelsArgs {
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
    fetch: Option<String>,
    /// Write a model of SHAPE on random weights (those of `bench --synthetic`) as a GGUF
    /// file, with a byte-level tokenizer and ChatML: every command runs on it with --model
    /// FILE, no download (for checking a machine, not for answers).
    #[arg(
        long,
        value_enum,
        value_name = "SHAPE",
        requires = "out",
        conflicts_with = "fetch"
    )]
    synthetic: Option<synthetic::Shape>,
    /// Where --synthetic writes the file.
    #[arg(long, value_name = "FILE", requires = "synthetic")]
    out: Option<PathBuf>,
}

pub fn run(config: &Config, args: ModelsArgs) -> Result<ExitCode> {
    if let (Some(shape), Some(out)) = (args.synthetic, &args.out) {
        let folder = out.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(folder) = folder.filter(|p| !p.is_dir()) {
            return Err(Exit {
                message: format!(
                    "cannot write {}: there is no folder {}",
                    out.display(),
                    folder.display()
                ),
                code: 2,
            }
            .into());
        }
        eprintln!("slm-chat: writing {} on random weights", shape.name());
        let bytes = synthetic::write_gguf(shape, SYNTHETIC_SEED, out)?;
        println!(
            "{}: synthetic {} (random weights), {} MB; use it with --model {}",
            out.display(),
            shape.name(),
            bytes / 1_000_000,
            out.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let dir = config.models_dir();
    let say = &mut |m: &str| eprintln!("slm-chat: {m}");
    match args.fetch.as_deref() {
        None => {}
        Some("") => {
            model::ensure_default_model(&dir, say)?;
            model::ensure_embedder(&dir, say)?;
        }
        Some(name) => {
            let Some(m) = model::catalogue_model(name) else {
                let known: Vec<&str> = model::CATALOGUE.iter().map(|m| m.name).collect();
                return Err(Exit {
                    message: format!(
                        "unknown model '{name}': the catalogue has {}",
                        known.join(", ")
                    ),
                    code: 2,
                }
                .into());
            };
            model::ensure_model(m, &dir, say)?;
        }
    }
    let state = |ready: bool| if ready { "ready" } else { "not downloaded" };
    println!("models folder: {}", dir.display());
    for m in model::CATALOGUE {
        println!(
            "{:<20} {:>6} MB  {:<15} {}",
            m.name,
            m.bytes / 1_000_000,
            state(m.present(&dir)),
            m.about
        );
        println!("{:<20} {}", "", m.path(&dir).display());
        println!("{:<20} {} · SHA-256 {}", "", m.source(), m.sha256);
    }
    let embedder = dir.join(model::EMBEDDER_DIR);
    println!(
        "(embedder)               88 MB  {:<15} all-MiniLM-L6-v2 sentence embedder, for dense search",
        state(model::embedder_present(&dir))
    );
    println!("{:<20} {}", "", embedder.display());
    if !config.model.path.is_empty() {
        let p = Path::new(&config.model.path);
        let state = if p.exists() || model::catalogue_model(&config.model.path).is_some() {
            "known"
        } else {
            "missing"
        };
        println!("selected: {}  {state}", config.model.path);
    }
    let listed: Vec<PathBuf> = model::CATALOGUE
        .iter()
        .map(|m| m.path(&dir))
        .chain([embedder])
        .collect();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut others: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !listed.contains(p))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "gguf") || p.join("config.json").is_file()
            })
            .collect();
        others.sort();
        for p in others {
            println!("cached   {}", p.display());
        }
    }
    println!("Catalogue models download on first use (--model NAME) or with `slm-chat models --fetch NAME`.");
    println!("The Qwen2.5-Coder models are coder-tuned: they are here to measure speed, memory and the pipeline on bigger models.");
    println!("(any LLaMA-family GGUF file or Hugging Face folder works with --model PATH)");
    Ok(ExitCode::SUCCESS)
}
