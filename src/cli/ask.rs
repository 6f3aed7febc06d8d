//! `slm-chat ask FILE QUESTION`: one answer, streamed to stdout (or one JSON object).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::output::{self, say, Stream};
use super::{engine_settings, SearchFlags};
use slm_chat::config::Config;
use slm_chat::engine::{self, Answer, AskSettings, EngineError, Method, NodeHit, Settings};
use slm_chat::sys;

#[derive(clap::Args, Debug)]
pub struct AskArgs {
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
    pub(super) search: SearchFlags,
    /// Most tokens in the answer.
    #[arg(long)]
    pub(super) max_tokens: Option<usize>,
    /// 0 = greedy.
    #[arg(long)]
    pub(super) temperature: Option<f64>,
}

pub fn run(config: &Config, args: &AskArgs) -> Result<ExitCode> {
    let settings = engine_settings(config)?;
    args.search.warn_ignored(
        args.method,
        &format!("--method {}", method_name(args.method)),
    );
    if args.method == Method::Tree {
        return tree(&settings, &args.file, &args.question, args.json);
    }
    let doc = output::load_document(&args.file, &settings.ingest.load, false)?;
    let llm = output::load_model(&settings.model)?;
    let cancel = AtomicBool::new(false);
    let mut stream = Stream::new();
    let embedder = engine::dense::load_embedder(settings.search.scorer, &settings.model, &mut say);
    let ask = AskSettings::new(args.method, &settings.rag, &settings.search, embedder)
        .concise(settings.answer.concise);
    let answer = engine::ask(
        &llm,
        &doc,
        &args.question,
        &ask,
        &settings.sampling,
        &cancel,
        &mut |piece| {
            if !args.json {
                stream.piece(piece)
            }
        },
    )?;
    if args.json {
        stream.finish(&(serde_json::to_string_pretty(&answer)? + "\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    stream.finish("\n")?;
    for src in &answer.sources {
        say(&format!(
            "source: chunk {} · pages {}–{} · score {:.1} · {}",
            src.chunk, src.first_page, src.last_page, src.score, src.preview
        ));
    }
    say(&format!(
        "{} · {} of {} document tokens seen · first token {:.0} ms · prefill {:.0} tok/s · decode {:.1} tok/s · peak RSS {}",
        answer.stop,
        answer.kept_tokens,
        answer.document_tokens,
        answer.timings.first_token_ms,
        answer.timings.prefill_tok_s,
        answer.timings.decode_tok_s,
        answer.memory.peak_rss_bytes.map(sys::human_bytes).unwrap_or_else(|| "?".into()),
    ));
    Ok(ExitCode::SUCCESS)
}

fn method_name(m: Method) -> String {
    format!("{m:?}").to_lowercase()
}

/// `--method tree`: open (or build) the tree, then answer from it; a tree found damaged
/// while answering is built again, once.
fn tree(settings: &Settings, file: &Path, question: &str, json: bool) -> Result<ExitCode> {
    if question.trim().is_empty() {
        return Err(EngineError::EmptyQuestion.into());
    }
    output::check_file(file, &settings.ingest.load)?;
    let llm = output::load_model(&settings.model)?;
    let embedder = engine::dense::load_embedder(settings.search.scorer, &settings.model, &mut say);
    let opening = std::time::Instant::now();
    let tree = output::open_tree(&llm, &settings.ingest, file)?;
    let open_ms = opening.elapsed().as_secs_f64() * 1e3;
    let bar = output::progress_bar(file);
    let session = engine::dense::session(&llm, tree, embedder.as_ref(), &mut |p| {
        output::show_progress(&bar, p)
    });
    bar.finish_and_clear();
    let mut session = session?.with_answer_settings(settings.answer.clone());
    let (search, params) = (&settings.search, &settings.sampling);
    let cancel = AtomicBool::new(false);
    let mut stream = Stream::new();
    let mut piece = |p: &str| {
        if !json {
            stream.piece(p)
        }
    };
    let mut answer = session.ask(question, search, params, &cancel, &mut piece);
    if let Err(EngineError::Store(s)) = &answer {
        if s.needs_rebuild() {
            // Damage found in a tensor the question read: build the tree again, once.
            say(&format!("{s}; building it again"));
            let bar = output::progress_bar(file);
            let mut show = |p: &_| output::show_progress(&bar, p);
            let result =
                engine::ingest::rebuild(&llm, file, &settings.ingest, s, &mut show, &cancel);
            bar.finish_and_clear();
            let (tree, _) = result.map_err(|e| output::engine_error(file, e))?;
            session = engine::dense::session(&llm, tree, embedder.as_ref(), &mut |_| {})?
                .with_answer_settings(settings.answer.clone());
            answer = session.ask(question, search, params, &cancel, &mut piece);
        }
    }
    let mut answer = answer?;
    answer.timings.open_ms = Some(open_ms);
    if json {
        stream.finish(&(serde_json::to_string_pretty(&answer)? + "\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    stream.finish("\n")?;
    report_tree_answer(&answer);
    Ok(ExitCode::SUCCESS)
}

/// The passages read in full and the answer's figures, on stderr.
fn report_tree_answer(answer: &Answer) {
    let mut best: Vec<&NodeHit> = answer.nodes.iter().filter(|n| n.alpha == 1).collect();
    best.sort_by(|a, b| b.score.total_cmp(&a.score));
    for n in best.iter().take(5) {
        say(&format!(
            "read in full: chunk {} node {}.{} · pages {}–{} · score {:.2} · {}",
            n.chunk, n.level, n.index, n.pages.0, n.pages.1, n.score, n.preview
        ));
    }
    let mut pages: Vec<(u32, u32)> = best.iter().map(|n| n.pages).collect();
    pages.sort_unstable();
    pages.dedup();
    if !pages.is_empty() {
        let list: Vec<String> = pages
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}–{b}")
                }
            })
            .collect();
        say(&format!("pages read in full: {}", list.join(", ")));
    }
    if let Some(e) = &answer.evidence {
        say(&format!(
            "{} · evidence score {:.2} (question covered {:.0} % by the passages read in full, best passage {:.0} %, first token p {:.2})",
            if answer.abstained { "abstained" } else { "answered" },
            e.score,
            100.0 * e.coverage,
            100.0 * e.best_passage,
            e.first_token,
        ));
    }
    if answer.support.as_ref().and_then(|s| s.supported()) == Some(false) {
        say(&format!(
            "⚠ {}: the model may have answered from memory",
            engine::trust::UNSUPPORTED
        ));
    }
    let m = &answer.memory;
    say(&format!(
        "{} · {} nodes ({} entries, {} at full resolution{}) of {} document tokens · search {:.0} ms · first token {:.0} ms · decode {:.1} tok/s · injected KV {} (full attention: {}) · peak RSS {}",
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
    ));
}
