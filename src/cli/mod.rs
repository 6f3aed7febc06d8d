//! The command line: arguments (clap), then the settings in force, then one command.
//!
//! Two stages, as ripgrep does: [`Args`] is what was typed; [`settings`] layers it over the
//! defaults, `config.toml` and the environment once, validates once, and hands each command
//! the settings it takes. Each command is a plain function in its own file, from its
//! arguments to an exit code.

mod ask;
mod bench;
mod cache;
mod eval;
mod ingest;
mod models;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use slm_chat::config::{user_config_path, Config};
use slm_chat::document::{self, PdfWorkerArgs};
use slm_chat::engine::{session, Method, Settings};
use slm_chat::model::DeviceChoice;
use slm_chat::tree::search::{Fusion, Policy, Positions, Reread, Scorer, SearchSettings};

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
    Ask(ask::AskArgs),
    /// Build and store the context tree of each file (resuming a stopped build).
    Ingest(ingest::IngestArgs),
    /// Accuracy, time to first token and memory of a method over a dataset (../shared/eval
    /// formats): a Markdown table, or JSON.
    Eval(eval::EvalArgs),
    /// The stored context trees: list them, delete them, or show where they are.
    Cache {
        #[command(subcommand)]
        what: cache::CacheCommand,
    },
    /// Print the text slm-chat reads from FILE, with page markers (or as JSON).
    Extract {
        file: PathBuf,
        /// Print the document (text, pages, sections, notes) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure prefill, encode and decode speed and memory on this machine.
    Bench(bench::BenchArgs),
    /// List the models slm-chat knows by name; --fetch downloads the default one (or NAME)
    /// now.
    Models(models::ModelsArgs),
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
        fn set<T: Copy>(slot: &mut T, flag: Option<T>) {
            if let Some(v) = flag {
                *slot = v;
            }
        }
        set(&mut s.scorer, self.scorer);
        set(&mut s.policy, self.policy);
        set(&mut s.fusion, self.fusion);
        set(&mut s.neighbours, self.neighbours);
        set(&mut s.window, self.window);
        set(&mut s.budget, self.budget);
        set(&mut s.fine_budget, self.fine_budget);
        set(&mut s.fine_level, self.fine_level);
        set(&mut s.cut_marks, self.cut_marks);
        set(&mut s.reread, self.reread);
        set(&mut s.coarse_bias, self.coarse_bias);
        set(&mut s.positions, self.positions);
    }

    /// The flags given that `method` does not read (`rag` ranks with the scorer and its
    /// fusion; the other baselines read none of them).
    fn ignored_by(&self, method: Method) -> Vec<&'static str> {
        if method == Method::Tree {
            return Vec::new();
        }
        let rag = method == Method::Rag;
        [
            ("--scorer", self.scorer.is_some() && !rag),
            ("--fusion", self.fusion.is_some() && !rag),
            ("--policy", self.policy.is_some()),
            ("--budget", self.budget.is_some()),
            ("--fine-budget", self.fine_budget.is_some()),
            ("--neighbours", self.neighbours.is_some()),
            ("--window", self.window.is_some()),
            ("--fine-level", self.fine_level.is_some()),
            ("--cut-marks", self.cut_marks.is_some()),
            ("--reread", self.reread.is_some()),
            ("--coarse-bias", self.coarse_bias.is_some()),
            ("--positions", self.positions.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, ignored)| ignored.then_some(flag))
        .collect()
    }

    /// Say, in one line, which flags `method` ignores.
    fn warn_ignored(&self, method: Method, what: &str) {
        let ignored = self.ignored_by(method);
        if !ignored.is_empty() {
            eprintln!(
                "slm-chat: {} only {} the tree's search; ignored with {what}",
                ignored.join(", "),
                if ignored.len() == 1 {
                    "steers"
                } else {
                    "steer"
                },
            );
        }
    }
}

/// What a command's flags change of the settings.
#[derive(Default)]
struct Overrides<'a> {
    search: Option<&'a SearchFlags>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
}

/// A failure with its own exit code (documents have one per kind of bad input).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub message: String,
    pub code: u8,
}

/// The settings in force: defaults < config file < environment < flags, validated once.
fn settings(args: &Args, flags: Overrides) -> Result<Config> {
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
    if let Some(s) = flags.search {
        s.apply(&mut config.search);
    }
    if let Some(n) = flags.max_tokens {
        config.generate.max_tokens = n;
    }
    if let Some(t) = flags.temperature {
        config.generate.temperature = t;
    }
    config.validate()?;
    Ok(config)
}

/// The engine's settings, with this binary as the PDF worker.
fn engine_settings(config: &Config) -> Result<Settings> {
    let exe = std::env::current_exe()
        .map_err(|e| anyhow::anyhow!("cannot find slm-chat's own executable: {e}"))?;
    Ok(config.engine_settings(exe))
}

/// Run the command line; errors carry the text to print and the exit code.
pub fn run(args: Args) -> Result<ExitCode> {
    let overrides = match &args.command {
        Some(Command::PdfWorker(worker)) => return Ok(document::run_pdf_worker(worker)),
        // Where the settings file goes must be answerable even when that file is broken.
        Some(Command::Config {
            what: ConfigCommand::Path,
        }) => {
            println!("{}", user_config_path().display());
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Ask(a)) => Overrides {
            search: Some(&a.search),
            max_tokens: a.max_tokens,
            temperature: a.temperature,
        },
        Some(Command::Eval(e)) => Overrides {
            search: Some(&e.search),
            max_tokens: e.max_tokens,
            temperature: None,
        },
        _ => Overrides::default(),
    };
    let config = settings(&args, overrides)?;
    let Some(command) = args.command else {
        return match args.file {
            Some(file) => open(&config, file),
            None => Err(Exit {
                message: "give a FILE to open, or a command (see `slm-chat --help`)".into(),
                code: 2,
            }
            .into()),
        };
    };
    match command {
        Command::Ask(a) => ask::run(&config, &a),
        Command::Extract { file, json } => {
            output::extract(&file, &engine_settings(&config)?.ingest.load, json)
        }
        Command::Ingest(a) => ingest::run(&config, &a),
        Command::Cache { what } => cache::run(&config, what),
        Command::Eval(a) => eval::run(&config, a),
        Command::Bench(a) => bench::run(&config, &a),
        Command::Models(a) => models::run(&config, a),
        Command::Config { what } => {
            match what {
                ConfigCommand::Path => println!("{}", user_config_path().display()),
                ConfigCommand::Show => print!("{}", config.to_toml()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::PdfWorker(worker) => Ok(document::run_pdf_worker(&worker)),
    }
}

/// `slm-chat FILE`: the terminal app, on a session started here once the app can run.
fn open(config: &Config, file: PathBuf) -> Result<ExitCode> {
    let settings = engine_settings(config)?;
    let log_path = config.cache_dir().join("logs").join("slm-chat.log");
    let opts = slm_chat::tui::Options {
        file: file.clone(),
        log_path,
        history_dir: None,
    };
    let start = || session::start(session::SessionOptions { file, settings });
    match slm_chat::tui::run(opts, start) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e @ slm_chat::tui::TuiError::NotATerminal { .. }) => Err(Exit {
            message: e.to_string(),
            code: 2,
        }
        .into()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_a_setting_error_names_exists() {
        let cli = Args::command();
        let mut longs: Vec<String> = Vec::new();
        let mut stack = vec![&cli];
        while let Some(c) = stack.pop() {
            longs.extend(
                c.get_arguments()
                    .filter_map(|a| a.get_long().map(String::from)),
            );
            stack.extend(c.get_subcommands());
        }
        for (key, flag) in slm_chat::config::FLAGS {
            let name = flag.trim_start_matches("--");
            assert!(
                longs.iter().any(|l| l == name),
                "{key}: {flag} is not a flag"
            );
        }
    }

    #[test]
    fn the_readme_names_every_command_and_flag() {
        let readme = include_str!("../../README.md");
        let cli = Args::command();
        let mut missing = Vec::new();
        for c in cli.get_subcommands().filter(|c| !c.is_hide_set()) {
            if !readme.contains(&format!("slm-chat {}", c.get_name())) {
                missing.push(format!("slm-chat {}", c.get_name()));
            }
            let args = c.get_arguments().chain(cli.get_arguments());
            for long in args.filter_map(|a| a.get_long()) {
                if long != "help" && long != "version" && !readme.contains(&format!("--{long}")) {
                    missing.push(format!("{} --{long}", c.get_name()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "README.md does not mention: {missing:?}"
        );
    }

    #[test]
    fn tree_only_flags_are_named_when_another_method_ignores_them() {
        let flags = SearchFlags {
            budget: Some(10),
            scorer: Some(Scorer::Dense),
            ..SearchFlags::default()
        };
        assert_eq!(flags.ignored_by(Method::Tree), Vec::<&str>::new());
        assert_eq!(flags.ignored_by(Method::Rag), vec!["--budget"]);
        assert_eq!(flags.ignored_by(Method::Full), vec!["--scorer", "--budget"]);
    }
}
