//! Markdown files: pulldown-cmark events flattened to plain paragraphs; headings become
//! sections. Pages are synthetic, as for plain text.

use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd};

use super::normalize::clean_text;
use super::text::synthetic_pages;
use super::{join_blocks, Block, DocKind, Document, DocumentError, SYNTHETIC_PAGE_BYTES};

/// A Markdown document; the title is the first level-1 heading, else the file name.
pub(crate) fn load(decoded: &str, shown: &str, title: String) -> Result<Document, DocumentError> {
    let blocks = to_blocks(decoded);
    let (text, sections) = join_blocks(&blocks);
    if text.is_empty() {
        return Err(DocumentError::Empty { path: shown.into() });
    }
    let title = sections
        .iter()
        .find(|section| section.level == 1)
        .map_or(title, |section| section.title.clone());
    Ok(Document {
        title,
        kind: DocKind::Markdown,
        pages: synthetic_pages(&text, "pulldown-cmark"),
        text,
        sections,
        notes: vec![format!(
            "pages are synthetic (about {SYNTHETIC_PAGE_BYTES} bytes each); Markdown has no page numbers"
        )],
        failed_pages: Vec::new(),
    })
}

fn level_number(level: HeadingLevel) -> u8 {
    match level {
        HeadingLevel::H1 => 1,
        HeadingLevel::H2 => 2,
        HeadingLevel::H3 => 3,
        HeadingLevel::H4 => 4,
        HeadingLevel::H5 => 5,
        HeadingLevel::H6 => 6,
    }
}

/// Flattens Markdown into normalised blocks: one per heading, paragraph, list item, code
/// block and table row. Markup disappears; link text, image alt text and code stay.
fn to_blocks(source: &str) -> Vec<Block> {
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_FOOTNOTES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS;
    let mut blocks = Vec::new();
    let mut current = String::new();
    let mut heading: Option<u8> = None;
    let mut in_code = false;
    let mut flush = |current: &mut String, heading: Option<u8>, code: bool| {
        let text = if code {
            current.trim_end().to_string()
        } else {
            clean_text(current)
        };
        if !text.trim().is_empty() {
            blocks.push(Block { heading, text });
        }
        current.clear();
    };
    for event in Parser::new_ext(source, options) {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                flush(&mut current, None, false);
                heading = Some(level_number(level));
            }
            Event::End(TagEnd::Heading(_)) => {
                flush(&mut current, heading.take(), false);
            }
            Event::Start(Tag::CodeBlock(_)) => {
                flush(&mut current, None, false);
                in_code = true;
            }
            Event::End(TagEnd::CodeBlock) => {
                flush(&mut current, None, true);
                in_code = false;
            }
            Event::Start(Tag::Item) => {
                flush(&mut current, None, false);
                current.push_str("- ");
            }
            Event::End(TagEnd::Paragraph | TagEnd::Item | TagEnd::TableRow | TagEnd::TableHead) => {
                flush(&mut current, None, false);
            }
            Event::End(TagEnd::TableCell) => current.push_str(" | "),
            Event::Text(text) => {
                if in_code {
                    current.push_str(&text);
                } else {
                    current.push_str(&text.replace('\n', " "));
                }
            }
            Event::Code(text) | Event::InlineMath(text) | Event::DisplayMath(text) => {
                current.push_str(&text)
            }
            Event::SoftBreak => current.push(' '),
            Event::HardBreak => current.push('\n'),
            Event::FootnoteReference(label) => {
                current.push_str(&format!("[{label}]"));
            }
            Event::TaskListMarker(done) => current.push_str(if done { "[x] " } else { "[ ] " }),
            Event::Rule => flush(&mut current, None, false),
            _ => {}
        }
    }
    flush(&mut current, heading, false);
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_paragraphs_and_code_become_blocks() {
        let blocks = to_blocks(
            "# Title\n\nSome *emphasis* and [a link](http://x).\nSame para.\n\n## Part\n\n- one\n- two\n\n```\nlet x = 1;\n    indented\n```\n",
        );
        let got: Vec<(Option<u8>, &str)> = blocks
            .iter()
            .map(|b| (b.heading, b.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(1), "Title"),
                (None, "Some emphasis and a link. Same para."),
                (Some(2), "Part"),
                (None, "- one"),
                (None, "- two"),
                (None, "let x = 1;\n    indented"),
            ]
        );
    }

    #[test]
    fn tables_keep_cells() {
        let blocks = to_blocks("| a | b |\n|---|---|\n| 1 | 2 |\n");
        let texts: Vec<&str> = blocks.iter().map(|b| b.text.as_str()).collect();
        assert_eq!(texts, vec!["a | b |", "1 | 2 |"]);
    }
}
