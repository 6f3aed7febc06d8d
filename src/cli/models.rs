//! `slm-chat models`: the catalogue, what is downloaded, and `--fetch`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;

use super::Exit;
use slm_chat::config::Config;
use slm_chat::model;

pub fn run(config: &Config, fetch: Option<String>) -> Result<ExitCode> {
    let dir = config.models_dir();
    let say = &mut |m: &str| eprintln!("slm-chat: {m}");
    match fetch.as_deref() {
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
