//! `slm-chat eval DATASET --books DIR`: accuracy, evidence read, time to first token and
//! memory of a method over a dataset.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::output::{self, say};
use super::{engine_settings, Exit, SearchFlags};
use slm_chat::config::Config;
use slm_chat::engine::{self, Method};
use slm_chat::eval::{self, CaseResult};
use slm_chat::store;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// One or more JSONL files; answerable and absent cases are reported side by side.
    #[arg(required = true, num_args = 1..)]
    dataset: Vec<PathBuf>,
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
    /// Conversations: the earlier turns carry the dataset's expected answers (where it gives
    /// them) instead of the model's own, so a follow-up is measured apart from how well the
    /// turn before it was answered.
    #[arg(long)]
    gold_turns: bool,
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
    pub(super) search: SearchFlags,
    /// Most tokens in each answer.
    #[arg(long)]
    pub(super) max_tokens: Option<usize>,
}

fn refuse(message: &str) -> anyhow::Error {
    Exit {
        message: message.into(),
        code: 2,
    }
    .into()
}

pub fn run(config: &Config, args: EvalArgs) -> Result<ExitCode> {
    if args.read_alone && (args.oracle || args.method != Method::Tree) {
        return Err(refuse("--read-alone reads the tree's passages: use it with --method tree and without --oracle"));
    }
    if args.retrieval && (args.oracle || args.method != Method::Tree || args.read_alone) {
        return Err(refuse("--retrieval measures the tree's search: use it with --method tree, without --oracle or --read-alone"));
    }
    let label = if args.oracle {
        "oracle".to_string()
    } else {
        format!("{:?}", args.method).to_lowercase()
    };
    let read_by = if args.oracle {
        Method::Full
    } else {
        args.method
    };
    args.search
        .warn_ignored(read_by, &format!("--method {label}"));
    let settings = engine_settings(config)?;
    let mut cases = Vec::new();
    for path in &args.dataset {
        for case in eval::load_cases(path)? {
            if cases.iter().any(|c: &eval::Case| c.id == case.id) {
                return Err(refuse(&format!(
                    "{}: case id {} is also in an earlier dataset",
                    path.display(),
                    case.id
                )));
            }
            cases.push(case);
        }
    }
    let names: Vec<String> = args
        .dataset
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if !args.only.is_empty() {
        cases.retain(|c| args.only.contains(&c.id));
    }
    if !args.sizes.is_empty() {
        cases.retain(|c| {
            c.context_tokens_approx
                .is_some_and(|s| args.sizes.contains(&s))
        });
    }
    if cases.is_empty() {
        return Err(refuse(&format!(
            "{}: no case left to run",
            names.join(", ")
        )));
    }
    let llm = output::load_model(&settings.model)?;
    let embedder = if args.oracle {
        None
    } else {
        engine::dense::load_embedder(settings.search.scorer, &settings.model, &mut say)
    };
    let plan = eval::EvalPlan {
        cases,
        books: args.books.clone(),
        method: args.method,
        oracle: args.oracle,
        read_alone: args.read_alone,
        work_dir: config.cache_dir().join("eval"),
        retrieval_only: args.retrieval,
        gold_turns: args.gold_turns,
        embedder,
    };
    let results = eval::run(&llm, &settings, &plan, &mut say)?;
    let alone = args.read_alone.then(|| {
        results
            .iter()
            .filter(|r| r.alone_correct == Some(true))
            .count()
    });
    let report = serde_json::json!({
        "dataset": args.dataset,
        "method": label,
        "search": config.search,
        "tree": config.tree,
        "generate": config.generate,
        "answer": config.answer,
        "correct": results.iter().filter(|r| r.correct).count(),
        "summary": eval::summarize(&results),
        "alone_correct": alone,
        "cases": results,
    });
    if let Some(path) = &args.out {
        store::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_tables(&label, &results, args.retrieval, alone);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_tables(label: &str, results: &[CaseResult], retrieval: bool, alone: Option<usize>) {
    if !retrieval {
        print!("{}", eval::table(label, results));
        println!();
    }
    print!("{}", eval::summary_table(label, &eval::summarize(results)));
    if let Some(n) = alone {
        println!(
            "\nFrom the full-resolution passages alone, as text: {n}/{}",
            results.len()
        );
    }
}
