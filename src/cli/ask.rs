//! `slm-chat ask FILE QUESTION`: one answer, streamed to stdout (or one JSON object).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::output::{self, say, Stream};
use super::{engine_settings, SearchFlags};
use slm_chat::config::Config;
use slm_chat::engine::{
    self, Answer, AskSettings, EngineError, Exchange, Method, NodeHit, Settings,
};
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
    /// A conversation: the question follows the earlier turns in FILE (one JSON object per
    /// line, {"question": …, "answer": …}), and its own turn is added to FILE once
    /// answered. A FILE that does not exist starts a new conversation.
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,
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
    let history = match &args.history {
        Some(path) => read_history(path)?,
        None => Vec::new(),
    };
    let answer = if args.method == Method::Tree {
        tree(&settings, &args.file, &args.question, &history, args.json)?
    } else {
        baseline(&settings, args, &history)?
    };
    if let Some(path) = &args.history {
        if answer.stop != slm_chat::model::StopReason::Cancelled {
            add_turn(path, &args.question, &answer.answer)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The turns of a `--history` file; none when it does not exist yet.
fn read_history(path: &Path) -> Result<Vec<Exchange>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => anyhow::bail!("cannot read the history {}: {e}", path.display()),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str::<Exchange>(line).map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}: not a turn of a conversation ({e}); each line is {{\"question\": …, \"answer\": …}}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Add the turn just answered to the `--history` file (written whole to a temporary file
/// and renamed, so an interrupted write leaves the earlier turns as they were).
fn add_turn(path: &Path, question: &str, answer: &str) -> Result<()> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("cannot read the history {}: {e}", path.display()),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&serde_json::to_string(&Exchange::new(
        question.trim(),
        answer,
    ))?);
    text.push('\n');
    slm_chat::store::write_atomic(path, text.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write the history {}: {e}", path.display()))
}

/// `ask` by one of the baseline methods (no tree).
fn baseline(settings: &Settings, args: &AskArgs, history: &[Exchange]) -> Result<Answer> {
    let doc = output::load_document(&args.file, &settings.ingest.load, false)?;
    let llm = output::load_model(&settings.model)?;
    let cancel = AtomicBool::new(false);
    let mut stream = Stream::new();
    let embedder = engine::dense::load_embedder(settings.search.scorer, &settings.model, &mut say);
    let ask = AskSettings::new(args.method, &settings.rag, &settings.search, embedder)
        .concise(settings.answer.concise)
        .following(history, &settings.conversation);
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
        return Ok(answer);
    }
    stream.finish("\n")?;
    report_history(&answer);
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
    Ok(answer)
}

/// How much of the conversation the answer followed, on stderr.
fn report_history(answer: &Answer) {
    if answer.history_turns > 0 {
        say(&format!(
            "following {} earlier turn{} of the conversation",
            answer.history_turns,
            if answer.history_turns == 1 { "" } else { "s" }
        ));
    }
}

fn method_name(m: Method) -> String {
    format!("{m:?}").to_lowercase()
}

/// `--method tree`: open (or build) the tree, then answer from it; a tree found damaged
/// while answering is built again, once.
fn tree(
    settings: &Settings,
    file: &Path,
    question: &str,
    history: &[Exchange],
    json: bool,
) -> Result<Answer> {
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
    let mut session = session?
        .with_answer_settings(settings.answer.clone())
        .with_conversation(settings.conversation.clone());
    let (search, params) = (&settings.search, &settings.sampling);
    let cancel = AtomicBool::new(false);
    let mut stream = Stream::new();
    let mut piece = |p: &str| {
        if !json {
            stream.piece(p)
        }
    };
    let mut answer = session.ask(question, history, search, params, &cancel, &mut piece);
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
                .with_answer_settings(settings.answer.clone())
                .with_conversation(settings.conversation.clone());
            answer = session.ask(question, history, search, params, &cancel, &mut piece);
        }
    }
    let mut answer = answer?;
    answer.timings.open_ms = Some(open_ms);
    if json {
        stream.finish(&(serde_json::to_string_pretty(&answer)? + "\n"))?;
        return Ok(answer);
    }
    stream.finish("\n")?;
    report_history(&answer);
    report_tree_answer(&answer);
    Ok(answer)
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
