//! The command line: clap arguments, settings layering, and wiring of the library's parts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{user_config_path, Config};
use crate::document::{self, LoadOptions, PdfWorkerArgs};
use crate::engine::{self, AskSettings, Method};
use crate::model::{self, DeviceChoice, Llm, SamplingParams};
use crate::{bench, sys};

#[derive(Parser, Debug)]
#[command(
    name = "slm-chat",
    version,
    about = "Ask questions about long documents and whole books with a small local model"
)]
pub struct Args {
    /// A GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long, global = true, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Where to run: auto, cpu or cuda.
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<DeviceChoice>,
    /// Settings file to use instead of the user's config.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Open FILE (PDF, EPUB, Markdown or text) in the terminal app.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Answer one question about a document; the answer streams to stdout.
    Ask {
        /// A PDF, EPUB, Markdown or plain-text file.
        file: PathBuf,
        question: String,
        /// How the document reaches the model.
        #[arg(long, value_enum, default_value_t = Method::Rag)]
        method: Method,
        /// Print one JSON object (answer, figures) instead of streaming text.
        #[arg(long)]
        json: bool,
        /// Most tokens in the answer.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// 0 = greedy.
        #[arg(long)]
        temperature: Option<f64>,
    },
    /// Print the text slm-chat reads from FILE, with page markers (or as JSON).
    Extract {
        file: PathBuf,
        /// Print the document (text, pages, sections, notes) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure prefill, encode and decode speed and memory on this machine.
    Bench {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Runs per figure (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Prompt lengths for the prefill figures.
        #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
        prefill: Vec<usize>,
    },
    /// List the models slm-chat can use; --fetch downloads the default one now.
    Models {
        #[arg(long)]
        fetch: bool,
    },
    /// Show where settings come from, or the settings in force.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
    #[command(name = "__pdf-worker", hide = true)]
    PdfWorker(PdfWorkerArgs),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// The user's config.toml path (it need not exist).
    Path,
    /// The settings in force after defaults, config file and environment.
    Show,
}

/// A failure with its own exit code (documents have one per kind of bad input).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub message: String,
    pub code: u8,
}

/// Run the command line; errors carry the text to print and the exit code.
pub fn run(args: Args) -> Result<ExitCode> {
    match &args.command {
        Some(Command::PdfWorker(worker)) => return Ok(document::run_pdf_worker(worker)),
        // Where the settings file goes must be answerable even when that file is broken.
        Some(Command::Config {
            what: ConfigCommand::Path,
        }) => {
            println!("{}", user_config_path().display());
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(m) = &args.model {
        config.model.path = m
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("--model {}: the path is not valid UTF-8", m.display()))?
            .to_string();
    }
    if let Some(d) = args.device {
        config.model.device = d;
    }
    config.validate()?;
    let command = match (args.command, args.file) {
        (Some(c), _) => c,
        (None, Some(file)) => {
            crate::tui::run(crate::tui::Options {
                file,
                config,
                history_dir: None,
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        (None, None) => {
            return Err(Exit {
                message: "give a FILE to open, or a command (see `slm-chat --help`)".into(),
                code: 2,
            }
            .into())
        }
    };
    match command {
        Command::Ask {
            file,
            question,
            method,
            json,
            max_tokens,
            temperature,
        } => {
            if let Some(n) = max_tokens {
                config.generate.max_tokens = n;
            }
            if let Some(t) = temperature {
                config.generate.temperature = t;
            }
            config.validate()?;
            ask(&config, &file, &question, method, json)
        }
        Command::Extract { file, json } => extract(&file, json),
        Command::Bench {
            json,
            reps,
            prefill,
        } => {
            let llm = load_model(&config)?;
            let plan = bench::BenchPlan {
                prefill_sizes: prefill,
                reps,
            };
            let report = bench::run(&llm, &plan, &mut |m| eprintln!("{m}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Models { fetch } => models(&config, fetch),
        Command::Config { what } => {
            match what {
                ConfigCommand::Path => println!("{}", user_config_path().display()),
                ConfigCommand::Show => print!("{}", config.to_toml()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::PdfWorker(_) => unreachable_worker(),
    }
}

fn unreachable_worker() -> Result<ExitCode> {
    Err(anyhow::anyhow!(
        "the PDF worker runs before settings are read"
    ))
}

/// The configured model, or the default one (fetched if missing).
fn model_path(config: &Config) -> Result<PathBuf> {
    if !config.model.path.is_empty() {
        return Ok(PathBuf::from(&config.model.path));
    }
    Ok(model::ensure_default_model(
        &config.models_dir(),
        &mut |m| eprintln!("slm-chat: {m}"),
    )?)
}

fn load_model(config: &Config) -> Result<Llm> {
    let path = model_path(config)?;
    let device = model::select_device(config.model.device)?;
    Ok(model::load(&path, &device)?)
}

/// Load a document; `all_notes` prints every note (for `extract`), otherwise only the
/// warning that matters when asking: pages that could not be read.
fn load_document(file: &Path, all_notes: bool) -> Result<document::Document> {
    let exe = std::env::current_exe().context("cannot find slm-chat's own executable")?;
    let doc = document::load(file, &LoadOptions::new(exe)).map_err(|e| Exit {
        message: e.to_string(),
        code: e.exit_code(),
    })?;
    if all_notes || !doc.failed_pages.is_empty() {
        for note in &doc.notes {
            eprintln!("slm-chat: {}: {note}", file.display());
        }
    }
    Ok(doc)
}

fn ask(
    config: &Config,
    file: &Path,
    question: &str,
    method: Method,
    json: bool,
) -> Result<ExitCode> {
    let doc = load_document(file, false)?;
    let llm = load_model(config)?;
    let g = &config.generate;
    let params = SamplingParams {
        temperature: g.temperature as f32,
        top_p: g.top_p as f32,
        seed: g.seed,
        max_tokens: g.max_tokens,
    };
    let cancel = AtomicBool::new(false);
    let mut out = std::io::stdout().lock();
    let mut stream = |piece: &str| {
        if !json {
            // A closed pipe ends the output, not the answer's bookkeeping.
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let settings = AskSettings {
        method,
        chunk_tokens: config.rag.chunk_tokens,
        rag_tokens: config.rag.max_tokens,
    };
    let answer = engine::ask(
        &llm,
        &doc,
        question,
        &settings,
        &params,
        &cancel,
        &mut stream,
    )?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&answer)?).ok();
    } else {
        writeln!(out).ok();
        out.flush().ok();
        for src in &answer.sources {
            eprintln!(
                "slm-chat: source: chunk {} · pages {}–{} · score {:.1} · {}",
                src.chunk, src.first_page, src.last_page, src.score, src.preview
            );
        }
        eprintln!(
            "slm-chat: {} · {} of {} document tokens seen · first token {:.0} ms · prefill {:.0} tok/s · decode {:.1} tok/s · peak RSS {}",
            answer.stop,
            answer.kept_tokens,
            answer.document_tokens,
            answer.timings.first_token_ms,
            answer.timings.prefill_tok_s,
            answer.timings.decode_tok_s,
            answer.memory.peak_rss_bytes.map(sys::human_bytes).unwrap_or_else(|| "?".into()),
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn extract(file: &Path, json: bool) -> Result<ExitCode> {
    let doc = load_document(file, true)?;
    let text = if json {
        serde_json::to_string_pretty(&doc)? + "\n"
    } else {
        document::render_with_page_markers(&doc)
    };
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(ExitCode::from(doc.exit_code()))
}

fn models(config: &Config, fetch: bool) -> Result<ExitCode> {
    let dir = config.models_dir();
    if fetch {
        model::ensure_default_model(&dir, &mut |m| eprintln!("slm-chat: {m}"))?;
    }
    let default = model::default_model_path(&dir);
    let state = if model::default_model_present(&dir) {
        "ready"
    } else {
        "not downloaded yet (fetched on first use, or run `slm-chat models --fetch`)"
    };
    println!("default  {}  {state}", default.display());
    if !config.model.path.is_empty() {
        let p = Path::new(&config.model.path);
        let state = if p.exists() { "found" } else { "missing" };
        println!("selected {}  {state}", p.display());
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut others: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p != &default)
            .filter(|p| {
                p.extension().is_some_and(|x| x == "gguf") || p.join("config.json").is_file()
            })
            .collect();
        others.sort();
        for p in others {
            println!("cached   {}", p.display());
        }
    }
    println!("(any LLaMA-family GGUF file or Hugging Face folder works with --model PATH)");
    Ok(ExitCode::SUCCESS)
}
