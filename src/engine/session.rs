//! A conversation about one document on its own thread: the front end (TUI) sends
//! [`Request`]s and receives [`Event`]s, and never touches the model.
//!
//! The worker resolves the model, loads the document, opens or builds its context tree,
//! then answers questions one at a time. Everything it has to say goes through the event
//! channel, so the UI thread never blocks on the model.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

/// What the front end asks the worker to do.
#[derive(Debug, Clone)]
pub enum Request {
    /// Answer `question` about the document, following `history` (the earlier turns of its
    /// conversation, oldest first; empty for a question on its own).
    Ask {
        question: String,
        history: Vec<super::Exchange>,
    },
    /// Finish what is running and stop the worker.
    Quit,
}

/// The stage of getting ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Finding (or downloading) and loading the model.
    Model,
    /// Reading the document's text.
    Document,
    /// Encoding chunks with the lower model (building the tree).
    Encode,
    /// Opening a tree built earlier.
    Open,
    /// Embedding the tree's passages for dense search (once per tree).
    Embed,
}

/// How far getting ready has come.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub stage: Stage,
    /// Units done (chunks while encoding; 0/0 when the stage has no count).
    pub done: usize,
    pub total: usize,
    /// Tokens per second while encoding.
    pub tok_s: f64,
    /// Seconds left, when it can be estimated.
    pub eta_secs: Option<f64>,
    /// One line saying what is happening ("downloading the default model…").
    pub message: String,
}

/// One node of the context tree, as the UI shows it (the same record `ask --json` prints).
pub type NodeView = super::NodeHit;

/// The document and its tree, sent once when the worker is ready.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeView {
    /// The file as the user named it.
    pub title: String,
    /// The document text nodes point into.
    pub text: Arc<str>,
    pub document_tokens: usize,
    /// Every node of every chunk, chunk by chunk, each chunk's root first then level by level.
    pub nodes: Vec<NodeView>,
    /// Bytes of the tree on disk (0 when there is no stored tree).
    pub store_bytes: u64,
    /// Stable key of the document (for per-book history).
    pub document_key: String,
}

/// Live figures for the status bar.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub model: String,
    pub device: String,
    pub rss_bytes: u64,
    pub store_bytes: u64,
    /// Bytes of the store mapped into memory.
    pub mapped_bytes: u64,
    /// KV entries injected for the current answer, their bytes, and the entry budget.
    pub injected_tokens: usize,
    pub injected_bytes: u64,
    pub budget_tokens: usize,
    pub first_token_ms: Option<f64>,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Answer tokens so far.
    pub decode_tokens: usize,
}

/// Why an answer ended, with its final text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub answer: String,
    /// "end of turn", "token limit" or "stopped".
    pub stop: String,
    /// `Some(false)`: no passage read at full resolution holds the answer's key words (the
    /// model answered from memory); `None` when there was nothing to check.
    pub supported: Option<bool>,
}

/// What the worker reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Progress(Progress),
    /// The tree is open; questions may be asked.
    Ready(TreeView),
    /// The next piece of the answer being generated.
    Token(String),
    /// The nodes chosen for the current answer, in document order.
    Expanded(Vec<NodeView>),
    Stats(Stats),
    Done(Done),
    /// Something failed; before `Ready` the session cannot go on.
    Error(String),
}

/// The session's document, and the settings its model, tree and answers follow.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub file: PathBuf,
    pub settings: super::Settings,
}

/// A running worker: send requests, receive events, set `cancel` to stop the answer being
/// generated (not the session).
pub struct Session {
    pub requests: Sender<Request>,
    pub events: Receiver<Event>,
    pub cancel: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl Session {
    /// Stop the worker and wait for it.
    pub fn shutdown(mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        let _ = self.requests.send(Request::Quit);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Start the worker thread for `opts`.
pub fn start(opts: SessionOptions) -> Session {
    let (req_tx, req_rx) = mpsc::channel();
    let (ev_tx, ev_rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let worker = std::thread::Builder::new()
        .name("slm-chat-engine".into())
        .spawn(move || worker::run(opts, req_rx, ev_tx, flag))
        .ok();
    Session {
        requests: req_tx,
        events: ev_rx,
        cancel,
        worker,
    }
}

#[path = "session_worker.rs"]
mod worker;
