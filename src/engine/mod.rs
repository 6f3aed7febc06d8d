//! One question end to end: build the prompt around the document, run the model, stream the
//! answer, measure it.
//!
//! `tree` answers from a stored context tree ([`TreeSession`], built by [`ingest`]); the
//! methods in this file need no tree and are the baselines it is measured against, in the
//! same engine with the same model: `truncate` (start and end of the document, the middle
//! cut, full attention), `full` (the whole document, only when it fits the window), `rag`
//! (the BM25-best chunks as text) and `stream` (StreamingLLM's state after reading: the
//! prompt's first tokens as attention sink and the most recent document tokens that fit).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::document::Document;
use crate::model::{
    decode, prefill, Embedder, Encoded, GenerationStats, Llm, Message, ModelChoice, ModelError,
    SamplingParams, StopReason,
};
use crate::tree::search::{Fusion, Scorer, SearchSettings};
use crate::tree::{chunk, Bm25};

pub mod conversation;
pub mod dense;
pub mod ingest;
pub mod session;
mod tree_answer;
pub mod trust;

pub use conversation::{ConversationSettings, Exchange};
pub use tree_answer::{DenseIndex, NodeHit, Prepared, Retrieval, TreeSession, CANDIDATES};

/// What the model is told about its job. Short: a 135M model follows short instructions best.
pub const SYSTEM_PROMPT: &str = "You answer questions about a document. Use only the document. \
If the document does not contain the answer, say that it does not.";

/// Stand in for the document and the question while the template is rendered, so both are
/// tokenized as plain text (a book or a question containing `<|im_end|>` cannot end the turn).
const DOC_SLOT: &str = "\u{0}SLM_CHAT_DOCUMENT\u{0}";
const QUESTION_SLOT: &str = "\u{0}SLM_CHAT_QUESTION\u{0}";

/// What a concise answer is asked to be, after the question.
const CONCISE: &str = "\nAnswer in one short sentence.";

/// Marks where `truncate` cut the middle out.
pub(crate) const CUT_MARK: &str = "\n\n[…]\n\n";

/// How the document reaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The context tree: the question's best nodes at fine grain, the rest coarse, injected
    /// as KV (SharedLLM, training-free).
    Tree,
    /// Keep the start and the end of the document, cut the middle, full attention.
    Truncate,
    /// The whole document; an error when it does not fit the model's window.
    Full,
    /// The chunks that best match the question (BM25), in document order, as text.
    Rag,
    /// StreamingLLM's state after reading the document: the prompt's first tokens as the
    /// attention sink and the most recent document tokens that fit.
    Stream,
}

/// Everything the engine reads from the user's settings (`config.toml`, environment and flags
/// are layered into these by `config`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: ModelChoice,
    pub ingest: ingest::IngestSettings,
    pub search: SearchSettings,
    pub rag: RagSettings,
    pub sampling: SamplingParams,
    pub answer: AnswerSettings,
    pub conversation: ConversationSettings,
}

/// `[rag]`: the BM25 passages method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RagSettings {
    /// Tokens per chunk (cut at a sentence end within ±10 %).
    pub chunk_tokens: usize,
    /// Most document tokens `--method rag` puts in the prompt.
    pub max_tokens: usize,
}

impl Default for RagSettings {
    fn default() -> Self {
        Self {
            chunk_tokens: 256,
            max_tokens: 1536,
        }
    }
}

/// `[answer]`: how answers are given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnswerSettings {
    /// Answer "The document does not say" (with the closest pages) when the evidence score
    /// is below `abstain_threshold` (`tree` answers).
    pub abstain: bool,
    /// Lower answers more, higher abstains more.
    pub abstain_threshold: f64,
    /// Ask for the answer in one short sentence (a line after the question).
    pub concise: bool,
}

impl Default for AnswerSettings {
    fn default() -> Self {
        Self {
            abstain: true,
            abstain_threshold: trust::THRESHOLD,
            concise: false,
        }
    }
}

/// How `ask` builds its prompt, beyond the method.
#[derive(Debug, Clone)]
pub struct AskSettings {
    pub method: Method,
    /// Tokens per chunk for `rag`.
    pub chunk_tokens: usize,
    /// Most document tokens `rag` puts in the prompt.
    pub rag_tokens: usize,
    /// How `rag` ranks its chunks (`bm25`, `dense` or `hybrid`; the tree-only scorers rank
    /// as `bm25`), and how `hybrid` fuses.
    pub scorer: Scorer,
    pub fusion: Fusion,
    /// The sentence embedder for `dense` and `hybrid` (without it `rag` ranks with BM25).
    pub embedder: Option<Arc<Embedder>>,
    /// Ask for a one-sentence answer ([`AnswerSettings::concise`]).
    pub concise: bool,
    /// The earlier turns the question follows, oldest first, and how much of them to carry.
    pub history: Vec<Exchange>,
    pub conversation: ConversationSettings,
}

impl AskSettings {
    /// `method` with the `rag` and search settings in force.
    pub fn new(
        method: Method,
        rag: &RagSettings,
        search: &SearchSettings,
        embedder: Option<Arc<Embedder>>,
    ) -> Self {
        Self {
            method,
            chunk_tokens: rag.chunk_tokens,
            rag_tokens: rag.max_tokens,
            scorer: search.scorer,
            fusion: search.fusion,
            embedder,
            concise: false,
            history: Vec::new(),
            conversation: ConversationSettings::default(),
        }
    }

    /// The same, asking for one-sentence answers when `concise`.
    pub fn concise(mut self, concise: bool) -> Self {
        self.concise = concise;
        self
    }

    /// The same, following the earlier turns `history` as `conversation` says.
    pub fn following(mut self, history: &[Exchange], conversation: &ConversationSettings) -> Self {
        self.history = history.to_vec();
        self.conversation = conversation.clone();
        self
    }
}

/// A part of the document the answer was given from.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub chunk: usize,
    pub first_page: u32,
    pub last_page: u32,
    pub score: f64,
    pub tokens: usize,
    /// Byte range of its text in the document text.
    pub chars: (usize, usize),
    /// The passage's first words, on one line.
    pub preview: String,
}

/// What went wrong answering.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "the document is {doc} tokens and only {room} fit the model's {window}-token window \
         after the prompt and the answer's --max-tokens; use --method truncate or rag"
    )]
    TooLong {
        doc: usize,
        room: usize,
        window: usize,
    },
    #[error("the question is empty")]
    EmptyQuestion,
    #[error("no passage of the document shares a word with the question; rephrase it, or use --method truncate")]
    NothingMatches,
    #[error("the tree method answers through a TreeSession over a stored tree")]
    NeedsTree,
    #[error("the document has no text to read")]
    EmptyDocument,
    #[error("{0} changed while it was being read; run again once it is saved")]
    Changed(String),
    #[error("stopped")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Document(#[from] crate::document::DocumentError),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(e.into())
    }
}

/// A finished answer with its figures.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub answer: String,
    /// The ids the model generated (stop token excluded; none when it abstained): what two
    /// runs are compared on, since `answer` is trimmed text.
    pub answer_tokens: Vec<u32>,
    /// The evidence said the document holds no answer: `answer` is [`trust::not_found`]'s
    /// sentence, not the model's.
    pub abstained: bool,
    /// For `tree`: what the evidence measured before the answer was written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<trust::Evidence>,
    /// For `tree`: the answer's key words and which of `nodes` (read at full resolution)
    /// hold them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub support: Option<trust::Support>,
    pub method: Method,
    pub stop: StopReason,
    pub document_tokens: usize,
    /// Document tokens the model actually saw.
    pub kept_tokens: usize,
    /// For `rag`: the passages used, best first.
    pub sources: Vec<Source>,
    /// For `tree`: the injected nodes in document order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeHit>,
    /// For `tree`: byte ranges of the best-ranked leaves before the budgets cut them, best
    /// first (what `eval` measures recall at K on).
    #[serde(skip)]
    pub candidates: Vec<(usize, usize)>,
    pub prompt_tokens: usize,
    /// Earlier turns of the conversation the prompt carried (the latest that fit).
    #[serde(skip_serializing_if = "is_zero")]
    pub history_turns: usize,
    pub timings: Timings,
    pub memory: Memory,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// How long the answer took.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// For `tree`: scoring and choosing the nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_ms: Option<f64>,
    /// For `tree` from the command line: finding and opening the stored tree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_ms: Option<f64>,
    /// For `tree`, after the search: putting the chosen nodes into the cache (with reread,
    /// prefilling the passages read again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inject_ms: Option<f64>,
    /// For `tree`: document tokens (and cut marks) read again as text during `inject_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reread_tokens: Option<usize>,
    /// For `tree` following earlier turns: the tokens of the conversation run through the
    /// model for this question (the rest of it was kept from the turn before).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_tokens_run: Option<usize>,
    pub first_token_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub decode_tokens: usize,
    pub total_ms: f64,
}

/// What the answer held in memory.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// KV cache bytes at the end of the answer.
    pub kv_bytes: usize,
    pub weight_bytes: usize,
    pub peak_rss_bytes: Option<u64>,
    /// For `tree`: entries placed in the cache for the document (stored, or read again as
    /// text) and their bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injected_entries: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injected_bytes: Option<usize>,
    /// For `tree`: the f16 KV full attention over the whole document would need.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_attention_kv_bytes: Option<usize>,
    /// For `tree`: the stored tree on disk, and how much of it is mapped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapped_bytes: Option<u64>,
}

/// The prompt split around the document: `prefix ++ document ++ suffix`.
struct PromptParts {
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

fn prompt_parts(
    llm: &Llm,
    history: &[Exchange],
    question: &str,
    concise: bool,
) -> Result<PromptParts, EngineError> {
    // What is asked of the answer follows the question, so the prefix (and with it every
    // stored tree's sink) is the same whatever is asked.
    let user = format!(
        "Read the following document and answer the question at the end.\n\n{DOC_SLOT}\n\nQuestion: {QUESTION_SLOT}{}",
        if concise { CONCISE } else { "" }
    );
    // Earlier turns come before the document, as the chat they were: their tokens do not
    // change from one question to the next, so their KV can be kept (the document's does).
    let texts: Vec<&str> = history
        .iter()
        .flat_map(|e| [e.question.trim(), e.answer.trim()])
        .collect();
    let slots: Vec<String> = (0..texts.len()).map(turn_slot).collect();
    let mut messages = vec![Message::system(SYSTEM_PROMPT)];
    for pair in slots.chunks(2) {
        messages.push(Message::user(pair[0].clone()));
        messages.push(Message::assistant(pair[1].clone()));
    }
    messages.push(Message::user(user));
    let text = llm.chat.render(&messages, true)?;
    let dropped = || ModelError::Template("the template dropped the user's message".into());
    let tk = &llm.tokenizer;
    let mut prefix = Vec::new();
    let mut rest = text.as_str();
    for (slot, content) in slots.iter().zip(&texts) {
        let (before, after) = rest.split_once(slot.as_str()).ok_or_else(dropped)?;
        prefix.extend(tk.encode(before, true)?);
        prefix.extend(tk.encode(content, false)?);
        rest = after;
    }
    let (before, rest) = rest.split_once(DOC_SLOT).ok_or_else(dropped)?;
    prefix.extend(tk.encode(before, true)?);
    let (middle, after) = rest.split_once(QUESTION_SLOT).ok_or_else(dropped)?;
    let suffix = [
        tk.encode(middle, true)?,
        tk.encode(question, false)?,
        tk.encode(after, true)?,
    ]
    .concat();
    Ok(PromptParts { prefix, suffix })
}

/// Stands in for the `i`th text of earlier turns while the template is rendered (tokenized
/// as plain text, like the question).
fn turn_slot(i: usize) -> String {
    format!("\u{0}SLM_CHAT_TURN_{i}\u{0}")
}

/// The tokens before the document in every prompt: the sink prefix chunks are encoded after.
pub fn sink_prefix(llm: &Llm) -> Result<Vec<u32>, EngineError> {
    Ok(prompt_parts(llm, &[], "", false)?.prefix)
}

/// Answer `question` about `doc`, calling `on_text` with each new piece of the answer.
pub fn ask(
    llm: &Llm,
    doc: &Document,
    question: &str,
    settings: &AskSettings,
    params: &SamplingParams,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Answer, EngineError> {
    let start = Instant::now();
    if question.trim().is_empty() {
        return Err(EngineError::EmptyQuestion);
    }
    let method = settings.method;
    let history = conversation::recent(
        &settings.history,
        &llm.tokenizer,
        settings.conversation.history_tokens,
    )?;
    let parts = prompt_parts(llm, history, question.trim(), settings.concise)?;
    let enc = llm.tokenizer.encode_with_offsets(&doc.text)?;
    let doc_tokens = &enc.ids;
    let window = llm.model.config().context_length;
    let room = window.saturating_sub(parts.prefix.len() + parts.suffix.len() + params.max_tokens);
    let mut sources = Vec::new();
    let (kept, seen) = match method {
        Method::Rag => {
            let context = conversation::search_context(history);
            let (kept, chosen) = rag_passages(llm, doc, &enc, question, &context, settings, room)?;
            let seen = chosen.iter().map(|s| s.tokens).sum();
            sources = chosen;
            (kept, seen)
        }
        Method::Tree => return Err(EngineError::NeedsTree),
        _ if doc_tokens.len() <= room => (doc_tokens.to_vec(), doc_tokens.len()),
        Method::Stream => {
            let kept = doc_tokens[doc_tokens.len() - room..].to_vec();
            (kept, room)
        }
        Method::Full => {
            return Err(EngineError::TooLong {
                doc: doc_tokens.len(),
                room,
                window,
            })
        }
        Method::Truncate => truncated(llm, doc_tokens, room)?,
    };
    let prompt = [&parts.prefix[..], &kept[..], &parts.suffix[..]].concat();
    let mut cache = llm.model.new_cache();
    let (m, tk) = (&llm.model, &llm.tokenizer);
    let pre = prefill(m, &prompt, &mut cache, params)?;
    // As for the tree: the question's runs may come back whole, the document's may not.
    let gen = decode(
        m,
        tk,
        pre,
        &parts.suffix,
        &mut cache,
        params,
        cancel,
        on_text,
    )?;
    Ok(Answer {
        answer: gen.text.trim().to_string(),
        answer_tokens: gen.tokens,
        abstained: false,
        evidence: None,
        support: None,
        method,
        stop: gen.stop,
        document_tokens: doc_tokens.len(),
        kept_tokens: seen,
        sources,
        nodes: Vec::new(),
        candidates: Vec::new(),
        prompt_tokens: prompt.len(),
        history_turns: history.len(),
        timings: timings(&gen.stats, start),
        memory: Memory {
            kv_bytes: cache.bytes(),
            weight_bytes: llm.model.weight_bytes(),
            peak_rss_bytes: crate::sys::peak_rss_bytes(),
            injected_entries: None,
            injected_bytes: None,
            full_attention_kv_bytes: None,
            store_bytes: None,
            mapped_bytes: None,
        },
    })
}

/// `truncate`: the start and the end of the document around the cut mark, `room` tokens in
/// all; the document tokens kept, and how many.
fn truncated(llm: &Llm, doc: &[u32], room: usize) -> Result<(Vec<u32>, usize), EngineError> {
    let mark = llm.tokenizer.encode(CUT_MARK, false)?;
    let keep = room.saturating_sub(mark.len());
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let kept = [&doc[..head], &mark[..], &doc[doc.len() - tail..]].concat();
    Ok((kept, keep))
}

/// The best BM25 chunks for `question` that fit `min(room, rag_tokens)`, as prompt tokens in
/// document order (separated by a cut mark), and the sources best first.
fn rag_passages(
    llm: &Llm,
    doc: &Document,
    enc: &Encoded,
    question: &str,
    context: &str,
    settings: &AskSettings,
    room: usize,
) -> Result<(Vec<u32>, Vec<Source>), EngineError> {
    let chunks = chunk(doc, enc, settings.chunk_tokens);
    let texts: Vec<&str> = chunks.iter().map(|c| &doc.text[c.text.clone()]).collect();
    let index = Bm25::new(texts.iter().copied());
    let bm25 = index.scores_with(question, context, settings.conversation.search_weight);
    let embedder = settings
        .embedder
        .as_ref()
        .filter(|_| settings.scorer.is_dense());
    let scores = match embedder {
        Some(e) => {
            let w = settings.conversation.search_weight as f32;
            let q = if w > 0.0 && !context.is_empty() {
                let both = e.embed(&[question, context])?;
                let (q, c) = both.split_at(e.dim());
                conversation::mix(q, c, w)
            } else {
                e.embed(&[question])?
            };
            let dense: Vec<f64> = e
                .embed_memo(&texts)?
                .chunks_exact(e.dim())
                .map(|v| v.iter().zip(&q).map(|(a, b)| (a * b) as f64).sum())
                .collect();
            if settings.scorer == Scorer::Dense {
                dense
            } else {
                crate::tree::search::fuse(settings.fusion, &bm25, &dense)
            }
        }
        None => bm25.clone(),
    };
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mark = llm.tokenizer.encode(CUT_MARK, false)?;
    let budget = room.min(settings.rag_tokens);
    let mut used = 0;
    let mut chosen = Vec::new();
    // Chunks sharing no word with the question say nothing about it to BM25: leave them out
    // (dense and hybrid rank every chunk).
    for i in order
        .into_iter()
        .filter(|&i| embedder.is_some() || bm25[i] > 0.0)
    {
        let cost = chunks[i].tokens.len() + mark.len();
        if used + cost > budget {
            continue;
        }
        used += cost;
        chosen.push(i);
    }
    if chosen.is_empty() {
        return Err(EngineError::NothingMatches);
    }
    let sources = chosen
        .iter()
        .map(|&i| {
            let c = &chunks[i];
            Source {
                chunk: i,
                first_page: *c.pages.start(),
                last_page: *c.pages.end(),
                score: scores[i],
                tokens: c.tokens.len(),
                chars: (c.text.start, c.text.end),
                preview: preview(&doc.text[c.text.clone()]),
            }
        })
        .collect();
    chosen.sort_unstable();
    let mut kept = Vec::with_capacity(used);
    for (n, &i) in chosen.iter().enumerate() {
        if n > 0 {
            kept.extend_from_slice(&mark);
        }
        kept.extend_from_slice(&enc.ids[chunks[i].tokens.clone()]);
    }
    Ok((kept, sources))
}

/// The first words of a passage on one line.
pub fn preview(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}

fn timings(s: &GenerationStats, start: Instant) -> Timings {
    Timings {
        search_ms: None,
        open_ms: None,
        inject_ms: None,
        reread_tokens: None,
        history_tokens_run: None,
        first_token_ms: s.first_token_secs * 1e3,
        prefill_tok_s: s.prefill_tok_s(),
        decode_tok_s: s.decode_tok_s(),
        decode_tokens: s.decode_tokens,
        total_ms: start.elapsed().as_secs_f64() * 1e3,
    }
}
