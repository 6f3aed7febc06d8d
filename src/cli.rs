//! The command line: clap arguments, settings layering, and wiring of the library's parts.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{user_config_path, Config};
use crate::document::{self, LoadOptions, PdfWorkerArgs};
use crate::engine::session::Progress;
use crate::engine::{self, AskSettings, EngineError, Method};
use crate::model::{self, DeviceChoice, Llm};
use crate::tree::search::{Fusion, Policy, Positions, Reread, Scorer, SearchSettings};
use crate::{bench, eval, store, sys};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(
    name = "slm-chat",
    version,
    about = "Ask questions about long documents and whole books with a small local model"
)]
pub struct Args {
    /// A catalogue name (`slm-chat models`), a GGUF file or a Hugging Face folder (default:
    /// smollm2-135m, fetched on first use).
    #[arg(long, global = true, value_name = "NAME|PATH")]
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
        #[arg(long, value_enum, default_value_t = Method::Tree)]
        method: Method,
        /// Print one JSON object (answer, nodes, figures) instead of streaming text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        search: SearchFlags,
        /// Most tokens in the answer.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// 0 = greedy.
        #[arg(long)]
        temperature: Option<f64>,
    },
    /// Build and store the context tree of each file (resuming a stopped build).
    Ingest {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print one JSON object per file instead of a summary line.
        #[arg(long)]
        json: bool,
    },
    /// Accuracy, time to first token and memory of a method over a dataset (../shared/eval
    /// formats): a Markdown table, or JSON.
    Eval {
        dataset: PathBuf,
        /// The folder holding `<book>.txt` for the dataset's books.
        #[arg(long)]
        books: PathBuf,
        #[arg(long, value_enum, default_value_t = Method::Tree)]
        method: Method,
        /// Give every case the oracle's context instead (needle in ~2,000 words of its book,
        /// or 5,000 characters around a question's evidence), answered with `full`.
        #[arg(long)]
        oracle: bool,
        /// Also answer each case from the tree's full-resolution passages alone, as text with
        /// full attention (`--method tree`, not with `--oracle`): what injection loses
        /// against reading them.
        #[arg(long)]
        read_alone: bool,
        /// Only search (`--method tree`): what each case would read and where its evidence
        /// ranks among the candidates, without answering.
        #[arg(long)]
        retrieval: bool,
        /// Only these case ids (comma-separated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Only needle cases of these sizes (context_tokens_approx, comma-separated).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        /// Print the results as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the JSON results to this file.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        search: SearchFlags,
        /// Most tokens in each answer.
        #[arg(long)]
        max_tokens: Option<usize>,
    },
    /// The stored context trees: list them, delete them, or show where they are.
    Cache {
        #[command(subcommand)]
        what: CacheCommand,
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
    /// List the models slm-chat knows by name; --fetch downloads the default one (or NAME)
    /// now.
    Models {
        #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
        fetch: Option<String>,
    },
    /// Show where settings come from, or the settings in force.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
    #[command(name = "__pdf-worker", hide = true)]
    PdfWorker(PdfWorkerArgs),
}

/// Overrides of `[search]` for one run.
#[derive(clap::Args, Debug, Default)]
struct SearchFlags {
    /// How nodes are scored: bm25, dense, hybrid (bm25 and dense fused), bm25chunk, paper
    /// or hidden.
    #[arg(long, value_enum)]
    scorer: Option<Scorer>,
    /// budget (best-first under two budgets) or paper (Algorithm 1 per chunk).
    #[arg(long, value_enum)]
    policy: Option<Policy>,
    /// Most injected KV entries (0 = the window minus prompt and answer).
    #[arg(long)]
    budget: Option<usize>,
    /// Most entries at full resolution.
    #[arg(long)]
    fine_budget: Option<usize>,
    /// How hybrid fuses BM25 and dense scores: zscore or rrf.
    #[arg(long, value_enum)]
    fusion: Option<Fusion>,
    /// Share of its better neighbour's score each leaf gains (0 = off).
    #[arg(long)]
    neighbours: Option<f32>,
    /// Leaves read around each chosen one with the ranked policy (1, 2 or 3).
    #[arg(long)]
    window: Option<usize>,
    /// Coarsest tree level read whole at full resolution (0 = chunks, 3 = leaves).
    #[arg(long)]
    fine_level: Option<usize>,
    /// Mark the cuts around passages read at full resolution (true or false).
    #[arg(long)]
    cut_marks: Option<bool>,
    /// Read the full-resolution passages again at question time as text: auto (when the
    /// tree keeps no full-resolution KV), always or never.
    #[arg(long, value_enum)]
    reread: Option<Reread>,
    /// Nats taken off the attention logit of every coarse entry (0 = off).
    #[arg(long)]
    coarse_bias: Option<f32>,
    /// contiguous or chunk.
    #[arg(long, value_enum)]
    positions: Option<Positions>,
}

impl SearchFlags {
    fn apply(&self, s: &mut SearchSettings) {
        if let Some(x) = self.scorer {
            s.scorer = x;
        }
        if let Some(x) = self.policy {
            s.policy = x;
        }
        if let Some(x) = self.fusion {
            s.fusion = x;
        }
        if let Some(x) = self.neighbours {
            s.neighbours = x;
        }
        if let Some(x) = self.window {
            s.window = x;
        }
        if let Some(x) = self.budget {
            s.budget = x;
        }
        if let Some(x) = self.fine_budget {
            s.fine_budget = x;
        }
        if let Some(x) = self.fine_level {
            s.fine_level = x;
        }
        if let Some(x) = self.cut_marks {
            s.cut_marks = x;
        }
        if let Some(x) = self.reread {
            s.reread = x;
        }
        if let Some(x) = self.coarse_bias {
            s.coarse_bias = x;
        }
        if let Some(x) = self.positions {
            s.positions = x;
        }
    }
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
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
            search,
            max_tokens,
            temperature,
        } => {
            search.apply(&mut config.search);
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
        Command::Ingest { files, json } => ingest(&config, &files, json),
        Command::Cache { what } => cache(&config, what),
        Command::Eval {
            dataset,
            books,
            method,
            oracle,
            read_alone,
            retrieval,
            only,
            sizes,
            json,
            out,
            search,
            max_tokens,
        } => {
            if read_alone && (oracle || method != Method::Tree) {
                anyhow::bail!("--read-alone reads the tree's passages: use it with --method tree and without --oracle");
            }
            if retrieval && (oracle || method != Method::Tree || read_alone) {
                anyhow::bail!("--retrieval measures the tree's search: use it with --method tree, without --oracle or --read-alone");
            }
            search.apply(&mut config.search);
            if let Some(n) = max_tokens {
                config.generate.max_tokens = n;
            }
            config.validate()?;
            let mut cases = eval::load_cases(&dataset)?;
            if !only.is_empty() {
                cases.retain(|c| only.contains(&c.id));
            }
            if !sizes.is_empty() {
                cases.retain(|c| c.context_tokens_approx.is_some_and(|s| sizes.contains(&s)));
            }
            if cases.is_empty() {
                anyhow::bail!("{}: no case left to run", dataset.display());
            }
            let llm = load_model(&config)?;
            let embedder = if oracle {
                None
            } else {
                engine::dense::load_embedder(&config, &mut |m| eprintln!("slm-chat: {m}"))
            };
            let plan = eval::EvalPlan {
                cases,
                books,
                method,
                oracle,
                read_alone,
                work_dir: config.cache_dir().join("eval"),
                retrieval_only: retrieval,
                embedder,
            };
            let results = eval::run(&llm, &config, &plan, &mut |m| eprintln!("slm-chat: {m}"))?;
            let label = if oracle {
                "oracle".to_string()
            } else {
                format!("{method:?}").to_lowercase()
            };
            let alone = read_alone.then(|| {
                results
                    .iter()
                    .filter(|r| r.alone_correct == Some(true))
                    .count()
            });
            let report = serde_json::json!({
                "dataset": dataset,
                "method": label,
                "search": config.search,
                "tree": config.tree,
                "correct": results.iter().filter(|r| r.correct).count(),
                "summary": eval::summarize(&results),
                "alone_correct": alone,
                "cases": results,
            });
            if let Some(path) = &out {
                store::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                if !retrieval {
                    print!("{}", eval::table(&label, &results));
                    println!();
                }
                print!(
                    "{}",
                    eval::summary_table(&label, &eval::summarize(&results))
                );
                if let Some(n) = alone {
                    println!(
                        "\nFrom the full-resolution passages alone, as text: {n}/{}",
                        results.len()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
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

/// The configured model: a path, a catalogue name, or the default (fetched if missing).
fn model_path(config: &Config) -> Result<PathBuf> {
    Ok(model::resolve_model(
        &config.model.path,
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

/// A document error with its own exit code, or any other engine error with the file named.
fn engine_error(file: &Path, e: EngineError) -> anyhow::Error {
    match e {
        // A document error names the file itself.
        EngineError::Document(d) => anyhow::Error::new(Exit {
            message: d.to_string(),
            code: d.exit_code(),
        }),
        e => anyhow::Error::new(e).context(file.display().to_string()),
    }
}

/// Open (building if needed) the tree of `file`, with progress on stderr.
fn open_tree(llm: &Llm, config: &Config, file: &Path) -> Result<store::Tree> {
    let cancel = AtomicBool::new(false);
    let bar = progress_bar(file);
    let mut say = |p: &Progress| show_progress(&bar, p);
    let result = engine::ingest::open_or_build(llm, file, config, false, &mut say, &cancel);
    bar.finish_and_clear();
    let (tree, report) = result.map_err(|e| engine_error(file, e))?;
    if let Some(why) = &report.rebuilt {
        eprintln!("slm-chat: {why}; rebuilt it");
    }
    if report.built {
        eprintln!(
            "slm-chat: read {} tokens into {} chunks in {:.1} s ({:.0} tok/s); stored at {}",
            report.tokens,
            report.chunks,
            report.seconds,
            report.tok_s,
            report.path.display()
        );
    }
    Ok(tree)
}

fn ask(
    config: &Config,
    file: &Path,
    question: &str,
    method: Method,
    json: bool,
) -> Result<ExitCode> {
    if method == Method::Tree {
        return ask_tree(config, file, question, json);
    }
    let doc = load_document(file, false)?;
    let llm = load_model(config)?;
    let params = config.generate.sampling();
    let cancel = AtomicBool::new(false);
    let mut out = std::io::stdout().lock();
    let mut stream = |piece: &str| {
        if !json {
            // A closed pipe ends the output, not the answer's bookkeeping.
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let embedder = engine::dense::load_embedder(config, &mut |m| eprintln!("slm-chat: {m}"));
    let settings = AskSettings::new(method, config, embedder);
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

fn ingest(config: &Config, files: &[PathBuf], json: bool) -> Result<ExitCode> {
    for file in files.iter().filter(|f| !f.is_file()) {
        // The document loader words a missing or unreadable file (and picks its exit code).
        load_document(file, false)?;
    }
    let llm = load_model(config)?;
    let embedder = engine::dense::load_embedder(config, &mut |m| eprintln!("slm-chat: {m}"));
    let cancel = AtomicBool::new(false);
    for file in files {
        let bar = progress_bar(file);
        let mut say = |p: &Progress| show_progress(&bar, p);
        let result = engine::ingest::open_or_build(&llm, file, config, true, &mut say, &cancel)
            .and_then(|(tree, mut r)| {
                // The dense pass belongs to reading the book: embed its passages now.
                if let Some(e) = &embedder {
                    let start = std::time::Instant::now();
                    engine::dense::dense_index(&tree, e, &mut say)?;
                    let secs = start.elapsed().as_secs_f64();
                    r.dense_secs = Some(secs);
                    r.seconds += secs;
                    r.store_bytes = tree.disk_bytes();
                }
                Ok(r)
            });
        bar.finish_and_clear();
        let r = result.map_err(|e| engine_error(file, e))?;
        if json {
            println!("{}", serde_json::to_string(&r)?);
            continue;
        }
        if let Some(why) = &r.rebuilt {
            eprintln!("slm-chat: {why}; rebuilt it");
        }
        let what = if r.built {
            let resumed = if r.resumed_chunks > 0 {
                format!(" (resumed after {} finished chunks)", r.resumed_chunks)
            } else {
                String::new()
            };
            let dense = match r.dense_secs {
                Some(d) => format!(", {d:.1} s of it embedding passages"),
                None => String::new(),
            };
            format!(
                "built in {:.1} s at {:.0} tok/s{resumed}{dense}",
                r.seconds, r.tok_s
            )
        } else {
            format!("already stored, checked in {:.2} s", r.seconds)
        };
        println!(
            "{}: {} tokens, {} chunks, {what}; {} on disk ({}) at {}",
            file.display(),
            r.tokens,
            r.chunks,
            sys::human_bytes(r.store_bytes),
            if r.full_kv {
                "full KV kept"
            } else {
                "levels only"
            },
            r.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(file: &Path) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} chunks · {msg}")
        .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar.set_prefix(
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    bar
}

/// Progress on the bar, or one line per tenth of the work when stderr is not a terminal.
fn show_progress(bar: &ProgressBar, p: &Progress) {
    if bar.is_hidden() {
        let step = (p.total / 10).max(1);
        if p.total == 0 || p.done.is_multiple_of(step) || p.done == p.total {
            if p.total == 0 {
                eprintln!("slm-chat: {}", p.message);
            } else {
                eprintln!(
                    "slm-chat: {} · {:.0} tok/s · ETA {:.0} s",
                    p.message,
                    p.tok_s,
                    p.eta_secs.unwrap_or(0.0)
                );
            }
        }
        return;
    }
    if p.total == 0 {
        bar.set_message(p.message.clone());
        return;
    }
    bar.set_length(p.total as u64);
    bar.set_position(p.done as u64);
    bar.set_message(format!(
        "{:.0} tok/s · ETA {:.0} s",
        p.tok_s,
        p.eta_secs.unwrap_or(0.0)
    ));
}

fn cache(config: &Config, what: CacheCommand) -> Result<ExitCode> {
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

fn ask_tree(config: &Config, file: &Path, question: &str, json: bool) -> Result<ExitCode> {
    if question.trim().is_empty() {
        return Err(EngineError::EmptyQuestion.into());
    }
    if !file.is_file() {
        // The document's own loader words this error; run it for the message and exit code.
        load_document(file, false)?;
    }
    let llm = load_model(config)?;
    let embedder = engine::dense::load_embedder(config, &mut |m| eprintln!("slm-chat: {m}"));
    let opening = std::time::Instant::now();
    let tree = open_tree(&llm, config, file)?;
    let open_ms = opening.elapsed().as_secs_f64() * 1e3;
    let bar = progress_bar(file);
    let session = engine::dense::session(&llm, tree, embedder.as_ref(), &mut |p| {
        show_progress(&bar, p)
    });
    bar.finish_and_clear();
    let mut session = session?;
    let params = config.generate.sampling();
    let cancel = AtomicBool::new(false);
    let mut out = std::io::stdout().lock();
    let mut stream = |piece: &str| {
        if !json {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let mut answer = session.ask(question, &config.search, &params, &cancel, &mut stream);
    if let Err(EngineError::Store(s)) = &answer {
        if s.needs_rebuild() {
            // Damage found in a tensor the question read: build the tree again, once.
            eprintln!("slm-chat: {s}; building it again");
            let cancel = AtomicBool::new(false);
            let bar = progress_bar(file);
            let mut say = |p: &Progress| show_progress(&bar, p);
            let result = engine::ingest::rebuild(&llm, file, config, s, &mut say, &cancel);
            bar.finish_and_clear();
            let (tree, _) = result.map_err(|e| engine_error(file, e))?;
            session = engine::dense::session(&llm, tree, embedder.as_ref(), &mut |_| {})?;
            answer = session.ask(question, &config.search, &params, &cancel, &mut stream);
        }
    }
    let mut answer = answer?;
    answer.timings.open_ms = Some(open_ms);
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&answer)?).ok();
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out).ok();
    out.flush().ok();
    let mut best: Vec<&engine::NodeHit> = answer.nodes.iter().filter(|n| n.alpha == 1).collect();
    best.sort_by(|a, b| b.score.total_cmp(&a.score));
    for n in best.iter().take(5) {
        eprintln!(
            "slm-chat: read in full: chunk {} node {}.{} · pages {}–{} · score {:.2} · {}",
            n.chunk, n.level, n.index, n.pages.0, n.pages.1, n.score, n.preview
        );
    }
    let m = &answer.memory;
    eprintln!(
        "slm-chat: {} · {} nodes ({} entries, {} at full resolution{}) of {} document tokens · search {:.0} ms · first token {:.0} ms · decode {:.1} tok/s · injected KV {} (full attention: {}) · peak RSS {}",
        answer.stop,
        answer.nodes.len(),
        m.injected_entries.unwrap_or(0),
        answer.nodes.iter().filter(|n| n.alpha == 1).map(|n| n.tokens.1 - n.tokens.0).sum::<usize>(),
        match answer.timings.reread_tokens {
            Some(r) if r > 0 => format!(", {r} tokens read again"),
            _ => String::new(),
        },
        answer.document_tokens,
        answer.timings.search_ms.unwrap_or(0.0),
        answer.timings.first_token_ms,
        answer.timings.decode_tok_s,
        sys::human_bytes(m.injected_bytes.unwrap_or(0) as u64),
        sys::human_bytes(m.full_attention_kv_bytes.unwrap_or(0) as u64),
        m.peak_rss_bytes.map(sys::human_bytes).unwrap_or_else(|| "?".into()),
    );
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

fn models(config: &Config, fetch: Option<String>) -> Result<ExitCode> {
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
