//! The session's thread: get ready, then answer questions until told to quit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use super::{Done, Event, NodeView, Progress, Request, SessionOptions, Stage, Stats, TreeView};
use crate::document::{self, Document, LoadOptions};
use crate::engine::{self, AskSettings, Method};
use crate::model::{self, Llm, SamplingParams};
use crate::tree::chunk;

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
    let (llm, doc) = match prepare(&opts, &out) {
        Ok(ready) => ready,
        Err(e) => {
            out.send(Event::Error(format!("{e:#}")));
            return;
        }
    };
    let view = match tree_view(&opts, &llm, &doc) {
        Ok(v) => v,
        Err(e) => {
            out.send(Event::Error(format!("{e:#}")));
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
        ..Stats::default()
    };
    out.send(Event::Stats(with_rss(base.clone())));
    while let Ok(req) = requests.recv() {
        match req {
            Request::Quit => return,
            Request::Ask(question) => {
                cancel.store(false, Ordering::SeqCst);
                if !answer(&opts, &llm, &doc, &question, &cancel, &out, &base) {
                    return;
                }
            }
        }
    }
}

fn prepare(opts: &SessionOptions, out: &Reporter) -> anyhow::Result<(Llm, Document)> {
    out.progress(Stage::Document, format!("reading {}", opts.file.display()));
    let exe = std::env::current_exe()?;
    let doc = document::load(&opts.file, &LoadOptions::new(exe))?;
    out.progress(Stage::Model, "loading the model");
    let config = &opts.config;
    let path = if config.model.path.is_empty() {
        model::ensure_default_model(&config.models_dir(), &mut |m| {
            out.progress(Stage::Model, m);
        })?
    } else {
        config.model.path.clone().into()
    };
    let device = model::select_device(config.model.device)?;
    Ok((model::load(&path, &device)?, doc))
}

fn tree_view(opts: &SessionOptions, llm: &Llm, doc: &Document) -> anyhow::Result<TreeView> {
    let enc = llm.tokenizer.encode_with_offsets(&doc.text)?;
    let chunks = chunk(doc, &enc, opts.config.rag.chunk_tokens);
    let nodes = chunks
        .iter()
        .map(|c| NodeView {
            chunk: c.index,
            level: 0,
            index: 0,
            alpha: 1,
            score: 0.0,
            tokens: (c.tokens.start, c.tokens.end),
            chars: (c.text.start, c.text.end),
            pages: (*c.pages.start(), *c.pages.end()),
            preview: engine::preview(&doc.text[c.text.clone()]),
        })
        .collect();
    Ok(TreeView {
        title: opts.file.display().to_string(),
        text: doc.text.as_str().into(),
        document_tokens: enc.ids.len(),
        nodes,
        store_bytes: 0,
        document_key: String::new(),
    })
}

fn with_rss(mut s: Stats) -> Stats {
    s.rss_bytes = crate::sys::rss_bytes().unwrap_or(0);
    s
}

/// Answer one question; false when the UI has gone.
fn answer(
    opts: &SessionOptions,
    llm: &Llm,
    doc: &Document,
    question: &str,
    cancel: &AtomicBool,
    out: &Reporter,
    base: &Stats,
) -> bool {
    let g = &opts.config.generate;
    let params = SamplingParams {
        temperature: g.temperature as f32,
        top_p: g.top_p as f32,
        seed: g.seed,
        max_tokens: g.max_tokens,
    };
    let settings = AskSettings {
        method: Method::Rag,
        chunk_tokens: opts.config.rag.chunk_tokens,
        rag_tokens: opts.config.rag.max_tokens,
    };
    let mut alive = true;
    let mut on_text = |piece: &str| {
        alive &= out.send(Event::Token(piece.to_string()));
    };
    match engine::ask(llm, doc, question, &settings, &params, cancel, &mut on_text) {
        Ok(a) => {
            let mut nodes: Vec<NodeView> = a
                .sources
                .iter()
                .map(|s| NodeView {
                    chunk: s.chunk,
                    level: 0,
                    index: 0,
                    alpha: 1,
                    score: s.score as f32,
                    tokens: (0, 0),
                    chars: (0, 0),
                    pages: (s.first_page, s.last_page),
                    preview: s.preview.clone(),
                })
                .collect();
            nodes.sort_by_key(|n| n.chunk);
            out.send(Event::Expanded(nodes));
            out.send(Event::Stats(with_rss(Stats {
                injected_tokens: a.kept_tokens,
                injected_bytes: a.memory.kv_bytes as u64,
                budget_tokens: settings.rag_tokens,
                first_token_ms: Some(a.timings.first_token_ms),
                prefill_tok_s: a.timings.prefill_tok_s,
                decode_tok_s: a.timings.decode_tok_s,
                decode_tokens: a.timings.decode_tokens,
                ..base.clone()
            })));
            alive
                && out.send(Event::Done(Done {
                    answer: a.answer,
                    stop: a.stop.to_string(),
                }))
        }
        Err(e) => out.send(Event::Error(e.to_string())),
    }
}
