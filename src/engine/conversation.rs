//! Follow-up questions: the earlier turns of a conversation about the document, what of
//! them reaches the prompt (the latest that fit `[conversation] history_tokens`), and what
//! of them reaches the search (the last turn's words, weighed below the question's).

use serde::{Deserialize, Serialize};

use super::trust;
use crate::model::{ModelError, Tokenizer};

/// One earlier turn: what was asked and what was answered (as the user saw it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub question: String,
    pub answer: String,
}

impl Exchange {
    pub fn new(question: impl Into<String>, answer: impl Into<String>) -> Self {
        Self {
            question: question.into(),
            answer: answer.into(),
        }
    }
}

/// `[conversation]`: how much of a conversation follow-up questions carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConversationSettings {
    /// Most tokens of earlier turns (questions and answers) in the prompt; the oldest go
    /// first. 0 = every question on its own.
    pub history_tokens: usize,
    /// Weight of the last turn's words in the search, against 1 for the question's own
    /// (0 = search with the question alone).
    pub search_weight: f64,
}

impl Default for ConversationSettings {
    fn default() -> Self {
        Self {
            history_tokens: 512,
            search_weight: 0.5,
        }
    }
}

/// Tokens a turn's chat-template markup takes beyond its text (ChatML: two role headers and
/// two end marks), so trimming leaves room for it.
const TEMPLATE_TOKENS: usize = 10;

/// The latest turns of `history` whose text fits `budget` tokens, oldest first.
pub fn recent<'h>(
    history: &'h [Exchange],
    tokenizer: &Tokenizer,
    budget: usize,
) -> Result<&'h [Exchange], ModelError> {
    let mut used = 0;
    let mut from = history.len();
    for (i, e) in history.iter().enumerate().rev() {
        let cost = tokenizer.encode(e.question.trim(), false)?.len()
            + tokenizer.encode(e.answer.trim(), false)?.len()
            + TEMPLATE_TOKENS;
        if used + cost > budget {
            break;
        }
        used += cost;
        from = i;
    }
    Ok(&history[from..])
}

/// What the search adds to a follow-up question: the last turn's question and answer (its
/// names are what "he" or "that letter" stand for). An answer that said the document does
/// not say names nothing.
pub fn search_context(history: &[Exchange]) -> String {
    match history.last() {
        Some(e) if e.answer.trim_start().starts_with(trust::NOT_FOUND) => e.question.clone(),
        Some(e) => format!("{}\n{}", e.question, e.answer),
        None => String::new(),
    }
}

/// The unit-length mix of embeddings `question + weight × context`: a follow-up question's
/// dense query.
pub fn mix(question: &[f32], context: &[f32], weight: f32) -> Vec<f32> {
    let mixed: Vec<f32> = question
        .iter()
        .zip(context)
        .map(|(q, c)| q + weight * c)
        .collect();
    let norm = mixed.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        mixed.iter().map(|x| x / norm).collect()
    } else {
        mixed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_context_is_the_last_turn_without_an_abstention() {
        let h = [
            Exchange::new("Who rented Netherfield?", "Mr. Bingley."),
            Exchange::new("Who is the youngest sister?", "Lydia Bennet."),
        ];
        assert_eq!(
            search_context(&h),
            "Who is the youngest sister?\nLydia Bennet."
        );
        let abstained = [Exchange::new(
            "What is the butler's name?",
            format!("{} The closest passages are on page 3.", trust::NOT_FOUND),
        )];
        assert_eq!(search_context(&abstained), "What is the butler's name?");
        assert_eq!(search_context(&[]), "");
    }
}
