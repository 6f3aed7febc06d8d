//! Answering from a stored context tree: score the nodes, choose what to inject, put the
//! chosen KV into the upper model's cache at its positions, and generate (METHOD.md,
//! "Search" and "Injection").

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

use super::conversation::{self, ConversationSettings, Exchange};
use super::trust::{self, Evidence, Support};
use super::{
    prompt_parts, timings, Answer, AnswerSettings, EngineError, Memory, Method, PromptParts,
};
use crate::model::{
    argmax, decode, fixed, log_softmax_at, prefill, Embedder, Forward, KvCache, LayerKv, Llm,
    SamplingParams,
};
use crate::store::{Plan, Tree};
use crate::tree::layout::{level_rows, node_number, node_spans};
use crate::tree::search::{
    self, Budget, Index, NodeKey, Positions, Query, Reread, SearchSettings, Selected, Shape,
};
use crate::tree::Encoder;

/// A node of the tree as `ask --json` and the TUI show it: one that went into an answer, or
/// (score 0) one of the tree's nodes before any question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHit {
    pub chunk: usize,
    /// 0 = the whole chunk; level `w` has `2^w` nodes.
    pub level: usize,
    /// Position within its level of its chunk (0-based, left to right).
    pub index: usize,
    /// Tokens per kept KV entry: 1 = full resolution.
    pub alpha: usize,
    /// How well the node matched the question (higher is better).
    pub score: f32,
    /// Document token range `[start, end)`.
    pub tokens: (usize, usize),
    /// Byte range of its text in the document text.
    pub chars: (usize, usize),
    /// First and last page (1-based).
    pub pages: (u32, u32),
    /// The first words of its text, on one line.
    pub preview: String,
    /// For a passage read at full resolution: whether it holds the answer's key words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supports: Option<bool>,
}

/// A question's upper-model cache, ready for its suffix.
pub struct Prepared {
    pub cache: KvCache,
    /// Tokens before the document: the sink, or the conversation so far and the sink's end.
    pub prefix_len: usize,
    /// Earlier turns in the prompt.
    pub history_turns: usize,
    /// Of `prefix_len`, the tokens run through the model for this question (the rest was
    /// kept from the conversation's earlier turns, or is the sink).
    pub prefix_run: usize,
    /// The prompt after the document: the question and the start of the answer turn.
    pub suffix: Vec<u32>,
    pub selected: Vec<Selected>,
    /// The best-ranked leaves' byte ranges, best first ([`Retrieval::candidates`]).
    pub candidates: Vec<(usize, usize)>,
    /// Whether the cut mark went in before each selected node.
    pub cuts: Vec<bool>,
    pub entries: usize,
    /// Of `entries`, the tokens run through the model as text (reread passages and marks).
    pub reread_tokens: usize,
    pub search_ms: f64,
    pub prepare_ms: f64,
}

/// An open tree ready for questions. Keeps the prompt prefix's KV and any leaves re-encoded
/// for earlier questions.
pub struct TreeSession<'a> {
    llm: &'a Llm,
    tree: Tree,
    /// Prompt prefix (= the sink chunks were encoded after) run through every layer.
    prefix: KvCache,
    prefix_len: usize,
    node_lens: Vec<Vec<usize>>,
    /// Full-resolution KV of chunks re-encoded for earlier questions (trees without leaves).
    reencoded: HashMap<usize, Vec<f16>>,
    /// The cut mark `rag` puts between its passages, and its KV encoded like a chunk (once,
    /// when a question first needs it).
    mark: Vec<u32>,
    mark_kv: Option<Vec<f16>>,
    /// The embedder and the tree's dense node vectors, for `dense` and `hybrid`.
    dense: Option<DenseIndex>,
    /// When to answer that the document does not say, and how to ask.
    answer: AnswerSettings,
    /// How much of a conversation follow-up questions carry.
    conversation: ConversationSettings,
    /// The last conversation's prompt before the document, and its KV: the next turn's
    /// prompt begins with it, so only the newest turn is run through the model.
    kept: Option<(Vec<u32>, KvCache)>,
    /// The last question, and the nodes it read at full resolution `(chunk, level,
    /// index)`: a follow-up to it keeps them among its candidates.
    last_read: Option<(String, Vec<NodeKey>)>,
}

/// What dense search needs: the embedder (for the question) and every node's vector.
pub struct DenseIndex {
    pub embedder: Arc<Embedder>,
    /// `(chunks × nodes, dim)`, unit length.
    pub vectors: Vec<f32>,
}

/// What a question's search chose, before anything is injected.
#[derive(Debug, Clone)]
pub struct Retrieval {
    pub selected: Vec<Selected>,
    /// Byte ranges of the best-ranked leaves, best first (the candidates before the budgets
    /// cut them; at most [`CANDIDATES`]).
    pub candidates: Vec<(usize, usize)>,
    /// The scorer that ran (`bm25` where dense search was asked for and is not available).
    pub scorer: search::Scorer,
}

/// Candidate leaves a retrieval reports.
pub const CANDIDATES: usize = 16;

impl<'a> TreeSession<'a> {
    pub fn new(llm: &'a Llm, tree: Tree) -> Result<Self, EngineError> {
        let sink = &tree.manifest().plan.config.sink;
        let mut prefix = llm.model.new_cache();
        llm.model.prefill(sink, &mut prefix)?;
        let node_lens = tree
            .manifest()
            .plan
            .chunks
            .iter()
            .map(|c| c.nodes.iter().map(|n| n.tokens.1 - n.tokens.0).collect())
            .collect();
        Ok(Self {
            llm,
            prefix_len: sink.len(),
            tree,
            prefix,
            node_lens,
            reencoded: HashMap::new(),
            mark: llm.tokenizer.encode(super::CUT_MARK, false)?,
            mark_kv: None,
            dense: None,
            answer: AnswerSettings::default(),
            conversation: ConversationSettings::default(),
            kept: None,
            last_read: None,
        })
    }

    /// Carry conversations by `conversation`.
    pub fn with_conversation(mut self, conversation: ConversationSettings) -> Self {
        self.conversation = conversation;
        self
    }

    /// Abstain (or not) and prompt by `answer`.
    pub fn with_answer_settings(mut self, answer: AnswerSettings) -> Self {
        self.answer = answer;
        self
    }

    /// Dense search over `dense` for `dense` and `hybrid` scorers (without it they fall back
    /// to BM25).
    pub fn with_dense(mut self, dense: Option<DenseIndex>) -> Self {
        self.dense = dense;
        self
    }

    /// Whether this session can score with sentence embeddings.
    pub fn has_dense(&self) -> bool {
        self.dense.is_some()
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// The entry budget a question gets under `settings`.
    pub fn budget(&self, settings: &SearchSettings, suffix: usize, answer: usize) -> Budget {
        self.budget_for(settings, self.prefix_len + suffix, answer)
    }

    /// The entry budget left by a prompt of `prompt` tokens and an answer of `answer`.
    fn budget_for(&self, settings: &SearchSettings, prompt: usize, answer: usize) -> Budget {
        let window = self.llm.model.config().context_length;
        let room = window.saturating_sub(prompt + answer);
        Budget {
            total: if settings.budget == 0 {
                room
            } else {
                settings.budget.min(room)
            },
            fine: settings.fine_budget,
            fine_level: settings.fine_level,
            separator: if cut_marks(settings) {
                self.mark.len()
            } else {
                0
            },
            window: settings.window,
        }
    }

    /// Search the tree for `question` (a follow-up to `history`, the earlier turns of its
    /// conversation, oldest first) and build the upper model's cache: the prompt prefix
    /// (the conversation so far), then the chosen nodes' KV. The returned suffix (question
    /// and answer start) is what runs next.
    pub fn prepare(
        &mut self,
        question: &str,
        history: &[Exchange],
        settings: &SearchSettings,
        answer_tokens: usize,
    ) -> Result<Prepared, EngineError> {
        let start = Instant::now();
        let question = question.trim();
        if question.is_empty() {
            return Err(EngineError::EmptyQuestion);
        }
        let parts = prompt_parts(self.llm, &[], question, self.answer.concise)?;
        if parts.prefix.as_slice() != self.tree.manifest().plan.config.sink.as_slice() {
            return Err(EngineError::Model(crate::model::ModelError::Input(
                "the tree was encoded after a different prompt; build it again".into(),
            )));
        }
        let history = self.recent(history)?;
        let parts = if history.is_empty() {
            parts
        } else {
            prompt_parts(self.llm, history, question, self.answer.concise)?
        };
        let retrieval =
            self.search_following(question, history, &parts, settings, answer_tokens)?;
        let selected = retrieval.selected.clone();
        let search_ms = start.elapsed().as_secs_f64() * 1e3;
        let prefix_len = parts.prefix.len();
        let (mut cache, prefix_run) = if history.is_empty() {
            (self.prefix.fork()?, 0)
        } else {
            self.conversation_cache(&parts.prefix)?
        };
        let cuts = if cut_marks(settings) {
            self.cuts(&selected)
        } else {
            vec![false; selected.len()]
        };
        let planned = selected.iter().map(|s| s.entries).sum::<usize>()
            + cuts.iter().filter(|&&c| c).count() * self.mark.len();
        cache.reserve(prefix_len + planned + parts.suffix.len() + answer_tokens)?;
        let (entries, reread_tokens) =
            self.inject(&selected, &cuts, settings, prefix_len, &mut cache)?;
        Ok(Prepared {
            cache,
            prefix_len,
            history_turns: history.len(),
            prefix_run,
            suffix: parts.suffix,
            candidates: retrieval.candidates,
            selected,
            cuts,
            entries,
            reread_tokens,
            search_ms,
            prepare_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The nodes the last question read in full, when `history` follows it.
    fn carried(&self, history: &[Exchange]) -> &[NodeKey] {
        match (&self.last_read, history.last()) {
            (Some((asked, nodes)), Some(e)) if asked == e.question.trim() => nodes,
            _ => &[],
        }
    }

    /// Note what `question` read in full, for a follow-up to keep.
    fn remember(&mut self, question: &str, selected: &[Selected]) {
        let read = selected
            .iter()
            .filter(|s| s.alpha == 1)
            .map(|s| (s.chunk, s.level, s.index))
            .collect();
        self.last_read = Some((question.to_string(), read));
    }

    /// The latest turns of `history` that fit `[conversation] history_tokens`.
    fn recent<'h>(&self, history: &'h [Exchange]) -> Result<&'h [Exchange], EngineError> {
        Ok(conversation::recent(
            history,
            &self.llm.tokenizer,
            self.conversation.history_tokens,
        )?)
    }

    /// The cache holding `prefix` (a conversation's prompt before the document): the part
    /// it shares with the last conversation's (or the sink) is copied, the rest run now;
    /// with the count of tokens run.
    fn conversation_cache(&mut self, prefix: &[u32]) -> Result<(KvCache, usize), EngineError> {
        let common = |a: &[u32]| a.iter().zip(prefix).take_while(|(x, y)| x == y).count();
        let from_sink = common(&self.tree.manifest().plan.config.sink);
        let mut cache = match &self.kept {
            Some((tokens, kv)) if common(tokens) > from_sink => kv.fork_first(common(tokens))?,
            _ => self.prefix.fork_first(from_sink)?,
        };
        let have = cache.len();
        if have < prefix.len() {
            self.llm.model.prefill(&prefix[have..], &mut cache)?;
        }
        self.kept = Some((prefix.to_vec(), cache.fork()?));
        Ok((cache, prefix.len() - have))
    }

    /// Run the conversation `history` through the model now (while the user reads the
    /// answer and types), so its next question starts from its KV.
    pub fn prime(&mut self, history: &[Exchange]) -> Result<(), EngineError> {
        let history = self.recent(history)?;
        if !history.is_empty() {
            let parts = prompt_parts(self.llm, history, "", self.answer.concise)?;
            self.conversation_cache(&parts.prefix)?;
        }
        Ok(())
    }

    /// Answer `question` (following `history`), streaming the text to `on_text`.
    pub fn ask(
        &mut self,
        question: &str,
        history: &[Exchange],
        settings: &SearchSettings,
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer, EngineError> {
        self.ask_reporting(
            question,
            history,
            settings,
            params,
            cancel,
            &mut |_, _| {},
            on_text,
        )
    }

    /// [`ask`](Self::ask), also telling `on_nodes` the chosen nodes and the injected entry
    /// count as soon as they are in the cache (before the first token).
    #[allow(clippy::too_many_arguments)]
    pub fn ask_reporting(
        &mut self,
        question: &str,
        history: &[Exchange],
        settings: &SearchSettings,
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_nodes: &mut dyn FnMut(&[NodeHit], usize),
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer, EngineError> {
        let start = Instant::now();
        let mut p = self.prepare(question, history, settings, params.max_tokens)?;
        let mut nodes: Vec<NodeHit> = p.selected.iter().map(|s| self.hit(s)).collect();
        on_nodes(&nodes, p.entries);
        let m = &self.llm.model;
        let pre = prefill(m, &p.suffix, &mut p.cache, params)?;
        let evidence = self.weigh(question, &nodes, &pre.logits)?;
        let abstained = evidence.abstains(&self.answer);
        let gen = if abstained {
            // The closest passages: those read in full first, then the best scored.
            let mut best: Vec<&NodeHit> = nodes.iter().collect();
            best.sort_by(|a, b| {
                (a.alpha != 1)
                    .cmp(&(b.alpha != 1))
                    .then(b.score.total_cmp(&a.score))
            });
            let pages: Vec<(u32, u32)> = best.iter().map(|n| n.pages).collect();
            fixed(pre, &trust::not_found(&pages), on_text)
        } else {
            // The question's words may come back whole (its names); the passages' may not,
            // or the model copies a sentence of them twice.
            let tk = &self.llm.tokenizer;
            decode(m, tk, pre, &p.suffix, &mut p.cache, params, cancel, on_text)?
        };
        let answer = gen.text.trim().to_string();
        let support = (!abstained).then(|| self.support(question, &answer, &mut nodes));
        let plan = &self.tree.manifest().plan;
        let mut t = timings(&gen.stats, start);
        // Time to first token counts from the question: search and injection included.
        t.first_token_ms += p.prepare_ms;
        t.search_ms = Some(p.search_ms);
        t.inject_ms = Some(p.prepare_ms - p.search_ms);
        t.reread_tokens = Some(p.reread_tokens);
        t.history_tokens_run = (p.history_turns > 0).then_some(p.prefix_run);
        Ok(Answer {
            answer,
            answer_tokens: if abstained { Vec::new() } else { gen.tokens },
            abstained,
            evidence: Some(evidence),
            support,
            method: Method::Tree,
            stop: gen.stop,
            document_tokens: plan.tokens,
            kept_tokens: p
                .selected
                .iter()
                .map(|s| self.node_lens[s.chunk][node_number(s.level, s.index)])
                .sum(),
            sources: Vec::new(),
            nodes,
            candidates: p.candidates,
            prompt_tokens: p.prefix_len + p.suffix.len(),
            history_turns: p.history_turns,
            timings: t,
            memory: self.memory(p.entries, p.cache.bytes()),
        })
    }

    /// The evidence that the document answers `question`, measured before the answer: the
    /// passages read in full (of `nodes`) against the question; `first` is the logits of
    /// the answer's first token.
    fn weigh(
        &self,
        question: &str,
        nodes: &[NodeHit],
        first: &Tensor,
    ) -> Result<Evidence, EngineError> {
        let text = self.tree.text();
        let read: Vec<&str> = nodes
            .iter()
            .filter(|n| n.alpha == 1)
            .map(|n| &text[n.chars.0..n.chars.1])
            .collect();
        let logits: Vec<f32> = first.to_vec1()?;
        Ok(Evidence::measure(
            question,
            &read,
            self.tree.bm25(self.tree.manifest().plan.config.height),
            log_softmax_at(&logits, argmax(&logits)).exp(),
        ))
    }

    /// Which of `nodes` read in full hold `answer`'s key words; each node is marked.
    fn support(&self, question: &str, answer: &str, nodes: &mut [NodeHit]) -> Support {
        let text = self.tree.text();
        let each: Vec<&str> = nodes
            .iter()
            .map(|n| {
                if n.alpha == 1 {
                    &text[n.chars.0..n.chars.1]
                } else {
                    ""
                }
            })
            .collect();
        let s = Support::check(question, answer, &each);
        for (n, &holds) in nodes.iter_mut().zip(&s.passages) {
            n.supports = (n.alpha == 1).then_some(holds);
        }
        s
    }

    /// What an answer held: `entries` injected, `kv_bytes` in its cache.
    fn memory(&self, entries: usize, kv_bytes: usize) -> Memory {
        let plan = &self.tree.manifest().plan;
        let kv_per_token = plan.config.layers * 2 * plan.kv_dim;
        Memory {
            kv_bytes,
            weight_bytes: self.llm.model.weight_bytes(),
            peak_rss_bytes: crate::sys::peak_rss_bytes(),
            injected_entries: Some(entries),
            injected_bytes: Some(entries * kv_per_token * 4),
            full_attention_kv_bytes: Some(plan.tokens * kv_per_token * 2),
            store_bytes: Some(self.tree.disk_bytes()),
            mapped_bytes: Some(self.tree.mapped_bytes()),
        }
    }

    /// What `question` (following `history`) would read under `settings`, without running
    /// the answer.
    pub fn retrieve(
        &mut self,
        question: &str,
        history: &[Exchange],
        settings: &SearchSettings,
        answer_tokens: usize,
    ) -> Result<Retrieval, EngineError> {
        let question = question.trim();
        if question.is_empty() {
            return Err(EngineError::EmptyQuestion);
        }
        let history = self.recent(history)?;
        let parts = prompt_parts(self.llm, history, question, self.answer.concise)?;
        self.search_following(question, history, &parts, settings, answer_tokens)
    }

    /// Search for `question` as a follow-up to `history` (already trimmed) in the prompt
    /// `parts`, and note what it read in full for the question after it.
    fn search_following(
        &mut self,
        question: &str,
        history: &[Exchange],
        parts: &PromptParts,
        settings: &SearchSettings,
        answer_tokens: usize,
    ) -> Result<Retrieval, EngineError> {
        let prompt = parts.prefix.len() + parts.suffix.len();
        let budget = self.budget_for(settings, prompt, answer_tokens);
        let context = conversation::search_context(history);
        let follow = FollowUp {
            context: &context,
            passages: self.carried(history),
        };
        let r = self.search(question, &follow, parts, settings, budget)?;
        self.remember(question, &r.selected);
        Ok(r)
    }

    /// What `question` would read, as an answer with no text: the chosen nodes, the ranked
    /// candidates and the search time (`eval --retrieval`: retrieval measured alone).
    pub fn search_only(
        &mut self,
        question: &str,
        history: &[Exchange],
        settings: &SearchSettings,
        answer_tokens: usize,
    ) -> Result<Answer, EngineError> {
        let start = Instant::now();
        let r = self.retrieve(question, history, settings, answer_tokens)?;
        let search_ms = start.elapsed().as_secs_f64() * 1e3;
        let plan = &self.tree.manifest().plan;
        let entries = r.selected.iter().map(|s| s.entries).sum();
        Ok(Answer {
            answer: String::new(),
            answer_tokens: Vec::new(),
            abstained: false,
            evidence: None,
            support: None,
            method: Method::Tree,
            stop: crate::model::StopReason::Cancelled,
            document_tokens: plan.tokens,
            kept_tokens: r
                .selected
                .iter()
                .map(|s| self.node_lens[s.chunk][node_number(s.level, s.index)])
                .sum(),
            sources: Vec::new(),
            nodes: r.selected.iter().map(|s| self.hit(s)).collect(),
            candidates: r.candidates,
            prompt_tokens: 0,
            history_turns: self.recent(history)?.len(),
            timings: super::Timings {
                search_ms: Some(search_ms),
                open_ms: None,
                inject_ms: None,
                reread_tokens: None,
                history_tokens_run: None,
                first_token_ms: search_ms,
                prefill_tok_s: 0.0,
                decode_tok_s: 0.0,
                decode_tokens: 0,
                total_ms: search_ms,
            },
            memory: self.memory(entries, 0),
        })
    }

    /// Score every node for `question` (and, weighed lower, the turn it follows) and choose
    /// what to inject.
    fn search(
        &self,
        question: &str,
        follow: &FollowUp,
        parts: &PromptParts,
        settings: &SearchSettings,
        budget: Budget,
    ) -> Result<Retrieval, EngineError> {
        use search::Scorer;
        let plan = &self.tree.manifest().plan;
        let m = &self.llm.model;
        let scorer = match (settings.scorer, &self.dense) {
            (s, None) if s.is_dense() => Scorer::Bm25,
            (s, _) => s,
        };
        let (paper, hidden) = if matches!(scorer, Scorer::Paper | Scorer::Hidden) {
            (self.paper_query(parts)?, self.hidden_query(question)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let weight = self.conversation.search_weight as f32;
        let context = follow.context;
        let follows = weight > 0.0 && !context.is_empty();
        let (dense_query, dense_vectors) = match &self.dense {
            Some(d) if scorer.is_dense() && follows => {
                let both = d.embedder.embed(&[question, context])?;
                let (q, c) = both.split_at(d.embedder.dim());
                (conversation::mix(q, c, weight), d.vectors.as_slice())
            }
            Some(d) if scorer.is_dense() => (d.embedder.embed(&[question])?, d.vectors.as_slice()),
            _ => (Vec::new(), &[][..]),
        };
        let index = Index {
            paper: self.tree.paper_vectors(),
            hidden: self.tree.hidden_vectors(),
            d: m.config().d_model,
            bm25: (0..=plan.config.height)
                .filter_map(|w| self.tree.bm25(w))
                .collect(),
            dense: dense_vectors,
            fusion: settings.fusion,
        };
        let shape = Shape {
            height: plan.config.height,
            alpha: &plan.config.alpha,
            node_lens: &self.node_lens,
        };
        let query = Query {
            paper: &paper,
            hidden: &hidden,
            dense: &dense_query,
            text: question,
            context: if follows { context } else { "" },
            context_weight: weight,
        };
        let mut scores = search::score(scorer, &index, &query, &shape);
        search::with_neighbours(&mut scores, &shape, settings.neighbours);
        if weight > 0.0 {
            search::keep_candidates(&mut scores, &shape, follow.passages, weight);
        }
        let height = plan.config.height;
        let candidates = search::reading_order(&scores, &shape, budget.window)
            .into_iter()
            .take(CANDIDATES)
            .map(|r| plan.chunks[r.chunk].nodes[node_number(height, r.leaf)].chars)
            .collect();
        Ok(Retrieval {
            selected: search::select(settings.policy, &scores, &shape, budget),
            candidates,
            scorer,
        })
    }

    /// The paper's query: the upper model's layer-0 output at the prompt's last token.
    fn paper_query(&self, parts: &PromptParts) -> Result<Vec<f32>, EngineError> {
        let m = &self.llm.model;
        let tokens = [&parts.prefix[..], &parts.suffix[..]].concat();
        let positions: Vec<u32> = (0..tokens.len() as u32).collect();
        let f = Forward {
            positions: &positions,
            segments: None,
            layers: 0..1,
            keep_kv: false,
            keep_hidden: &[],
            last_kv_only: false,
        };
        let out = m.forward(&m.embed(&tokens)?, &f, &mut m.new_cache())?;
        Ok(out
            .hidden
            .narrow(0, tokens.len() - 1, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// The question's mean hidden state at the tree's vector layer, encoded like a chunk.
    fn hidden_query(&self, question: &str) -> Result<Vec<f32>, EngineError> {
        let m = &self.llm.model;
        let layer = self.tree.manifest().plan.config.vector_layer;
        let ids = self.llm.tokenizer.encode(question, false)?;
        if ids.is_empty() {
            return Err(EngineError::EmptyQuestion);
        }
        let p = self.prefix_len as u32;
        let positions: Vec<u32> = (p..p + ids.len() as u32).collect();
        let f = Forward {
            positions: &positions,
            segments: None,
            layers: 0..layer + 1,
            keep_kv: false,
            keep_hidden: &[],
            last_kv_only: false,
        };
        let out = m.forward(&m.embed(&ids)?, &f, &mut self.prefix.fork()?)?;
        Ok(out.hidden.mean(0)?.to_vec1::<f32>()?)
    }

    /// Before which selected nodes the cut mark goes: where the text jumps (the node does not
    /// start where the previous one ends) next to a node read at full resolution. Between
    /// coarse nodes it would only add noise (measured: 1/15 book questions against 5/15).
    fn cuts(&self, selected: &[Selected]) -> Vec<bool> {
        let chunks = &self.tree.manifest().plan.chunks;
        let span = |s: &Selected| chunks[s.chunk].nodes[node_number(s.level, s.index)].tokens;
        let mut out = vec![false; selected.len()];
        for (i, w) in selected.windows(2).enumerate() {
            out[i + 1] = (w[0].alpha == 1 || w[1].alpha == 1) && span(&w[0]).1 != span(&w[1]).0;
        }
        out
    }

    /// Leaves the tree does not keep are encoded now, once per chunk per session, by one
    /// encoder (its sink prefix runs once per question that needs any), and the cut mark's
    /// KV once per session.
    fn encode_missing(
        &mut self,
        selected: &[Selected],
        cuts: &[bool],
        reread: bool,
        plan: &Plan,
    ) -> Result<(), EngineError> {
        let mut missing: Vec<usize> = Vec::new();
        if !reread {
            for s in selected.iter().filter(|s| s.alpha == 1) {
                if self.tree.full(s.chunk)?.is_none()
                    && !self.reencoded.contains_key(&s.chunk)
                    && !missing.contains(&s.chunk)
                {
                    missing.push(s.chunk);
                }
            }
        }
        let needs_mark = !reread && self.mark_kv.is_none() && cuts.contains(&true);
        if !missing.is_empty() || needs_mark {
            let encoder = Encoder::new(&self.llm.model, plan.config.clone())?;
            for chunk in missing {
                let (a, b) = plan.chunks[chunk].tokens();
                let kv = encoder.encode_full(&self.tree.tokens()[a..b])?;
                self.reencoded.insert(chunk, kv);
            }
            if needs_mark {
                self.mark_kv = Some(encoder.encode_full(&self.mark)?);
            }
        }
        Ok(())
    }

    /// What selected node `s` puts in the prompt: its tokens to read again, its stored (or
    /// re-encoded) full-resolution KV, or its level's downsampled KV with the coarse bias.
    fn node_part(
        &self,
        s: &Selected,
        reread: bool,
        plan: &Plan,
        coarse_bias: f32,
    ) -> Result<Part<'_>, EngineError> {
        let len = self.node_lens[s.chunk][0];
        let spans = node_spans(len, plan.config.height);
        let number = node_number(s.level, s.index);
        Ok(if s.alpha == 1 && reread {
            let (a, b) = plan.chunks[s.chunk].nodes[number].tokens;
            Part::Text(&self.tree.tokens()[a..b])
        } else if s.alpha == 1 {
            let full = match self.tree.full(s.chunk)? {
                Some(f) => f,
                None => self
                    .reencoded
                    .get(&s.chunk)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]),
            };
            Part::Kv(full, len, spans[number].clone(), 0.0)
        } else {
            let rows = level_rows(&spans, s.level, s.alpha);
            let total = rows.last().map_or(0, |r| r.end);
            Part::Kv(
                self.tree.level(s.chunk, s.level)?,
                total,
                rows[s.index].clone(),
                coarse_bias,
            )
        })
    }

    /// Put the selected nodes into `cache` after the prefix, with the cut mark before the
    /// nodes `cuts` says; returns the entries placed and how many of them were read as text.
    /// With `reread`, the passages at full resolution (and the marks) are run through the
    /// model as text, each run at its own positions after the coarse entries that precede
    /// it; otherwise their stored KV goes in. Coarse entries get `coarse_bias` off their
    /// attention logits.
    fn inject(
        &mut self,
        selected: &[Selected],
        cuts: &[bool],
        settings: &SearchSettings,
        prefix_len: usize,
        cache: &mut KvCache,
    ) -> Result<(usize, usize), EngineError> {
        let positions = settings.positions;
        let reread = reread(settings, self.tree.manifest().plan.config.full_kv);
        let coarse_bias = -settings.coarse_bias;
        let plan = self.tree.manifest().plan.clone();
        // Text read now goes through every layer; with M < N the layers from M up must see
        // no document (METHOD.md, "Injection"), so such trees inject the stored passages.
        let reread = reread && plan.config.layers == self.llm.model.config().n_layer;
        self.encode_missing(selected, cuts, reread, &plan)?;
        let mark = self.mark_kv.as_deref().unwrap_or(&[]);
        let mark_rows = self.mark.len();
        let mut parts: Vec<Part> = Vec::new();
        for (s, &cut) in selected.iter().zip(cuts) {
            if cut {
                parts.push(if reread {
                    Part::Text(&self.mark)
                } else {
                    Part::Kv(mark, mark_rows, 0..mark_rows, 0.0)
                });
            }
            parts.push(self.node_part(s, reread, &plan, coarse_bias)?);
        }
        let n: usize = parts.iter().map(Part::len).sum();
        if n == 0 {
            return Ok((0, 0));
        }
        let (starts, next) = part_starts(&parts, selected, positions, prefix_len);
        let span = |i: usize, len: usize| -> Vec<u32> {
            match positions {
                Positions::Contiguous => (starts[i]..starts[i] + len).map(|x| x as u32).collect(),
                Positions::Chunk => vec![starts[i] as u32; len],
            }
        };
        // Runs of stored parts and of text parts, in document order: a passage read now sees
        // only what comes before it in the document, as it would in the book (keys from
        // later in the text would sit at positions ahead of it, which no prompt ever shows
        // the model).
        let mut first = 0;
        let mut read = 0;
        for run in parts.chunk_by(|a, b| a.text().is_some() == b.text().is_some()) {
            let pos: Vec<u32> = (first..first + run.len())
                .flat_map(|j| span(j, parts[j].len()))
                .collect();
            first += run.len();
            if pos.is_empty() {
                continue;
            }
            let text: Vec<u32> = run
                .iter()
                .filter_map(Part::text)
                .flatten()
                .copied()
                .collect();
            if text.is_empty() {
                self.inject_stored(run, &pos, cache)?;
            } else {
                self.llm.model.prefill_at(&text, &pos, cache)?;
                read += text.len();
            }
        }
        cache.set_next_position(next);
        Ok((n, read))
    }

    /// Copy stored parts' KV into every layer of `cache` at `pos` (one per entry).
    fn inject_stored(
        &self,
        parts: &[Part],
        pos: &[u32],
        cache: &mut KvCache,
    ) -> Result<(), EngineError> {
        let plan = &self.tree.manifest().plan;
        let (layers, kv_dim) = (plan.config.layers, plan.kv_dim);
        let n = pos.len();
        let first = cache.len();
        let device = self.llm.model.device().clone();
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        for layer in 0..layers {
            let mut at = 0;
            for (src, rows, take, _) in parts.iter().filter_map(Part::stored) {
                for (half, dst) in [(0, &mut k), (1, &mut v)] {
                    let base = ((layer * 2 + half) * rows + take.start) * kv_dim;
                    let from = &src[base..base + take.len() * kv_dim];
                    let to = &mut dst[at * kv_dim..(at + take.len()) * kv_dim];
                    // Converts with F16C where the CPU has it.
                    from.convert_to_f32_slice(to);
                }
                at += take.len();
            }
            let kv = LayerKv {
                k: Tensor::from_slice(&k, (n, kv_dim), &device)?,
                v: Tensor::from_slice(&v, (n, kv_dim), &device)?,
            };
            self.llm.model.inject(cache, layer, &kv, pos)?;
        }
        let mut at = first;
        for (_, _, take, bias) in parts.iter().filter_map(Part::stored) {
            if bias != 0.0 {
                cache.set_logit_bias(at, take.len(), bias)?;
            }
            at += take.len();
        }
        Ok(())
    }

    fn hit(&self, s: &Selected) -> NodeHit {
        let node = &self.tree.manifest().plan.chunks[s.chunk].nodes[node_number(s.level, s.index)];
        NodeHit {
            chunk: s.chunk,
            level: s.level,
            index: s.index,
            alpha: s.alpha,
            score: s.score,
            tokens: node.tokens,
            chars: node.chars,
            pages: node.pages,
            preview: super::preview(&self.tree.text()[node.chars.0..node.chars.1]),
            supports: None,
        }
    }
}

/// What a follow-up question's search adds to the question.
struct FollowUp<'a> {
    /// The last turn's words (weighed `search_weight`).
    context: &'a str,
    /// The nodes the last turn read in full.
    passages: &'a [NodeKey],
}

/// One piece of what a question injects, in document order.
enum Part<'s> {
    /// Stored KV: the source `(layers, 2, rows, kv_dim)`, its row count, the rows taken, and
    /// the logit bias its entries get.
    Kv(&'s [f16], usize, std::ops::Range<usize>, f32),
    /// Tokens read again by the upper model at question time.
    Text(&'s [u32]),
}

impl<'s> Part<'s> {
    fn len(&self) -> usize {
        match self {
            Part::Kv(_, _, take, _) => take.len(),
            Part::Text(t) => t.len(),
        }
    }

    fn text(&self) -> Option<&'s [u32]> {
        match self {
            Part::Text(t) => Some(t),
            Part::Kv(..) => None,
        }
    }

    fn stored(&self) -> Option<(&'s [f16], usize, std::ops::Range<usize>, f32)> {
        match self {
            Part::Kv(src, rows, take, bias) => Some((src, *rows, take.clone(), *bias)),
            Part::Text(_) => None,
        }
    }
}
/// Each part's first position, and the position after them all: consecutive from `prefix`
/// (contiguous), or one position per chunk in order (the paper's chunk-level ids; there are
/// no cut marks and no reread then, so one part per selected node).
fn part_starts(
    parts: &[Part],
    selected: &[Selected],
    positions: Positions,
    prefix: usize,
) -> (Vec<usize>, usize) {
    let mut starts = Vec::with_capacity(parts.len());
    match positions {
        Positions::Contiguous => {
            let mut at = prefix;
            for part in parts {
                starts.push(at);
                at += part.len();
            }
            (starts, at)
        }
        Positions::Chunk => {
            let mut rank = 0;
            let mut last = None;
            for s in selected {
                if last.is_some_and(|c| c != s.chunk) {
                    rank += 1;
                }
                last = Some(s.chunk);
                starts.push(prefix + rank);
            }
            let next = starts.last().map_or(prefix, |&x| x + 1);
            (starts, next)
        }
    }
}

/// Whether `settings` read the full-resolution passages again as text, on a tree that keeps
/// its leaves or not. Only with contiguous positions: the paper's chunk ids give the text no
/// order to be read in.
fn reread(settings: &SearchSettings, keeps_leaves: bool) -> bool {
    let wanted = match settings.reread {
        Reread::Always => true,
        Reread::Never => false,
        Reread::Auto => !keeps_leaves,
    };
    wanted && settings.positions == Positions::Contiguous
}

/// Whether `settings` put the cut mark around passages read in full. Only with contiguous
/// positions (with the paper's chunk ids the text has no order for a mark to interrupt) and
/// the `budget` policy (the one that pays for the marks out of B).
fn cut_marks(settings: &SearchSettings) -> bool {
    settings.cut_marks
        && settings.positions == Positions::Contiguous
        && settings.policy == search::Policy::Budget
}
