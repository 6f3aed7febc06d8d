//! Text normalisation shared by all loaders: LaTeX spacing-accent repair, NFKC (ligatures),
//! whitespace and control-character clean-up, rejoining words hyphenated at line ends,
//! removal of running headers and footers that repeat across PDF pages, and cutting
//! synthetic pages. Everything here is pure string work; it never sees files or formats.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use unicode_normalization::UnicodeNormalization;

/// Per-page clean-up of raw extractor output, before running lines are removed: accents,
/// NFKC, whitespace.
pub(crate) fn clean_pdf_page(raw: &str) -> String {
    clean_lines(&nfkc(&repair_spacing_accents(raw)))
}

/// Final per-page pass after running lines are gone (a footer between a hyphen and the rest of
/// the word would otherwise block the rejoin).
pub(crate) fn finish_pdf_page(page: &str) -> String {
    clean_lines(&rejoin_hyphenated(page))
}

/// Clean-up for text that came from a text format (plain text, Markdown, XHTML).
pub(crate) fn clean_text(raw: &str) -> String {
    clean_lines(&nfkc(raw))
}

/// NFKC: folds ligatures (ﬁ → fi), full-width forms and non-breaking spaces, so words match
/// what a tokenizer and a user would type.
pub(crate) fn nfkc(s: &str) -> String {
    s.nfkc().collect()
}

/// The combining mark for a spacing accent that TeX sets as a separate glyph before the letter
/// it sits on (pdf-extract gives "O˘guz" for "Oğuz", see pdf-probe.md).
fn combining_for(accent: char) -> Option<char> {
    Some(match accent {
        '\u{00B4}' | '\u{02CA}' => '\u{0301}', // acute
        '\u{02CB}' => '\u{0300}',              // grave (modifier letter; a backtick is left alone)
        '\u{02C6}' => '\u{0302}',              // circumflex
        '\u{02DC}' => '\u{0303}',              // tilde
        '\u{00AF}' | '\u{02C9}' => '\u{0304}', // macron
        '\u{02D8}' => '\u{0306}',              // breve
        '\u{02D9}' => '\u{0307}',              // dot above
        '\u{00A8}' => '\u{0308}',              // diaeresis
        '\u{02DA}' => '\u{030A}',              // ring above
        '\u{02DD}' => '\u{030B}',              // double acute
        '\u{02C7}' => '\u{030C}',              // caron
        '\u{00B8}' => '\u{0327}',              // cedilla
        '\u{02DB}' => '\u{0328}',              // ogonek
        _ => return None,
    })
}

/// Turns "spacing accent + letter" into the accented letter (NFC). Must run before NFKC,
/// which would turn the spacing accents into a space plus a combining mark.
pub(crate) fn repair_spacing_accents(s: &str) -> String {
    if !s.chars().any(|c| combining_for(c).is_some()) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let mark = combining_for(c);
        match (mark, chars.peek().copied()) {
            (Some(mark), Some(next)) if next.is_alphabetic() => {
                chars.next();
                // TeX puts accents on a dotless i or j (\'{\i}); the composed letter has a dot.
                let base = match next {
                    'ı' => 'i',
                    'ȷ' => 'j',
                    other => other,
                };
                out.extend([base, mark].iter().copied().nfc());
            }
            _ => out.push(c),
        }
    }
    out
}

/// Normalises line ends and spaces: CR/CRLF/form feed become LF, other control characters
/// and soft hyphens go, runs of spaces and tabs become one space, lines are trimmed, and
/// runs of blank lines become one blank line (a paragraph break).
pub(crate) fn clean_lines(s: &str) -> String {
    let unified = s.replace("\r\n", "\n");
    let mut out = String::with_capacity(unified.len());
    let mut blank_run = 0usize;
    for line in unified.split(['\n', '\r', '\u{000C}', '\u{2028}', '\u{2029}']) {
        let mut cleaned = String::with_capacity(line.len());
        let mut pending_space = false;
        for c in line.chars() {
            if c.is_whitespace() {
                pending_space = !cleaned.is_empty();
            } else if c.is_control() || c == '\u{00AD}' || c == '\u{FEFF}' {
                continue;
            } else {
                if pending_space {
                    cleaned.push(' ');
                    pending_space = false;
                }
                cleaned.push(c);
            }
        }
        if cleaned.is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        out.push_str(&cleaned);
    }
    out
}

fn is_hyphen(c: char) -> bool {
    matches!(c, '-' | '\u{2010}')
}

/// Joins "inter-" at the end of a line with "preter" at the start of the next when the next
/// line starts with a lowercase letter (as pdftotext does). A blank line in between is a
/// paragraph break and is left alone.
pub(crate) fn rejoin_hyphenated(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, line) in s.split('\n').enumerate() {
        if i > 0 {
            let starts_lower = line.chars().next().is_some_and(char::is_lowercase);
            if starts_lower && ends_with_split_word(&out) {
                out.pop();
                out.push_str(line);
                continue;
            }
            out.push('\n');
        }
        out.push_str(line);
    }
    out
}

fn ends_with_split_word(text: &str) -> bool {
    let mut tail = text.chars().rev();
    matches!(
        (tail.next(), tail.next()),
        (Some(hyphen), Some(before)) if is_hyphen(hyphen) && before.is_alphabetic()
    )
}

/// How many non-blank lines at the top and at the bottom of a page may be running lines.
const EDGE_LINES: usize = 3;

/// A line longer than this is body text, never a header.
const MAX_RUNNING_LINE: usize = 120;

/// The key under which running lines are compared: lowercase, digit runs masked as `#`, so
/// "Page 12" and "Page 13" match.
fn running_key(line: &str) -> String {
    let mut key = String::with_capacity(line.len());
    let mut in_digits = false;
    for c in line.trim().chars().flat_map(char::to_lowercase) {
        if c.is_ascii_digit() {
            if !in_digits {
                key.push('#');
            }
            in_digits = true;
        } else {
            in_digits = false;
            key.push(c);
        }
    }
    key
}

/// Indices (into `lines`) of the first and last [`EDGE_LINES`] non-blank lines.
fn edge_indices(lines: &[&str]) -> Vec<usize> {
    let non_blank: Vec<usize> = (0..lines.len())
        .filter(|&i| !lines[i].trim().is_empty())
        .collect();
    let mut edges: Vec<usize> = non_blank.iter().take(EDGE_LINES).copied().collect();
    edges.extend(non_blank.iter().rev().take(EDGE_LINES).copied());
    edges.sort_unstable();
    edges.dedup();
    edges
}

/// Removes running headers and footers: lines near the top or bottom of a page whose
/// digit-masked form appears near the edge of at least 3 pages and of 40 % of all pages (so
/// alternating odd/even headers still count, while chapter openings usually do not). Works
/// in place, page by page, so the page mapping is kept. Returns the removed line patterns.
pub(crate) fn strip_running_lines(pages: &mut [String]) -> Vec<String> {
    let min_pages = 3.max((pages.len() * 2).div_ceil(5));
    if pages.len() < 3 {
        return Vec::new();
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for page in pages.iter() {
        let lines: Vec<&str> = page.split('\n').collect();
        let keys: HashSet<String> = edge_indices(&lines)
            .into_iter()
            .map(|i| lines[i])
            .filter(|line| line.chars().count() <= MAX_RUNNING_LINE)
            .map(running_key)
            .collect();
        for key in keys {
            *counts.entry(key).or_default() += 1;
        }
    }
    let running: HashSet<String> = counts
        .into_iter()
        .filter(|(_, count)| *count >= min_pages)
        .map(|(key, _)| key)
        .collect();
    if running.is_empty() {
        return Vec::new();
    }
    for page in pages.iter_mut() {
        let lines: Vec<&str> = page.split('\n').collect();
        let drop: HashSet<usize> = edge_indices(&lines)
            .into_iter()
            .filter(|&i| {
                lines[i].chars().count() <= MAX_RUNNING_LINE
                    && running.contains(&running_key(lines[i]))
            })
            .collect();
        if drop.is_empty() {
            continue;
        }
        let kept: Vec<&str> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| !drop.contains(i))
            .map(|(_, line)| *line)
            .collect();
        *page = kept.join("\n");
    }
    let mut patterns: Vec<String> = running.into_iter().collect();
    patterns.sort();
    patterns
}

/// Cuts `text` into consecutive ranges of about `target` bytes, preferring a paragraph break,
/// then a line break, then a space, so no word or UTF-8 character is split. The ranges cover
/// the whole text; the separator stays at the end of the earlier range.
pub(crate) fn paginate(text: &str, target: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < text.len() {
        if text.len() - start <= target + target / 2 {
            ranges.push(start..text.len());
            break;
        }
        let lo = floor_boundary(text, start + target / 2);
        let hi = floor_boundary(text, start + target);
        let far = floor_boundary(text, (start + target + target / 2).min(text.len()));
        let window = &text[lo..hi];
        let cut = window
            .rfind("\n\n")
            .map(|i| lo + i + 2)
            .or_else(|| text[hi..far].find("\n\n").map(|i| hi + i + 2))
            .or_else(|| window.rfind('\n').map(|i| lo + i + 1))
            .or_else(|| window.rfind(' ').map(|i| lo + i + 1))
            .unwrap_or(hi.max(ceil_boundary(text, start + 1)));
        ranges.push(start..cut);
        start = cut;
    }
    ranges
}

fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Characters other than whitespace and control codes: the measure used to choose between
/// extractors and for "almost no text" decisions (pdftotext's counts in `expected.tsv` also
/// leave out whitespace). Control codes count as nothing because a font without a Unicode
/// map comes out of pdf-extract as raw glyph codes (\u{2}\u{3}…), which clean-up removes.
pub(crate) fn visible_chars(s: &str) -> usize {
    s.chars()
        .filter(|c| !c.is_whitespace() && !c.is_control())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ligatures_fold_under_nfkc() {
        assert_eq!(nfkc("ﬁrst ﬂow e\u{FB03}cient"), "first flow efficient");
    }

    #[test]
    fn spacing_accents_become_letters() {
        assert_eq!(repair_spacing_accents("O\u{02D8}guz"), "Oğuz");
        assert_eq!(repair_spacing_accents("Erd\u{02DD}os"), "Erdős");
        assert_eq!(repair_spacing_accents("Schr\u{00A8}odinger"), "Schrödinger");
        assert_eq!(repair_spacing_accents("Andr\u{00B4}e"), "André");
        assert_eq!(repair_spacing_accents("Mart\u{00B4}\u{0131}n"), "Martín");
        assert_eq!(repair_spacing_accents("ˇr"), "ř");
        // A lone accent before a non-letter is left for NFKC to handle.
        assert_eq!(repair_spacing_accents("x \u{00B4} 1"), "x \u{00B4} 1");
    }

    #[test]
    fn page_clean_up_combines_accents_and_ligatures() {
        assert_eq!(
            clean_pdf_page("O\u{02D8}guz  ﬁnds\t\tit\r\n"),
            "Oğuz finds it"
        );
    }

    #[test]
    fn whitespace_collapses_but_paragraphs_stay() {
        let raw = "  one   two \n\n\n\nthree\u{00A0}four\n \nfive\u{000C}six\u{0007}";
        assert_eq!(clean_text(raw), "one two\n\nthree four\n\nfive\nsix");
    }

    #[test]
    fn hyphenated_words_rejoin_at_line_ends() {
        assert_eq!(
            rejoin_hyphenated("an inter-\npreter runs"),
            "an interpreter runs"
        );
        assert_eq!(rejoin_hyphenated("co-\nop-\nerative"), "cooperative");
        // Capital after the hyphen: a name or a list, not a split word.
        assert_eq!(rejoin_hyphenated("Jean-\nPaul"), "Jean-\nPaul");
        // A paragraph break is not a line end.
        assert_eq!(rejoin_hyphenated("end-\n\nnext"), "end-\n\nnext");
        // A dash after a space is punctuation.
        assert_eq!(rejoin_hyphenated("wait -\nno"), "wait -\nno");
        assert_eq!(rejoin_hyphenated("a\nb\n"), "a\nb\n");
    }

    const WORDS: [&str; 12] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima",
    ];

    /// Ten pages with a running header, a page-number footer and body lines unique per page.
    fn book_pages() -> Vec<String> {
        (1..=10)
            .map(|n| {
                let word = WORDS[n % WORDS.len()];
                format!(
                    "Pride and Prejudice -- Jane Austen Page {n}\nThe {word} story opens.\nMore about {word}.\n{n}"
                )
            })
            .collect()
    }

    #[test]
    fn running_headers_and_page_numbers_go() {
        let mut pages = book_pages();
        let removed = strip_running_lines(&mut pages);
        assert_eq!(
            removed,
            vec![
                "#".to_string(),
                "pride and prejudice -- jane austen page #".to_string()
            ]
        );
        assert_eq!(pages[0], "The bravo story opens.\nMore about bravo.");
        assert_eq!(pages[9], "The kilo story opens.\nMore about kilo.");
    }

    #[test]
    fn lines_on_few_pages_stay() {
        let mut pages = book_pages();
        for (i, page) in pages.iter_mut().enumerate() {
            if i % 4 == 0 {
                page.insert_str(0, "CHAPTER 1\n");
            }
        }
        strip_running_lines(&mut pages);
        assert!(pages[0].starts_with("CHAPTER 1\nThe bravo"), "{}", pages[0]);
        assert!(pages[1].starts_with("The charlie"));
    }

    #[test]
    fn short_documents_keep_everything() {
        let mut pages = vec!["Title\nA".to_string(), "Title\nB".to_string()];
        assert!(strip_running_lines(&mut pages).is_empty());
        assert_eq!(pages[0], "Title\nA");
    }

    #[test]
    fn running_lines_only_removed_at_page_edges() {
        let mut pages: Vec<String> = WORDS[..5]
            .iter()
            .map(|w| format!("Header\n{w} a\n{w} b\n{w} c\nHeader\n{w} d\n{w} e\n{w} f\n{w} g"))
            .collect();
        strip_running_lines(&mut pages);
        assert_eq!(
            pages[0],
            "alpha a\nalpha b\nalpha c\nHeader\nalpha d\nalpha e\nalpha f\nalpha g"
        );
    }

    #[test]
    fn pagination_covers_text_and_cuts_at_paragraphs() {
        let para = "word ".repeat(100);
        let text: String = (0..40).map(|i| format!("{i} {para}\n\n")).collect();
        let ranges = paginate(&text, 3000);
        assert!(ranges.len() > 5);
        assert_eq!(ranges[0].start, 0);
        assert_eq!(ranges.last().map(|r| r.end), Some(text.len()));
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
            assert!(text[..pair[0].end].ends_with("\n\n"));
        }
    }

    #[test]
    fn pagination_never_splits_characters() {
        let text = "é".repeat(5000);
        let ranges = paginate(&text, 3000);
        assert!(ranges.len() >= 2);
        for range in &ranges {
            assert!(text.is_char_boundary(range.start) && text.is_char_boundary(range.end));
            assert!(!range.is_empty());
        }
        assert_eq!(paginate("", 3000), Vec::<Range<usize>>::new());
    }
}
