//! The session's thread: get ready (model, tree), then answer questions until told to quit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use super::{Done, Event, NodeView, Progress, Request, SessionOptions, Stage, Stats, TreeView};
use crate::engine::{ingest, EngineError, NodeHit, TreeSession};
use crate::model::{self, Llm};
use crate::store::{StoreError, Tree};
use crate::tree::layout::node_at;

/// Report to the UI; a closed channel means the UI has gone, and the worker ends with it.
struct Reporter(Sender<Event>);

impl Reporter {
    fn send(&self, e: Event) -> bool {
        self.0.send(e).is_ok()
    }

    fn progress(&self, stage: Stage, message: impl Into<String>) -> bool {
        self.send(Event::Progress(Progress {
            stage,
            done: 0,
            total: 0,
            tok_s: 0.0,
            eta_secs: None,
            message: message.into(),
        }))
    }
}

pub(super) fn run(
    opts: SessionOptions,
    requests: Receiver<Request>,
    events: Sender<Event>,
    cancel: Arc<AtomicBool>,
) {
    let out = Reporter(events);
    let llm = match load_model(&opts, &out) {
        Ok(llm) => llm,
        Err(e) => {
            out.send(Event::Error(e.to_string()));
            return;
        }
    };
    let tree = match open_tree(&opts, &llm, &out, &cancel) {
        Ok(t) => t,
        Err(EngineError::Cancelled) => return,
        Err(e) => {
            out.send(Event::Error(e.to_string()));
            return;
        }
    };
    let view = tree_view(&opts, &tree);
    let s = &opts.settings;
    let embedder = crate::engine::dense::load_embedder(s.search.scorer, &s.model, &mut |m| {
        out.progress(Stage::Open, m);
    });
    let mut say = |p: &Progress| {
        out.send(Event::Progress(p.clone()));
    };
    let mut session = match crate::engine::dense::session(&llm, tree, embedder.as_ref(), &mut say) {
        Ok(s) => s
            .with_answer_settings(opts.settings.answer.clone())
            .with_conversation(opts.settings.conversation.clone()),
        Err(e) => {
            out.send(Event::Error(e.to_string()));
            return;
        }
    };
    if !out.send(Event::Ready(view)) {
        return;
    }
    let base = Stats {
        model: llm
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        device: model::device_name(llm.model.device()).to_string(),
        store_bytes: session.tree().disk_bytes(),
        mapped_bytes: session.tree().mapped_bytes(),
        ..Stats::default()
    };
    out.send(Event::Stats(with_rss(base.clone())));
    while let Ok(req) = requests.recv() {
        match req {
            Request::Quit => return,
            Request::Ask { question, history } => {
                cancel.store(false, Ordering::SeqCst);
                match answer(
                    &opts,
                    &mut session,
                    &question,
                    &history,
                    &cancel,
                    &out,
                    &base,
                ) {
                    Ok(Outcome::Answered(answered)) => {
                        // The conversation so far goes through the model now, while the
                        // answer is read: the follow-up starts from its KV.
                        let mut turns = history;
                        turns.push(crate::engine::Exchange::new(question, answered));
                        if let Err(e) = session.prime(&turns) {
                            tracing::warn!(error = %e, "could not keep the conversation's KV");
                        }
                    }
                    Ok(Outcome::Failed) => {}
                    Ok(Outcome::Gone) => return,
                    Err(damage) => {
                        // A tensor the question read failed its checksum: build the tree
                        // again (showing progress), then go on with the new one.
                        match rebuild(&opts, &llm, embedder.as_ref(), &damage, &out, &cancel) {
                            Ok((s, view)) => {
                                session = s;
                                if !out.send(Event::Ready(view)) {
                                    return;
                                }
                                out.send(Event::Error(format!(
                                    "{damage}; it was built again — ask the question again"
                                )));
                            }
                            Err(e) => {
                                out.send(Event::Error(e.to_string()));
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Build the damaged tree again and open a session on the new one.
fn rebuild<'l>(
    opts: &SessionOptions,
    llm: &'l Llm,
    embedder: Option<&Arc<crate::model::Embedder>>,
    damage: &StoreError,
    out: &Reporter,
    cancel: &AtomicBool,
) -> Result<(TreeSession<'l>, TreeView), EngineError> {
    let mut say = |p: &Progress| {
        out.send(Event::Progress(p.clone()));
    };
    let (tree, _) = ingest::rebuild(
        llm,
        &opts.file,
        &opts.settings.ingest,
        damage,
        &mut say,
        cancel,
    )?;
    let view = tree_view(opts, &tree);
    let session = crate::engine::dense::session(llm, tree, embedder, &mut say)?;
    Ok((
        session
            .with_answer_settings(opts.settings.answer.clone())
            .with_conversation(opts.settings.conversation.clone()),
        view,
    ))
}

fn load_model(opts: &SessionOptions, out: &Reporter) -> Result<Llm, model::ModelError> {
    out.progress(Stage::Model, "loading the model");
    opts.settings.model.load(&mut |m| {
        out.progress(Stage::Model, m);
    })
}

fn open_tree(
    opts: &SessionOptions,
    llm: &Llm,
    out: &Reporter,
    cancel: &AtomicBool,
) -> Result<Tree, EngineError> {
    out.progress(
        Stage::Open,
        format!("looking for the tree of {}", opts.file.display()),
    );
    let mut say = |p: &Progress| {
        out.send(Event::Progress(p.clone()));
    };
    let (tree, _) = ingest::open_or_build(
        llm,
        &opts.file,
        &opts.settings.ingest,
        false,
        &mut say,
        cancel,
    )?;
    Ok(tree)
}

fn tree_view(opts: &SessionOptions, tree: &Tree) -> TreeView {
    let plan = &tree.manifest().plan;
    let text = tree.text();
    let nodes = plan
        .chunks
        .iter()
        .enumerate()
        .flat_map(|(c, chunk)| {
            chunk.nodes.iter().enumerate().map(move |(n, node)| {
                let (level, index) = node_at(n);
                NodeView {
                    chunk: c,
                    level,
                    index,
                    alpha: plan.config.alpha.get(level).copied().unwrap_or(1),
                    score: 0.0,
                    tokens: node.tokens,
                    chars: node.chars,
                    pages: node.pages,
                    preview: super::super::preview(&text[node.chars.0..node.chars.1]),
                    supports: None,
                }
            })
        })
        .collect();
    TreeView {
        title: opts.file.display().to_string(),
        text: text.into(),
        document_tokens: plan.tokens,
        nodes,
        store_bytes: tree.disk_bytes(),
        document_key: plan.document.clone(),
    }
}

fn with_rss(mut s: Stats) -> Stats {
    s.rss_bytes = crate::sys::rss_bytes().unwrap_or(0);
    s
}

/// How answering one question went.
enum Outcome {
    /// The answer (as the UI showed it).
    Answered(String),
    /// The UI was told why not.
    Failed,
    /// The UI has gone.
    Gone,
}

/// Answer one question following `history`; the damage when the stored tree failed a
/// checksum.
fn answer(
    opts: &SessionOptions,
    session: &mut TreeSession,
    question: &str,
    history: &[crate::engine::Exchange],
    cancel: &AtomicBool,
    out: &Reporter,
    base: &Stats,
) -> Result<Outcome, StoreError> {
    let params = &opts.settings.sampling;
    let plan = &session.tree().manifest().plan;
    let kv_per_entry = (plan.config.layers * 2 * plan.kv_dim * 4) as u64;
    // Both callbacks note whether the UI is still listening.
    let alive = std::cell::Cell::new(true);
    // The budget as the status bar shows it (a typical question's length assumed).
    let budget = session
        .budget(&opts.settings.search, 64, params.max_tokens)
        .total;
    let mut on_nodes = |nodes: &[NodeHit], entries: usize| {
        let sent = out.send(Event::Expanded(nodes.to_vec()))
            && out.send(Event::Stats(with_rss(Stats {
                injected_tokens: entries,
                injected_bytes: entries as u64 * kv_per_entry,
                budget_tokens: budget,
                ..base.clone()
            })));
        alive.set(alive.get() && sent);
    };
    let mut on_text = |piece: &str| {
        alive.set(alive.get() && out.send(Event::Token(piece.to_string())));
    };
    let result = session.ask_reporting(
        question,
        history,
        &opts.settings.search,
        params,
        cancel,
        &mut on_nodes,
        &mut on_text,
    );
    match result {
        Ok(a) => {
            out.send(Event::Stats(with_rss(Stats {
                injected_tokens: a.memory.injected_entries.unwrap_or(0),
                injected_bytes: a.memory.injected_bytes.unwrap_or(0) as u64,
                budget_tokens: budget,
                first_token_ms: Some(a.timings.first_token_ms),
                prefill_tok_s: a.timings.prefill_tok_s,
                decode_tok_s: a.timings.decode_tok_s,
                decode_tokens: a.timings.decode_tokens,
                mapped_bytes: a.memory.mapped_bytes.unwrap_or(0),
                ..base.clone()
            })));
            let done = Done {
                supported: a.support.as_ref().and_then(|s| s.supported()),
                answer: a.answer.clone(),
                stop: a.stop.to_string(),
            };
            Ok(if alive.get() && out.send(Event::Done(done)) {
                Outcome::Answered(a.answer)
            } else {
                Outcome::Gone
            })
        }
        Err(EngineError::Store(s)) if s.needs_rebuild() => Err(s),
        Err(e) if out.send(Event::Error(e.to_string())) => Ok(Outcome::Failed),
        Err(_) => Ok(Outcome::Gone),
    }
}
