//! `slm-chat eval`: accuracy, time to first token and memory of a method over a dataset in
//! the formats of `../shared/eval` (needle cases and questions on whole books).
//!
//! Needle cases are materialized by the rule of `../shared/eval/README.md` (the same text
//! `materialize.py` writes, byte for byte; a test compares them). Scoring is that of
//! `score_answer()`: the answer or an alias contained in the output, case-insensitively,
//! whitespace collapsed, curly apostrophes read as straight ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use crate::engine::{
    self, Answer, AskSettings, EngineError, Exchange, Method, Settings, TreeSession,
};
use crate::model::Llm;

/// One line of a dataset.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Case {
    pub id: String,
    pub book: String,
    /// The question; for a conversation, its last turn's.
    #[serde(default)]
    pub question: String,
    /// Empty for an absent case.
    #[serde(default)]
    pub answer: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The book does not answer the question: a correct answer says so.
    #[serde(default)]
    pub absent: bool,
    /// Needle cases: the haystack size, where the needle goes, and the needle.
    #[serde(default)]
    pub context_tokens_approx: Option<usize>,
    #[serde(default)]
    pub depth: Option<f64>,
    #[serde(default)]
    pub needle_sentence: Option<String>,
    /// Book questions: where the evidence is, and its text.
    #[serde(default)]
    pub char_offset: Option<usize>,
    #[serde(default)]
    pub evidence_quote: Option<String>,
    /// Book questions: `direct` (the question reuses the evidence's words) or `paraphrase`.
    #[serde(default)]
    pub kind: Option<String>,
    /// A conversation (`conv_dev.jsonl`): its turns in order; the last is the one scored
    /// (by `answer` and `aliases`), the earlier ones carry their own expected answer.
    #[serde(default)]
    pub turns: Vec<CaseTurn>,
    /// A conversation: its last question asked on its own, names in place of pronouns.
    #[serde(default)]
    pub standalone: Option<String>,
}

/// One turn of a conversation case.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CaseTurn {
    pub question: String,
    #[serde(default)]
    pub answer: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

impl Case {
    pub fn is_needle(&self) -> bool {
        self.needle_sentence.is_some()
    }
}

/// What can go wrong reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("case {id}: {reason}")]
    Case { id: String, reason: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<crate::store::StoreError> for EvalError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Engine(e.into())
    }
}

impl From<crate::document::DocumentError> for EvalError {
    fn from(e: crate::document::DocumentError) -> Self {
        Self::Engine(e.into())
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |error| EvalError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// The cases of a JSONL file.
pub fn load_cases(path: &Path) -> Result<Vec<Case>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|error| EvalError::Io {
        path: path.into(),
        error,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut case: Case = serde_json::from_str(line).map_err(|e| EvalError::Line {
            path: path.into(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        if let Some(last) = case.turns.last() {
            if !case.question.is_empty() && case.question != last.question {
                return Err(EvalError::Line {
                    path: path.into(),
                    line: i + 1,
                    reason: "a conversation's question is its last turn's".into(),
                });
            }
            case.question = last.question.clone();
        }
        if case.question.trim().is_empty() {
            return Err(EvalError::Line {
                path: path.into(),
                line: i + 1,
                reason: "a case needs a question, or turns".into(),
            });
        }
        let needle_fields = [
            case.context_tokens_approx.is_some(),
            case.depth.is_some(),
            case.needle_sentence.is_some(),
        ];
        if case.answer.trim().is_empty() && !case.absent {
            return Err(EvalError::Line {
                path: path.into(),
                line: i + 1,
                reason: "a case needs an answer, or \"absent\": true".into(),
            });
        }
        if case.depth.is_some_and(|d| !(0.0..=1.0).contains(&d)) {
            return Err(EvalError::Line {
                path: path.into(),
                line: i + 1,
                reason: "depth must be between 0 and 1".into(),
            });
        }
        if needle_fields.iter().any(|&x| x) && !needle_fields.iter().all(|&x| x) {
            return Err(EvalError::Line {
                path: path.into(),
                line: i + 1,
                reason: "a needle case needs context_tokens_approx, depth and needle_sentence"
                    .into(),
            });
        }
        out.push(case);
    }
    Ok(out)
}

const TOKENS_PER_WORD: f64 = 1.3;

/// The haystack with the needle in it, as `materialize.py` writes it, and the byte offset
/// of the needle in it.
pub fn materialize(case: &Case, book: &str) -> Result<(String, usize), EvalError> {
    let bad = |reason: &str| EvalError::Case {
        id: case.id.clone(),
        reason: reason.into(),
    };
    let needle = case
        .needle_sentence
        .as_deref()
        .ok_or_else(|| bad("not a needle case"))?
        .trim();
    let tokens = case.context_tokens_approx.unwrap_or(0) as f64;
    let depth = case.depth.unwrap_or(0.0);
    let total_words = round_half_even(tokens / TOKENS_PER_WORD) as usize;
    let hay_words = total_words
        .saturating_sub(needle.split_whitespace().count())
        .max(1);
    Ok(insert_needle(first_n_words(book, hay_words), needle, depth))
}

/// Python's `round()`: halves to even.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// The text up to the end of its `n`-th whitespace-separated word.
pub fn first_n_words(text: &str, n: usize) -> &str {
    if n == 0 {
        return "";
    }
    let mut count = 0;
    let mut in_word = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if in_word {
                count += 1;
                if count == n {
                    return &text[..i];
                }
            }
            in_word = false;
        } else {
            in_word = true;
        }
    }
    text
}

/// `needle` at the break nearest `depth` of `hay` (offsets in characters, as Python counts),
/// and the needle's byte offset.
///
/// One function, step for step in the order of `materialize.py`'s `insertion_point` and the
/// insertion in its `materialize`, so the two read side by side (a test compares their
/// output byte for byte).
pub fn insert_needle(hay: &str, needle: &str, depth: f64) -> (String, usize) {
    let chars: Vec<char> = hay.chars().collect();
    let n = chars.len();
    let target = round_half_even(depth * n as f64) as usize;
    let window = 1500usize.max((0.03 * n as f64) as usize);
    let nearest = |cands: &mut dyn Iterator<Item = usize>| -> Option<usize> {
        let mut best: Option<usize> = None;
        for pos in cands {
            if best.is_none_or(|b| pos.abs_diff(target) < b.abs_diff(target)) {
                best = Some(pos);
            }
        }
        best
    };
    // Paragraph breaks `\n[ \t]*\n` within the window (non-overlapping, left to right).
    let (lo, hi) = (target.saturating_sub(window), (target + window).min(n));
    let mut paras = Vec::new();
    let mut i = lo;
    while i < hi {
        if chars[i] == '\n' {
            let mut j = i + 1;
            while j < hi && (chars[j] == ' ' || chars[j] == '\t') {
                j += 1;
            }
            if j < hi && chars[j] == '\n' {
                paras.push(j + 1);
                i = j + 1;
                continue;
            }
        }
        i += 1;
    }
    let (pos, para) = if let Some(p) = nearest(&mut paras.into_iter()) {
        (p, true)
    } else {
        // Sentence ends `[.!?]["'”’]?` followed by whitespace, in a wider window.
        let (lo, hi) = (
            target.saturating_sub(4 * window),
            (target + 4 * window).min(n),
        );
        let mut ends = Vec::new();
        let mut i = lo;
        while i < hi {
            if matches!(chars[i], '.' | '!' | '?') {
                let mut end = i + 1;
                if end < hi && matches!(chars[end], '"' | '\'' | '\u{201d}' | '\u{2019}') {
                    end += 1;
                }
                let followed = chars.get(end).is_some_and(|c| c.is_whitespace());
                if end <= hi && followed {
                    ends.push(end);
                    i = end;
                    continue;
                }
                // Python's regex retries without the optional quote.
                if end == i + 2 && chars.get(i + 1).is_some_and(|c| c.is_whitespace()) {
                    ends.push(i + 1);
                }
            }
            i += 1;
        }
        (nearest(&mut ends.into_iter()).unwrap_or(target), false)
    };
    let before: String = chars[..pos].iter().collect();
    let mut after: String = chars[pos..].iter().collect();
    let mut text = before;
    let at;
    if para {
        at = text.len();
        text.push_str(needle);
        text.push_str("\n\n");
    } else {
        text.push(' ');
        at = text.len();
        text.push_str(needle);
        if !after.starts_with(char::is_whitespace) {
            after.insert(0, ' ');
        }
    }
    text.push_str(&after);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    (text, at)
}

/// The oracle's context for a case: the needle inside the first ~2,000 words of the same
/// book, or a 5,000-character window around a book question's evidence.
pub fn oracle_text(case: &Case, book: &str) -> Result<(String, usize), EvalError> {
    if case.is_needle() {
        let small = Case {
            context_tokens_approx: Some((2000.0 * TOKENS_PER_WORD) as usize),
            ..case.clone()
        };
        return materialize(&small, book);
    }
    let at = case.char_offset.ok_or_else(|| EvalError::Case {
        id: case.id.clone(),
        reason: "a book question needs char_offset for its oracle window".into(),
    })?;
    let chars: Vec<char> = book.chars().collect();
    let lo = at.saturating_sub(2500).min(chars.len());
    let hi = (lo + 5000).min(chars.len());
    let before: String = chars[lo..at.min(hi)].iter().collect();
    Ok((chars[lo..hi].iter().collect(), before.len()))
}

/// `score_answer()`: `answer` (or an alias) inside `output`; for an absent case,
/// `score_absent()`: the output says the document does not give it.
pub fn correct(case: &Case, output: &str) -> bool {
    if case.absent {
        return abstains(output);
    }
    let out = normalize(output);
    std::iter::once(&case.answer)
        .chain(&case.aliases)
        .any(|a| out.contains(&normalize(a)))
}

/// Phrases that count as "the document does not say" (`ABSTAIN` in materialize.py).
pub const ABSTAIN: [&str; 12] = [
    "not in the document",
    "does not say",
    "doesn't say",
    "does not mention",
    "doesn't mention",
    "not mentioned",
    "does not state",
    "doesn't state",
    "not stated",
    "no information",
    "does not give",
    "doesn't give",
];

/// Whether `output` says the document does not give the answer (`score_absent()`).
pub fn abstains(output: &str) -> bool {
    let out = normalize(output);
    ABSTAIN.iter().any(|p| out.contains(p))
}

/// Curly apostrophes straight, whitespace collapsed, lowercase: how both scorers compare.
fn normalize(s: &str) -> String {
    s.replace('\u{2019}', "'")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Whether some run of `n` words occurs twice in `text` (case and punctuation aside): the
/// measure of an answer repeating itself.
pub fn repeats_words(text: &str, n: usize) -> bool {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '\u{2019}')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let mut seen = std::collections::HashSet::new();
    words.windows(n).any(|w| !seen.insert(w))
}

/// One case's result.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub id: String,
    pub correct: bool,
    pub answer: String,
    /// The case is one the book does not answer.
    pub absent: bool,
    /// The answer says the document does not give it (abstain phrases).
    pub abstained: bool,
    /// The engine decided on its evidence that the document holds no answer.
    pub abstained_by_evidence: bool,
    /// What the evidence measured (`tree`).
    pub evidence: Option<crate::engine::trust::Evidence>,
    /// Whether a passage read at full resolution holds the answer's key words (`None`: no
    /// key words, or not `tree`).
    pub supported: Option<bool>,
    /// Words in the answer, and whether a run of 8 of them occurs twice.
    pub words: usize,
    pub repeats: bool,
    /// Needle cases: haystack size and depth; book questions: none.
    pub context_tokens_approx: Option<usize>,
    pub depth: Option<f64>,
    pub document_tokens: usize,
    pub first_token_ms: f64,
    pub injected_bytes: Option<usize>,
    pub kv_bytes: usize,
    pub full_attention_kv_bytes: Option<usize>,
    pub peak_rss_bytes: Option<u64>,
    /// Whether the whole needle (or a book question's evidence quote) was read word for word:
    /// in a full-resolution node (tree) or a passage (`rag`); `None` for other methods.
    pub evidence_read: Option<bool>,
    /// Book questions and needles: the smallest K such that the K best-ranked candidates
    /// (leaves for `tree`, passages for `rag`) hold the whole evidence, before any budget
    /// cuts them; `None` when the first [`crate::engine::CANDIDATES`] do not.
    pub evidence_rank: Option<usize>,
    /// The case's `kind` (book questions).
    pub kind: Option<String>,
    /// With `read_alone`: whether the model answers from the tree's full-resolution passages
    /// alone, given as text with full attention (`None` otherwise).
    pub alone_correct: Option<bool>,
    /// A conversation's last question asked another way: `alone` (no earlier turns) or
    /// `standalone` (its pronouns spelt out); `None` for the conversation itself and for
    /// every other case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// A conversation: the earlier turns as they were answered (the history the last
    /// question followed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<TurnResult>,
    /// Earlier turns the last question's prompt carried.
    #[serde(skip_serializing_if = "is_zero")]
    pub history_turns: usize,
    pub error: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// An earlier turn of a conversation case, as the model answered it.
#[derive(Debug, Clone, Serialize)]
pub struct TurnResult {
    pub question: String,
    pub answer: String,
    /// Against the turn's expected answer, when the dataset gives one.
    pub correct: Option<bool>,
    /// With `gold_turns`: the dataset's answer, which the later turns followed instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub followed: Option<String>,
}

/// A Markdown table: one row per haystack size (or one row for book questions), one column
/// per depth, then accuracy and median time to first token.
pub fn table(method: &str, results: &[CaseResult]) -> String {
    let mut rows: BTreeMap<usize, Vec<&CaseResult>> = BTreeMap::new();
    for r in results {
        rows.entry(r.context_tokens_approx.unwrap_or(0))
            .or_default()
            .push(r);
    }
    let mut depths: Vec<f64> = results.iter().filter_map(|r| r.depth).collect();
    depths.sort_by(f64::total_cmp);
    depths.dedup();
    let mut out = String::new();
    out.push_str(&format!("| {method} | "));
    for d in &depths {
        out.push_str(&format!("{d:.1} | "));
    }
    out.push_str("accuracy | median TTFT | median peak RSS |\n|---|");
    for _ in &depths {
        out.push_str("---|");
    }
    out.push_str("---|---|---|\n");
    for (size, rs) in &rows {
        let label = if *size == 0 {
            "book questions".to_string()
        } else {
            format!("{}K", size / 1024)
        };
        out.push_str(&format!("| {label} | "));
        for d in &depths {
            let cell: Vec<&str> = rs
                .iter()
                .filter(|r| r.depth == Some(*d))
                .map(|r| mark(r))
                .collect();
            out.push_str(&format!("{} | ", cell.join(" ")));
        }
        let ok = rs.iter().filter(|r| r.correct).count();
        let ttft = median(rs.iter().map(|r| r.first_token_ms).collect());
        let rss = median(
            rs.iter()
                .filter_map(|r| r.peak_rss_bytes.map(|b| b as f64))
                .collect(),
        );
        out.push_str(&format!(
            "{ok}/{} | {:.0} ms | {} |\n",
            rs.len(),
            ttft,
            crate::sys::human_bytes(rss as u64)
        ));
    }
    out
}

/// Accuracy and retrieval over one group of cases (`kind`, or all of them).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub kind: String,
    pub cases: usize,
    pub correct: usize,
    /// Cases whose evidence was read at full resolution; `None` when the method reads no
    /// passages to look it up in (`full`, `truncate`, `stream`, the oracle).
    pub evidence_read: Option<usize>,
    /// Cases whose evidence the best K candidates hold, for K = 4, 8, 16 (`None` likewise).
    pub recall_at: Option<BTreeMap<usize, usize>>,
    /// Answers that say the document does not give the answer.
    pub abstained: usize,
    /// Answers in which a run of 8 words occurs twice.
    pub repeated: usize,
    /// Median answer length in words.
    pub median_words: f64,
    /// Median time to first token, in ms.
    pub median_first_token_ms: f64,
}

/// The ranks at which recall is reported.
pub const RECALL_AT: [usize; 3] = [4, 8, 16];

/// One summary over all answerable cases (`answerable` when the set also has absent ones),
/// then one per `kind` (book questions have one, absent cases are `absent`).
pub fn summarize(results: &[CaseResult]) -> Vec<Summary> {
    let mixed = results.iter().any(|r| r.absent);
    let mut kinds: Vec<Option<&str>> = if results.iter().all(|r| r.absent) {
        Vec::new()
    } else {
        vec![None]
    };
    let mut named: Vec<&str> = results.iter().filter_map(|r| r.kind.as_deref()).collect();
    named.sort_unstable();
    named.dedup();
    kinds.extend(named.into_iter().map(Some));
    kinds
        .into_iter()
        .map(|k| {
            let rs: Vec<&CaseResult> = results
                .iter()
                .filter(|r| match k {
                    // A conversation's other askings are its own groups, not more cases.
                    None => !r.absent && r.variant.is_none(),
                    Some(_) => r.kind.as_deref() == k,
                })
                .collect();
            let looked_up = rs.iter().any(|r| r.evidence_read.is_some());
            let all = if mixed { "answerable" } else { "all" };
            Summary {
                kind: k.unwrap_or(all).to_string(),
                cases: rs.len(),
                correct: rs.iter().filter(|r| r.correct).count(),
                evidence_read: looked_up
                    .then(|| rs.iter().filter(|r| r.evidence_read == Some(true)).count()),
                recall_at: looked_up.then(|| {
                    RECALL_AT
                        .iter()
                        .map(|&k| {
                            let n = rs
                                .iter()
                                .filter(|r| r.evidence_rank.is_some_and(|at| at <= k))
                                .count();
                            (k, n)
                        })
                        .collect()
                }),
                abstained: rs.iter().filter(|r| r.abstained).count(),
                repeated: rs.iter().filter(|r| r.repeats).count(),
                median_words: median(rs.iter().map(|r| r.words as f64).collect()),
                median_first_token_ms: median(rs.iter().map(|r| r.first_token_ms).collect()),
            }
        })
        .collect()
}

/// The summaries as a Markdown table: accuracy, evidence read, recall at K, then how often
/// answers abstain and repeat themselves, and their median length. For absent cases
/// "correct" is "abstained".
pub fn summary_table(method: &str, summaries: &[Summary]) -> String {
    let mut out = format!(
        "| {method} | cases | correct | evidence read | recall@4 | recall@8 | recall@16 | abstained | repeated 8-gram | median words | median first token |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for s in summaries {
        let pct = |n: Option<usize>| match n {
            Some(n) => format!("{n} ({:.0} %)", 100.0 * n as f64 / s.cases.max(1) as f64),
            None => "–".to_string(),
        };
        let at = |k: usize| s.recall_at.as_ref().and_then(|r| r.get(&k).copied());
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} ms |\n",
            s.kind,
            s.cases,
            pct(Some(s.correct)),
            pct(s.evidence_read),
            pct(at(4)),
            pct(at(8)),
            pct(at(16)),
            pct(Some(s.abstained)),
            pct(Some(s.repeated)),
            s.median_words,
            s.median_first_token_ms,
        ));
    }
    out
}

fn mark(r: &CaseResult) -> &'static str {
    match (r.correct, &r.error) {
        (_, Some(_)) => "err",
        (true, _) => "✔",
        (false, _) => "✘",
    }
}

/// The median of `v` (0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding_and_words() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(6301.54), 6302.0);
        assert_eq!(first_n_words("  a b\n\nc d", 3), "  a b\n\nc");
        assert_eq!(first_n_words("a b", 5), "a b");
    }

    #[test]
    fn scoring_is_containment_without_case_or_spacing() {
        let case = Case {
            id: "x".into(),
            book: "b".into(),
            question: "q".into(),
            answer: "4,200 feet".into(),
            aliases: vec!["4200 feet".into()],
            context_tokens_approx: None,
            depth: None,
            needle_sentence: None,
            char_offset: None,
            evidence_quote: None,
            kind: None,
            absent: false,
            turns: Vec::new(),
            standalone: None,
        };
        assert!(correct(&case, "It rose to 4200  FEET."));
        let text = "said his lady,\n“have you heard that\nNetherfield is let?”";
        let at = find_loosely(text, "“have you heard that Netherfield is let?”").unwrap();
        assert_eq!(
            &text[at.clone()],
            "“have you heard that\nNetherfield is let?”"
        );
        assert_eq!(find_loosely(text, "have you heardthat"), None);
        assert_eq!(find_loosely(text, "ave you heard"), None);
        assert_eq!(find_loosely(text, "Netherfield is le"), None);
        assert_eq!(find_loosely("their heir", "heir"), Some(6..10));
        assert!(correct(&case, "about 4,200\nfeet"));
        assert!(!correct(&case, "4,100 feet"));
    }

    #[test]
    fn absent_cases_load_without_an_answer_and_score_abstaining() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a.jsonl");
        let line = r#"{"id": "a1", "book": "b", "question": "What is Mr. Bennet's first name?", "absent": true}"#;
        std::fs::write(&path, format!("{line}\n")).expect("write");
        let cases = load_cases(&path).expect("absent cases load");
        assert!(cases[0].absent && cases[0].answer.is_empty());
        assert!(correct(&cases[0], "The document doesn\u{2019}t  SAY."));
        assert!(!correct(&cases[0], "His first name is Thomas."));
        std::fs::write(&path, r#"{"id": "x", "book": "b", "question": "q"}"#).expect("write");
        let e = load_cases(&path).expect_err("a case needs an answer or absent");
        assert!(e.to_string().contains("absent"), "{e}");
    }

    #[test]
    fn repeated_runs_of_words_are_found() {
        let once = "He paid four pounds a week for copying the encyclopaedia.";
        assert!(!repeats_words(once, 8));
        assert!(repeats_words(&format!("{once} Yes, {once}"), 8));
        assert!(
            !repeats_words("a b c d e f g a b c d e f g", 8),
            "7 words twice"
        );
    }

    #[test]
    fn passages_read_alone_keep_adjacent_text_and_mark_jumps() {
        let book = "One two. Three four. Five six.";
        // Adjacent spans (whitespace between) read as one text, in document order.
        assert_eq!(passages(book, &[(21, 30), (0, 8), (9, 20)]), book);
        assert_eq!(
            passages(book, &[(21, 30), (0, 8)]),
            format!("One two.{}Five six.", crate::engine::CUT_MARK)
        );
        assert_eq!(
            passages(book, &[(0, 3), (21, 25)]),
            format!("One{}Five", crate::engine::CUT_MARK)
        );
        // Two nodes sharing the bytes of one character: it is written once, with no mark.
        let text = "a “quote” b";
        assert_eq!(passages(text, &[(0, 5), (2, text.len())]), text);
    }
}

/// How to run a dataset.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    pub cases: Vec<Case>,
    /// Where `<book>.txt` files are.
    pub books: PathBuf,
    pub method: crate::engine::Method,
    /// Give each case the oracle's small context (method `full`) instead of its own.
    pub oracle: bool,
    /// Also answer each tree case from its full-resolution passages alone, as text: what
    /// injection loses (or adds) against reading the same passages.
    pub read_alone: bool,
    /// Where materialized documents are written (their trees are cached by content).
    pub work_dir: PathBuf,
    /// Only search (`tree`): what each case would read and its candidates' ranks, no answer.
    pub retrieval_only: bool,
    /// Conversations follow the dataset's answers to their earlier turns, not the model's.
    pub gold_turns: bool,
    /// The sentence embedder for `dense` and `hybrid` scorers.
    pub embedder: Option<std::sync::Arc<crate::model::Embedder>>,
}

/// One case's document.
struct Doc {
    path: PathBuf,
}

fn document(plan: &EvalPlan, case: &Case) -> Result<Doc, EvalError> {
    let book_path = plan.books.join(format!("{}.txt", case.book));
    let book = std::fs::read_to_string(&book_path).map_err(|e| EvalError::Case {
        id: case.id.clone(),
        reason: format!("{}: {e}", book_path.display()),
    })?;
    let (text, name) = if plan.oracle {
        (
            oracle_text(case, &book)?.0,
            format!("{}.oracle.txt", case.id),
        )
    } else if case.is_needle() {
        (materialize(case, &book)?.0, format!("{}.txt", case.id))
    } else {
        return Ok(Doc { path: book_path });
    };
    std::fs::create_dir_all(&plan.work_dir).map_err(io_error(&plan.work_dir))?;
    let path = plan.work_dir.join(name);
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        crate::store::write_atomic(&path, text.as_bytes())?;
    }
    Ok(Doc { path })
}

/// What an eval run reads its documents with: the tree session of the document in hand,
/// or the loaded document for the other methods (kept while its cases run).
struct Reader<'a> {
    llm: &'a Llm,
    settings: &'a Settings,
    plan: &'a EvalPlan,
    method: Method,
    session: Option<(PathBuf, TreeSession<'a>)>,
    loaded: Option<(PathBuf, crate::document::Document)>,
    cancel: &'a AtomicBool,
}

impl<'a> Reader<'a> {
    /// Answer `question` of `case` on `doc`, following `history`; errors of the answer
    /// itself are the case's, others stop the run.
    fn answer(
        &mut self,
        case: &Case,
        doc: &Doc,
        question: &str,
        history: &[Exchange],
        say: &mut dyn FnMut(&str),
    ) -> Result<Result<Answer, EngineError>, EvalError> {
        let (s, plan, cancel) = (self.settings, self.plan, self.cancel);
        let params = &s.sampling;
        if self.method == Method::Tree {
            let session = self.tree_session(case, doc, say)?;
            return Ok(if plan.retrieval_only {
                session.search_only(question, history, &s.search, params.max_tokens)
            } else {
                session.ask(question, history, &s.search, params, cancel, &mut |_| {})
            });
        }
        let d = match self.loaded.take() {
            Some((p, d)) if p == doc.path => &self.loaded.insert((p, d)).1,
            _ => {
                let d = crate::document::load(&doc.path, &s.ingest.load)?;
                &self.loaded.insert((doc.path.clone(), d)).1
            }
        };
        let ask = AskSettings::new(self.method, &s.rag, &s.search, self.plan.embedder.clone())
            .concise(s.answer.concise)
            .following(history, &s.conversation);
        Ok(engine::ask(
            self.llm,
            d,
            question,
            &ask,
            params,
            self.cancel,
            &mut |_| {},
        ))
    }

    /// Answer and score `question` (following `history`) as `case`.
    fn scored(
        &mut self,
        case: &Case,
        doc: &Doc,
        question: &str,
        history: &[Exchange],
        say: &mut dyn FnMut(&str),
    ) -> Result<CaseResult, EvalError> {
        Ok(match self.answer(case, doc, question, history, say)? {
            Ok(a) => self.score(case, a)?,
            Err(e) => failed(case, &e),
        })
    }

    /// Ask a conversation's turns in order, each following the answers the model gave to
    /// the ones before (or, with `gold_turns`, the dataset's), and score the last. Between
    /// turns a tree session runs the conversation so far through the model, as the app does
    /// while the user reads the answer: the last turn's time to first token is the app's.
    fn conversation(
        &mut self,
        case: &Case,
        doc: &Doc,
        say: &mut dyn FnMut(&str),
    ) -> Result<CaseResult, EvalError> {
        let (last, earlier) = case.turns.split_last().ok_or_else(|| EvalError::Case {
            id: case.id.clone(),
            reason: "a conversation without turns".into(),
        })?;
        let mut history: Vec<Exchange> = Vec::new();
        let mut turns = Vec::new();
        for turn in earlier {
            let answer = match self.answer(case, doc, &turn.question, &history, say)? {
                Ok(a) => a.answer,
                Err(e) => return Ok(failed(case, &e)),
            };
            let expected = Case {
                answer: turn.answer.clone().unwrap_or_default(),
                aliases: turn.aliases.clone(),
                ..case.clone()
            };
            let gold = turn.answer.clone().filter(|_| self.plan.gold_turns);
            turns.push(TurnResult {
                question: turn.question.clone(),
                correct: turn.answer.as_ref().map(|_| correct(&expected, &answer)),
                answer: answer.clone(),
                followed: gold.clone(),
            });
            let said = gold.unwrap_or(answer);
            history.push(Exchange::new(turn.question.clone(), said));
            if let Some((_, session)) = self
                .session
                .as_mut()
                .filter(|_| self.method == Method::Tree)
            {
                session.prime(&history)?;
            }
        }
        let mut r = self.scored(case, doc, &last.question, &history, say)?;
        r.earlier = turns;
        Ok(r)
    }

    /// The session of `doc`'s tree, opening (or building) it when the cases move to it.
    fn tree_session(
        &mut self,
        case: &Case,
        doc: &Doc,
        say: &mut dyn FnMut(&str),
    ) -> Result<&mut TreeSession<'a>, EvalError> {
        let s = match self.session.take() {
            Some((p, s)) if p == doc.path => s,
            previous => {
                // Let go of the previous tree before opening the next.
                drop(previous);
                let mut progress = |p: &engine::session::Progress| {
                    if p.total > 0 && (p.done == p.total || p.done.is_multiple_of(50)) {
                        say(&format!("{}: {}", case.id, p.message));
                    }
                };
                let (tree, report) = engine::ingest::open_or_build(
                    self.llm,
                    &doc.path,
                    &self.settings.ingest,
                    false,
                    &mut progress,
                    self.cancel,
                )?;
                let embedder = self.plan.embedder.as_ref();
                let s = engine::dense::session(self.llm, tree, embedder, &mut progress)?
                    .with_answer_settings(self.settings.answer.clone())
                    .with_conversation(self.settings.conversation.clone());
                if report.built {
                    say(&format!(
                        "{}: built the tree of {} tokens in {:.0} s ({:.0} tok/s)",
                        case.id, report.tokens, report.seconds, report.tok_s
                    ));
                }
                s
            }
        };
        Ok(&mut self.session.insert((doc.path.clone(), s)).1)
    }

    /// The text the model's reading is measured against, and what it read word for word:
    /// leaves at α = 1, or `rag`'s passages.
    fn read(&self, a: &Answer) -> (Option<&str>, Vec<(usize, usize)>) {
        match (&self.session, self.method) {
            (Some((_, s)), Method::Tree) => (
                Some(s.tree().text()),
                a.nodes
                    .iter()
                    .filter(|n| n.alpha == 1)
                    .map(|n| n.chars)
                    .collect(),
            ),
            (_, Method::Rag) => (
                self.loaded.as_ref().map(|(_, d)| d.text.as_str()),
                a.sources.iter().map(|s| s.chars).collect(),
            ),
            _ => (None, Vec::new()),
        }
    }

    /// Score an answer: correct or not, and whether (and how soon) its evidence was read.
    fn score(&self, case: &Case, a: Answer) -> Result<CaseResult, EvalError> {
        // Every byte of the needle (or a book question's evidence) inside some
        // full-resolution node. Node offsets point into the tree's (normalised) text, so
        // the evidence is looked up there.
        let needle = case
            .needle_sentence
            .as_deref()
            .or(case.evidence_quote.as_deref())
            .map(str::trim);
        let (text, read) = self.read(&a);
        // The ranked candidates: the tree's leaves, or `rag`'s passages (best first).
        let candidates: Vec<(usize, usize)> = match self.method {
            Method::Tree => a.candidates.clone(),
            _ => a.sources.iter().map(|s| s.chars).collect(),
        };
        let span = text.zip(needle).and_then(|(t, n)| find_loosely(t, n));
        // Every byte of the evidence but whitespace: two adjacent nodes may leave the space
        // between their tokens to neither.
        let covered = |spans: &[(usize, usize)], span: &std::ops::Range<usize>| {
            let t = text.unwrap_or_default().as_bytes();
            span.clone().all(|b| {
                t.get(b).is_some_and(u8::is_ascii_whitespace)
                    || spans.iter().any(|&(from, to)| from <= b && b < to)
            })
        };
        let evidence_read = span.as_ref().map(|span| covered(&read, span));
        let evidence_rank = span
            .as_ref()
            .and_then(|span| (1..=candidates.len()).find(|&k| covered(&candidates[..k], span)));
        let alone_correct = match text {
            Some(t) if self.plan.read_alone && self.method == Method::Tree => {
                answer_alone(self.llm, self.settings, self.plan, case, t, &read)?
            }
            _ => None,
        };
        Ok(CaseResult {
            id: case.id.clone(),
            correct: correct(case, &a.answer),
            absent: case.absent,
            abstained: abstains(&a.answer),
            abstained_by_evidence: a.abstained,
            evidence: a.evidence,
            supported: a.support.as_ref().and_then(|s| s.supported()),
            words: a.answer.split_whitespace().count(),
            repeats: repeats_words(&a.answer, 8),
            answer: a.answer,
            context_tokens_approx: case.context_tokens_approx,
            depth: case.depth,
            document_tokens: a.document_tokens,
            first_token_ms: a.timings.first_token_ms,
            injected_bytes: a.memory.injected_bytes,
            kv_bytes: a.memory.kv_bytes,
            full_attention_kv_bytes: a.memory.full_attention_kv_bytes,
            peak_rss_bytes: a.memory.peak_rss_bytes,
            evidence_read,
            evidence_rank,
            kind: kind(case),
            alone_correct,
            variant: None,
            earlier: Vec::new(),
            history_turns: a.history_turns,
            error: None,
        })
    }
}

/// The group a case is summarized in: its `kind`, or `absent`.
fn kind(case: &Case) -> Option<String> {
    if case.absent {
        Some("absent".into())
    } else if case.turns.len() > 1 && case.kind.is_none() {
        Some("conversation".into())
    } else {
        case.kind.clone()
    }
}

/// A case whose answer failed.
fn failed(case: &Case, e: &EngineError) -> CaseResult {
    CaseResult {
        id: case.id.clone(),
        correct: false,
        answer: String::new(),
        absent: case.absent,
        abstained: false,
        abstained_by_evidence: false,
        evidence: None,
        supported: None,
        words: 0,
        repeats: false,
        context_tokens_approx: case.context_tokens_approx,
        depth: case.depth,
        document_tokens: 0,
        first_token_ms: 0.0,
        injected_bytes: None,
        kv_bytes: 0,
        full_attention_kv_bytes: None,
        peak_rss_bytes: None,
        evidence_read: None,
        evidence_rank: None,
        kind: kind(case),
        alone_correct: None,
        variant: None,
        earlier: Vec::new(),
        history_turns: 0,
        error: Some(e.to_string()),
    }
}

/// One line for a finished case.
fn case_line(r: &CaseResult) -> String {
    format!(
        "{} {} · {:.0} ms to first token{}{} · {}",
        mark(r),
        r.id,
        r.first_token_ms,
        match (r.evidence_read, r.evidence_rank) {
            (Some(true), _) => " · evidence read in full".to_string(),
            (Some(false), Some(k)) => format!(" · evidence not read in full (candidate {k})"),
            (Some(false), None) => " · evidence not read in full".to_string(),
            (None, _) => String::new(),
        },
        match r.alone_correct {
            Some(true) => " · its passages alone: ✔",
            Some(false) => " · its passages alone: ✘",
            None => "",
        },
        r.error.clone().unwrap_or_else(|| one_line(&r.answer))
    )
}

/// Run every case of `plan`, telling `say` about each as it finishes.
pub fn run(
    llm: &Llm,
    settings: &Settings,
    plan: &EvalPlan,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<CaseResult>, EvalError> {
    let method = if plan.oracle {
        Method::Full
    } else {
        plan.method
    };
    let docs = plan
        .cases
        .iter()
        .map(|case| document(plan, case))
        .collect::<Result<Vec<_>, _>>()?;
    let mut order: Vec<usize> = (0..plan.cases.len()).collect();
    // Cases on the same document run together, so its tree is opened once.
    order.sort_by(|&a, &b| docs[a].path.cmp(&docs[b].path));
    let mut results: Vec<Vec<CaseResult>> = vec![Vec::new(); plan.cases.len()];
    let cancel = AtomicBool::new(false);
    let mut reader = Reader {
        llm,
        settings,
        plan,
        method,
        session: None,
        loaded: None,
        cancel: &cancel,
    };
    for i in order {
        let case = &plan.cases[i];
        let doc = &docs[i];
        let mut r = if case.turns.len() > 1 {
            reader.conversation(case, doc, say)?
        } else {
            reader.scored(case, doc, &case.question, &[], say)?
        };
        say(&case_line(&r));
        let mut all = vec![r.clone()];
        if case.turns.len() > 1 {
            // The same question without its conversation, and spelt out: what the
            // conversation adds, and what it would take to ask without one.
            let variants = [
                Some(("alone", case.question.as_str())),
                case.standalone.as_deref().map(|q| ("standalone", q)),
            ];
            for (name, question) in variants.into_iter().flatten() {
                r = reader.scored(case, doc, question, &[], say)?;
                r.id = format!("{}/{name}", case.id);
                r.kind = Some(format!("turn asked {name}"));
                r.variant = Some(name.to_string());
                say(&case_line(&r));
                all.push(r);
            }
        }
        results[i] = all;
    }
    Ok(results.into_iter().flatten().collect())
}

/// Answer `case` from the byte ranges `spans` of the tree's `text` alone, as a document of
/// their own with full attention; whether that answer is correct (`None` when the passages
/// do not fit the model's window). Their text is kept as `<work_dir>/<case>.alone.txt`.
fn answer_alone(
    llm: &Llm,
    settings: &Settings,
    plan: &EvalPlan,
    case: &Case,
    text: &str,
    spans: &[(usize, usize)],
) -> Result<Option<bool>, EvalError> {
    let path = plan.work_dir.join(format!("{}.alone.txt", case.id));
    if spans.is_empty() {
        // Nothing was read at full resolution: nothing to answer from, and no file from an
        // earlier run may stand for this one.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error(&path)(e)),
            _ => return Ok(Some(false)),
        }
    }
    std::fs::create_dir_all(&plan.work_dir).map_err(io_error(&plan.work_dir))?;
    crate::store::write_atomic(&path, passages(text, spans).as_bytes())?;
    let doc = crate::document::load(&path, &settings.ingest.load)?;
    let ask = AskSettings::new(Method::Full, &settings.rag, &settings.search, None)
        .concise(settings.answer.concise);
    let cancel = AtomicBool::new(false);
    match engine::ask(
        llm,
        &doc,
        &case.question,
        &ask,
        &settings.sampling,
        &cancel,
        &mut |_| {},
    ) {
        Ok(alone) => Ok(Some(correct(case, &alone.answer))),
        Err(EngineError::TooLong { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The byte ranges `spans` of `text` (in document order) as one text: what lies between two
/// adjacent spans is kept when it is only whitespace, else `rag`'s cut mark stands for it.
fn passages(text: &str, spans: &[(usize, usize)]) -> String {
    let mut spans = spans.to_vec();
    spans.sort_unstable();
    let mut out = String::new();
    let mut end: Option<usize> = None;
    for (from, to) in spans {
        // Token offsets cover whole characters, so two adjacent nodes can share the bytes of
        // one character: the second then starts where the first ended.
        let from = match end {
            Some(e) if from < e => e.min(to),
            Some(e) if text[e..from].trim().is_empty() => {
                out.push_str(&text[e..from]);
                from
            }
            Some(_) => {
                out.push_str(crate::engine::CUT_MARK);
                from
            }
            None => from,
        };
        out.push_str(&text[from..to]);
        end = Some(end.map_or(to, |e| e.max(to)));
    }
    out
}

/// Where `needle` occurs in `text` when runs of whitespace count as one (the document is
/// hard-wrapped; a dataset's quotes are not): its byte range in `text`.
fn find_loosely(text: &str, needle: &str) -> Option<std::ops::Range<usize>> {
    let words: Vec<&str> = needle.split_whitespace().collect();
    let first = *words.first()?;
    // Whole words only: "heir" is not found in "their".
    let joins = |a: Option<char>, b: Option<char>| {
        a.zip(b)
            .is_some_and(|(a, b)| a.is_alphanumeric() && b.is_alphanumeric())
    };
    let mut from = 0;
    while let Some(at) = text[from..].find(first).map(|i| from + i) {
        let mut end = at + first.len();
        let matched = words[1..].iter().all(|w| {
            let rest = &text[end..];
            let gap = rest.len() - rest.trim_start().len();
            if gap > 0 && rest[gap..].starts_with(w) {
                end += gap + w.len();
                true
            } else {
                false
            }
        });
        let clean_start = !joins(text[..at].chars().next_back(), first.chars().next());
        let clean_end = !joins(text[..end].chars().next_back(), text[end..].chars().next());
        if matched && clean_start && clean_end {
            return Some(at..end);
        }
        // One character on: a match may overlap the one that failed.
        from = at + first.chars().next().map_or(1, char::len_utf8);
    }
    None
}

fn one_line(s: &str) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(100) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}
