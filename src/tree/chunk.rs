//! Chunks of about `C` tokens, cut at a sentence end within ±10 % of `C` so a fact is not
//! split between two chunks (METHOD.md, "chunk").

use std::ops::{Range, RangeInclusive};

use serde::Serialize;

use crate::document::Document;
use crate::model::Encoded;

/// A run of document tokens with the text and pages it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chunk {
    pub index: usize,
    /// Token indices into the document's encoding.
    pub tokens: Range<usize>,
    /// Byte range of the document text.
    pub text: Range<usize>,
    pub pages: RangeInclusive<u32>,
}

/// Cut `enc` (the encoding of `doc.text`) into chunks of about `size` tokens.
pub fn chunk(doc: &Document, enc: &Encoded, size: usize) -> Vec<Chunk> {
    let size = size.max(1);
    let n = enc.ids.len();
    let slack = size / 10;
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let end = if n - start <= size + slack {
            n
        } else {
            best_cut(
                &doc.text,
                enc,
                start + size - slack,
                start + size + slack,
                start + size,
            )
        };
        let text = enc.offsets[start].0..enc.offsets[end - 1].1;
        let pages = doc.page_at(text.start)..=doc.page_at(text.end.saturating_sub(1));
        chunks.push(Chunk {
            index: chunks.len(),
            tokens: start..end,
            text,
            pages,
        });
        start = end;
    }
    chunks
}

/// The cut in `[lo, hi]` nearest `target` that falls right after a sentence end, else `target`.
fn best_cut(text: &str, enc: &Encoded, lo: usize, hi: usize, target: usize) -> usize {
    (lo..=hi)
        .filter(|&cut| ends_sentence(text, enc.offsets[cut - 1].1))
        .min_by_key(|&cut| cut.abs_diff(target))
        .unwrap_or(target)
}

/// Whether the text before byte `at` ends a sentence: `.`, `!` or `?`, optionally followed by
/// closing quotes or brackets, and then whitespace or the end of the text.
fn ends_sentence(text: &str, at: usize) -> bool {
    let Some(before) = text.get(..at) else {
        return false;
    };
    let after_ok = text
        .get(at..)
        .and_then(|rest| rest.chars().next())
        .is_none_or(char::is_whitespace);
    let last = before
        .chars()
        .rev()
        .find(|c| !matches!(c, '"' | '\'' | '’' | '”' | ')' | ']'));
    after_ok && matches!(last, Some('.' | '!' | '?'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{DocKind, Page};

    fn doc(text: &str, page_bytes: usize) -> Document {
        let pages = (0..text.len().div_ceil(page_bytes))
            .map(|i| Page {
                number: i as u32 + 1,
                text_range: i * page_bytes..((i + 1) * page_bytes).min(text.len()),
                synthetic: true,
                extractor: "test".into(),
                warnings: vec![],
            })
            .collect();
        Document {
            title: "t".into(),
            kind: DocKind::Text,
            text: text.into(),
            pages,
            sections: vec![],
            notes: vec![],
            failed_pages: vec![],
        }
    }

    /// One token per word (with its leading space), like a BPE tokenizer would give.
    fn words(text: &str) -> Encoded {
        let mut enc = Encoded::default();
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c == ' ' && i > start {
                enc.ids.push(enc.ids.len() as u32);
                enc.offsets.push((start, i));
                start = i;
            }
        }
        enc.ids.push(enc.ids.len() as u32);
        enc.offsets.push((start, text.len()));
        enc
    }

    #[test]
    fn cuts_fall_at_sentence_ends_within_ten_percent() {
        // Sentences of 7 words; chunks of 20 ± 2 words must end after a full stop.
        let text = "one two three four five six seven. ".repeat(12);
        let text = text.trim_end();
        let d = doc(text, 100);
        let chunks = chunk(&d, &words(text), 20);
        for c in &chunks[..chunks.len() - 1] {
            let len = c.tokens.len();
            assert!((18..=22).contains(&len), "chunk of {len}");
            assert!(
                d.text[c.text.clone()].ends_with('.'),
                "{:?}",
                &d.text[c.text.clone()]
            );
        }
        // Chunks tile the tokens with no gap.
        for pair in chunks.windows(2) {
            assert_eq!(pair[0].tokens.end, pair[1].tokens.start);
        }
        assert_eq!(chunks.last().map(|c| c.tokens.end), Some(84));
    }

    #[test]
    fn without_sentence_ends_a_chunk_is_cut_at_its_size() {
        let text = "word ".repeat(50);
        let d = doc(text.trim_end(), 1000);
        let chunks = chunk(&d, &words(text.trim_end()), 20);
        assert_eq!(chunks[0].tokens, 0..20);
    }

    #[test]
    fn chunks_know_their_pages() {
        let text = "aaaa bbbb cccc dddd. ".repeat(10);
        let d = doc(text.trim_end(), 50);
        let chunks = chunk(&d, &words(text.trim_end()), 8);
        assert_eq!(chunks[0].pages, 1..=1);
        let last = chunks.last().expect("chunks");
        assert_eq!(*last.pages.end(), d.pages.len() as u32);
    }

    #[test]
    fn quotes_after_a_full_stop_still_end_a_sentence() {
        assert!(ends_sentence(
            "He said “stop.” Then",
            "He said “stop.”".len()
        ));
        assert!(!ends_sentence("Mr. Holmes", 2));
    }
}
