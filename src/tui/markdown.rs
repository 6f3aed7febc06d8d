//! Markdown → styled terminal lines, and word wrapping of styled lines to a width.
//!
//! Rendering is width-independent (one [`Line`] per logical line) so a finished answer is
//! rendered once and cached; only wrapping depends on the pane's width.

use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use unicode_width::UnicodeWidthChar;

/// Render Markdown into logical lines (not yet wrapped).
pub fn render(md: &str) -> Vec<Line<'static>> {
    let mut r = Renderer::default();
    for event in Parser::new_ext(md, Options::empty()) {
        r.event(event);
    }
    r.flush();
    // A trailing blank line from the last block is noise at the end of a message.
    while r.lines.last().is_some_and(|l| l.spans.is_empty()) {
        r.lines.pop();
    }
    r.lines
}

#[derive(Default)]
struct Renderer {
    lines: Vec<Line<'static>>,
    current: Vec<Span<'static>>,
    /// Inline styles in force (emphasis, strong, links), innermost last.
    styles: Vec<Style>,
    /// One entry per open list: the next number, or None for bullets.
    lists: Vec<Option<u64>>,
    /// The prefix the current line starts with (list indentation, quote bars).
    prefix: Vec<Span<'static>>,
    quote_depth: usize,
    in_code_block: bool,
}

impl Renderer {
    fn style(&self) -> Style {
        self.styles
            .iter()
            .fold(Style::default(), |acc, s| acc.patch(*s))
    }

    fn push_text(&mut self, text: &str, style: Style) {
        if self.current.is_empty() {
            self.current.extend(self.prefix.iter().cloned());
            self.current.extend(self.quote_bars());
        }
        self.current.push(Span::styled(text.to_string(), style));
    }

    fn quote_bars(&self) -> Vec<Span<'static>> {
        (0..self.quote_depth)
            .map(|_| Span::styled("│ ", Style::default().fg(Color::DarkGray)))
            .collect()
    }

    /// End the current line (if it has anything on it).
    fn flush(&mut self) {
        if !self.current.is_empty() {
            self.lines
                .push(Line::from(std::mem::take(&mut self.current)));
        }
    }

    fn blank(&mut self) {
        self.flush();
        if self.lists.is_empty() && self.lines.last().is_some_and(|l| !l.spans.is_empty()) {
            self.lines.push(Line::default());
        }
    }

    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Start(tag) => self.start(tag),
            Event::End(tag) => self.end(tag),
            Event::Text(text) if self.in_code_block => {
                let style = Style::default().fg(Color::Yellow);
                for line in text.split_inclusive('\n') {
                    let line = line.trim_end_matches('\n');
                    self.push_text("▏ ", Style::default().fg(Color::DarkGray));
                    self.current.push(Span::styled(line.to_string(), style));
                    self.flush();
                }
            }
            Event::Text(text) => {
                let style = self.style();
                self.push_text(&text, style);
            }
            Event::Code(code) => {
                let style = self.style().fg(Color::Yellow);
                self.push_text(&code, style);
            }
            Event::SoftBreak => {
                let style = self.style();
                self.push_text(" ", style);
            }
            Event::HardBreak => self.flush(),
            Event::Rule => {
                self.blank();
                self.lines.push(Line::styled(
                    "────────",
                    Style::default().fg(Color::DarkGray),
                ));
                self.lines.push(Line::default());
            }
            Event::Html(t) | Event::InlineHtml(t) => {
                let style = self.style();
                self.push_text(&t, style);
            }
            Event::TaskListMarker(done) => {
                let style = self.style();
                self.push_text(if done { "[x] " } else { "[ ] " }, style);
            }
            Event::FootnoteReference(_) | Event::InlineMath(_) | Event::DisplayMath(_) => {}
        }
    }

    fn start(&mut self, tag: Tag<'_>) {
        match tag {
            Tag::Paragraph => {}
            Tag::Heading { level, .. } => {
                self.blank();
                let style = Style::default()
                    .fg(Color::Cyan)
                    .add_modifier(Modifier::BOLD);
                let style = if level == HeadingLevel::H1 {
                    style.add_modifier(Modifier::UNDERLINED)
                } else {
                    style
                };
                self.styles.push(style);
            }
            Tag::BlockQuote(_) => {
                self.blank();
                self.quote_depth += 1;
            }
            Tag::CodeBlock(kind) => {
                self.blank();
                self.in_code_block = true;
                if let CodeBlockKind::Fenced(lang) = kind {
                    if !lang.is_empty() {
                        self.lines.push(Line::styled(
                            format!("▏ {lang}"),
                            Style::default().fg(Color::DarkGray),
                        ));
                    }
                }
            }
            Tag::List(start) => {
                if self.lists.is_empty() {
                    self.blank();
                } else {
                    self.flush();
                }
                self.lists.push(start);
            }
            Tag::Item => {
                self.flush();
                let depth = self.lists.len().saturating_sub(1);
                let marker = match self.lists.last_mut() {
                    Some(Some(n)) => {
                        let m = format!("{n}. ");
                        *n += 1;
                        m
                    }
                    _ => "• ".to_string(),
                };
                self.prefix = vec![Span::raw("  ".repeat(depth))];
                let style = Style::default().fg(Color::Cyan);
                self.push_text(&marker, style);
                // Continuation lines of the item line up under its text.
                self.prefix = vec![Span::raw("  ".repeat(depth) + &" ".repeat(marker.len()))];
            }
            Tag::Emphasis => self
                .styles
                .push(Style::default().add_modifier(Modifier::ITALIC)),
            Tag::Strong => self
                .styles
                .push(Style::default().add_modifier(Modifier::BOLD)),
            Tag::Strikethrough => self
                .styles
                .push(Style::default().add_modifier(Modifier::CROSSED_OUT)),
            Tag::Link { .. } => self.styles.push(
                Style::default()
                    .fg(Color::Blue)
                    .add_modifier(Modifier::UNDERLINED),
            ),
            _ => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Paragraph => self.blank(),
            TagEnd::Heading(_) => {
                self.styles.pop();
                self.blank();
            }
            TagEnd::BlockQuote(_) => {
                self.flush();
                self.quote_depth = self.quote_depth.saturating_sub(1);
                self.blank();
            }
            TagEnd::CodeBlock => {
                self.in_code_block = false;
                self.blank();
            }
            TagEnd::List(_) => {
                self.flush();
                self.lists.pop();
                self.prefix.clear();
                if self.lists.is_empty() {
                    self.blank();
                } else {
                    let depth = self.lists.len().saturating_sub(1);
                    self.prefix = vec![Span::raw("  ".repeat(depth + 1))];
                }
            }
            TagEnd::Item => self.flush(),
            TagEnd::Emphasis | TagEnd::Strong | TagEnd::Strikethrough | TagEnd::Link => {
                self.styles.pop();
            }
            _ => {}
        }
    }
}

/// Word-wrap one styled line to `width` columns (at least 1), keeping span styles.
/// Words longer than the width are cut.
pub fn wrap(line: &Line<'static>, width: usize) -> Vec<Line<'static>> {
    let width = width.max(1);
    let mut out: Vec<Line<'static>> = Vec::new();
    let mut row: Vec<Span<'static>> = Vec::new();
    let mut row_width = 0usize;
    // Pieces are words and the spaces after them, with the style of their span.
    for span in &line.spans {
        let style = line.style.patch(span.style);
        for piece in split_words(&span.content) {
            let w: usize = piece.chars().filter_map(UnicodeWidthChar::width).sum();
            let blank = piece.trim().is_empty();
            if row_width + w > width && row_width > 0 {
                if blank {
                    // Spaces at a break are dropped, not carried to the next row.
                    continue;
                }
                out.push(Line::from(std::mem::take(&mut row)));
                row_width = 0;
            }
            if w > width {
                // A word wider than the row: cut it into row-sized pieces.
                let mut cur = String::new();
                let mut cur_w = 0;
                for ch in piece.chars() {
                    let cw = ch.width().unwrap_or(0);
                    if row_width + cur_w + cw > width && (row_width + cur_w) > 0 {
                        row.push(Span::styled(std::mem::take(&mut cur), style));
                        out.push(Line::from(std::mem::take(&mut row)));
                        row_width = 0;
                        cur_w = 0;
                    }
                    cur.push(ch);
                    cur_w += cw;
                }
                row.push(Span::styled(cur, style));
                row_width += cur_w;
            } else {
                row.push(Span::styled(piece.to_string(), style));
                row_width += w;
            }
        }
    }
    out.push(Line::from(row));
    out
}

/// Split into words, each followed by the whitespace after it, so joining gives the input.
fn split_words(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (i, ch) in s.char_indices() {
        let space = ch == ' ';
        if in_space && !space {
            out.push(&s[start..i]);
            start = i;
        }
        in_space = space;
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// Wrap many lines; the number of rows they take is the result's length.
pub fn wrap_all(lines: &[Line<'static>], width: usize) -> Vec<Line<'static>> {
    lines.iter().flat_map(|l| wrap(l, width)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(lines: &[Line<'_>]) -> Vec<String> {
        lines
            .iter()
            .map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect())
            .collect()
    }

    #[test]
    fn lists_code_and_emphasis_render_as_lines() {
        let md = "Holmes says *elementary*.\n\n- one\n- two **bold**\n\n1. first\n2. second\n\n```rust\nfn x() {}\n```\n";
        let lines = render(md);
        assert_eq!(
            plain(&lines),
            [
                "Holmes says elementary.",
                "",
                "• one",
                "• two bold",
                "",
                "1. first",
                "2. second",
                "",
                "▏ rust",
                "▏ fn x() {}",
            ]
        );
        let italic = &lines[0].spans[1];
        assert_eq!(italic.content, "elementary");
        assert!(italic.style.add_modifier.contains(Modifier::ITALIC));
    }

    #[test]
    fn an_unfinished_stream_renders_without_panicking() {
        for md in ["**bo", "```\ncode", "- a\n  - b", "> q", "1."] {
            let _ = render(md);
        }
    }

    #[test]
    fn wrap_breaks_at_spaces_keeps_styles_and_cuts_long_words() {
        let line = Line::from(vec![
            Span::raw("the quick "),
            Span::styled("brown", Style::default().add_modifier(Modifier::BOLD)),
            Span::raw(" fox"),
        ]);
        let rows = wrap(&line, 10);
        assert_eq!(plain(&rows), ["the quick ", "brown fox"]);
        assert!(rows[1].spans[0].style.add_modifier.contains(Modifier::BOLD));
        assert_eq!(
            plain(&wrap(&Line::raw("abcdefgh"), 3)),
            ["abc", "def", "gh"]
        );
        assert_eq!(plain(&wrap(&Line::raw("x"), 0)), ["x"]);
        assert_eq!(wrap(&Line::default(), 5).len(), 1);
    }
}
