//! Whether an answer can be trusted: before it is written, does the document hold one at all
//! (else say so, with the closest pages, instead of answering from the model's memory); after
//! it is written, which passages read hold its key words.
//!
//! A 135M model almost never says on its own that the document is silent (0 of the 24 absent
//! dev questions), and told to in the prompt it says so in nearly every answer (94 of the 105
//! answerable ones), so the decision rests on measured evidence: how much of the question
//! the passages read at full resolution cover. The model's own confidence measured worse
//! (its first token's probability; how readily it would start "The document does not say",
//! which also cost 50–70 ms of first token) and is left out; the threshold was fitted on the
//! dev sets (`../shared/eval`: 105 answerable, 24 absent questions); BENCHMARKS.md gives the
//! fit and the paired runs.

use serde::Serialize;

use super::AnswerSettings;
use crate::tree::{terms, Bm25};

/// The answer given when the evidence says the document holds none; it says so in the words
/// the dev sets score as abstaining.
pub const NOT_FOUND: &str = "The document does not say.";

/// The flag on an answer none of whose passages read hold its key words.
pub const UNSUPPORTED: &str = "not found in the passages read";

/// The default `answer.abstain_threshold`: on the dev sets, the one that abstains on the
/// most absent questions while it turns at most one right answer of the 105 into "does not
/// say".
pub const THRESHOLD: f64 = 0.505;

/// What a question's evidence measured, before its answer was written.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Evidence {
    /// Share of the question's words (weighted by how rare they are in the document) that
    /// some passage read at full resolution holds.
    pub coverage: f32,
    /// The same share for the one passage that holds most of it.
    pub best_passage: f32,
    /// Probability of the answer's most likely first token (reported, not decided on).
    pub first_token: f32,
    /// The score the decision compares with `abstain_threshold` (higher: answer).
    pub score: f32,
}

impl Evidence {
    /// The evidence for `question` given the passages read at full resolution, the
    /// document's term statistics, and the probability of the answer's first token.
    pub fn measure(question: &str, read: &[&str], idf: Option<&Bm25>, first_token: f32) -> Self {
        let words = key_terms(question, "");
        let weight = |t: &str| idf.map_or(1.0, |b| b.idf(t) as f32);
        let total: f32 = words.iter().map(|t| weight(t)).sum();
        let share = |texts: &[&str]| -> f32 {
            if total <= 0.0 {
                return 0.0;
            }
            let held: Vec<String> = texts.iter().flat_map(|t| terms(t)).collect();
            words
                .iter()
                .filter(|w| held.iter().any(|h| same_word(h, w)))
                .map(|t| weight(t))
                .sum::<f32>()
                / total
        };
        let coverage = share(read);
        let best_passage = read.iter().map(|p| share(&[p])).fold(0.0, f32::max);
        // Coverage separates absent from answered questions best of all measures (AUC 0.79
        // against the answers the model got right); adding the others did not hold up.
        Self {
            coverage,
            best_passage,
            first_token,
            score: coverage,
        }
    }

    /// Whether `settings` answer "not found" on this evidence.
    pub fn abstains(&self, settings: &AnswerSettings) -> bool {
        settings.abstain && f64::from(self.score) < settings.abstain_threshold
    }
}

/// The fixed answer when nothing was found: [`NOT_FOUND`] and the pages of the closest
/// passages (`pages` best first; at most three named, in page order).
pub fn not_found(pages: &[(u32, u32)]) -> String {
    let mut firsts: Vec<u32> = Vec::new();
    for &(p, _) in pages {
        if !firsts.contains(&p) && firsts.len() < 3 {
            firsts.push(p);
        }
    }
    firsts.sort_unstable();
    let list: Vec<String> = firsts.iter().map(u32::to_string).collect();
    match list.as_slice() {
        [] => NOT_FOUND.to_string(),
        [one] => format!("{NOT_FOUND} The closest passage is on page {one}."),
        [init @ .., last] => format!(
            "{NOT_FOUND} The closest passages are on pages {} and {last}.",
            init.join(", ")
        ),
    }
}

/// Which passages hold an answer's key words: a cheap lexical check that shows when the
/// model answered from memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Support {
    /// The answer's words the check looks for: not in the question, not function words.
    pub key_words: Vec<String>,
    /// Per passage given: whether it holds at least half of them.
    pub passages: Vec<bool>,
}

impl Support {
    /// Check `answer` to `question` against each of `passages`. Only the answer's first
    /// sentence is checked: it carries the answer, and what a small model adds after it
    /// is commentary that would blur the check.
    pub fn check(question: &str, answer: &str, passages: &[&str]) -> Self {
        let key_words = key_terms(first_sentence(answer), question);
        let passages = passages
            .iter()
            .map(|p| {
                let held: Vec<String> = terms(p).collect();
                let n = key_words
                    .iter()
                    .filter(|k| held.iter().any(|h| same_word(h, k)))
                    .count();
                !key_words.is_empty() && 2 * n >= key_words.len()
            })
            .collect();
        Self {
            key_words,
            passages,
        }
    }

    /// `Some(false)` when the answer says something of its own and no passage read holds
    /// it; `None` when it has no key words to look for.
    pub fn supported(&self) -> Option<bool> {
        (!self.key_words.is_empty()).then(|| self.passages.iter().any(|&p| p))
    }
}

/// `text` up to the end of its first sentence of at least four words ("Mr." ends none).
fn first_sentence(text: &str) -> &str {
    let mut words = 0;
    for (i, w) in text.split_inclusive(char::is_whitespace).scan(0, |at, w| {
        let start = *at;
        *at += w.len();
        Some((start, w))
    }) {
        words += 1;
        if words >= 4 && w.trim_end().ends_with(['.', '!', '?']) {
            return &text[..i + w.trim_end().len()];
        }
    }
    text
}

/// Words that say nothing about whether a passage backs an answer.
const FILLER: &[&str] = &[
    "document",
    "passage",
    "passages",
    "text",
    "answer",
    "question",
    "mentioned",
    "mention",
    "says",
    "say",
    "not",
    "no",
    "yes",
    "also",
    "there",
    "would",
    "could",
    "about",
    "so",
    "very",
    "into",
    "than",
    "then",
    "been",
    "being",
    "can",
    "will",
    "one",
    "not",
    "said",
    "mr",
    "mrs",
    "miss",
    "page",
    "pages",
    "we",
    "our",
    "my",
    "me",
    "him",
    "if",
    "all",
    "any",
];

/// The distinct terms of `text` that are not in `except` and not filler.
fn key_terms(text: &str, except: &str) -> Vec<String> {
    let skip: Vec<String> = terms(except).collect();
    let mut out: Vec<String> = Vec::new();
    for t in terms(text) {
        let t = t.strip_suffix("'s").map(str::to_string).unwrap_or(t);
        if FILLER.contains(&t.as_str())
            || skip.iter().any(|s| same_word(s, &t))
            || out.iter().any(|o| same_word(o, &t))
        {
            continue;
        }
        out.push(t);
    }
    out
}

/// The same word up to an ending: equal, or one starts with the other and the shorter has at
/// least four letters ("pound" / "pounds", "marry" / "marrying").
fn same_word(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    short == long || (short.chars().count() >= 4 && long.starts_with(short))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn support_finds_the_answer_words_in_a_passage() {
        let s = Support::check(
            "How much did the Red-Headed League pay?",
            "The League paid four pounds a week.",
            &[
                "He was to have four pound a week for copying.",
                "The weather was fine.",
            ],
        );
        assert_eq!(s.key_words, ["paid", "four", "pounds", "week"]);
        assert_eq!(s.passages, [true, false]);
        assert_eq!(s.supported(), Some(true));
        let memory = Support::check(
            "What is the capital of France?",
            "Paris.",
            &["Baker Street"],
        );
        assert_eq!(memory.supported(), Some(false));
        let nothing = Support::check("Who came?", "The document does not say.", &["x"]);
        assert_eq!(nothing.supported(), None);
    }

    #[test]
    fn only_the_first_sentence_is_checked() {
        assert_eq!(
            first_sentence("Mr. Foster lived in Lafayette. It is named after a French hero."),
            "Mr. Foster lived in Lafayette."
        );
        assert_eq!(first_sentence("No full stop here"), "No full stop here");
        let s = Support::check(
            "Where did Abram G. Foster live?",
            "Abram G. Foster lived in Lafayette. The town is named after a French explorer and statesman.",
            &["Abram G. Foster — Abram G. Foster of Lafayette"],
        );
        assert_eq!(
            s.key_words,
            ["lafayette"],
            "\"lived\" is the question's \"live\""
        );
        assert_eq!(s.supported(), Some(true));
    }

    #[test]
    fn not_found_names_up_to_three_pages_in_order() {
        assert_eq!(not_found(&[]), NOT_FOUND);
        assert_eq!(
            not_found(&[(40, 41), (12, 12), (40, 40), (7, 7), (90, 90)]),
            "The document does not say. The closest passages are on pages 7, 12 and 40."
        );
        assert!(not_found(&[(3, 3)]).ends_with("on page 3."));
    }

    #[test]
    fn coverage_weighs_rare_words_more() {
        let idf = Bm25::new([
            "the bennet family",
            "bennet walked",
            "bennet and a regiment",
        ]);
        let e = Evidence::measure(
            "Which regiment did Bennet join?",
            &["bennet walked"],
            Some(&idf),
            0.5,
        );
        assert!(e.coverage > 0.0 && e.coverage < 0.5, "{e:?}");
        let full = Evidence::measure(
            "Which regiment did Bennet join?",
            &["bennet and a regiment", "join"],
            Some(&idf),
            0.5,
        );
        assert_eq!(full.coverage, 1.0);
        assert!(full.best_passage < 1.0);
    }
}
