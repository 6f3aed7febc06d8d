//! Drawing: a pure function of the [`App`] (and the clock, for live rates). Nothing here
//! changes state; scroll offsets are clamped to what fits as the frame is laid out.

use std::time::Instant;

use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Clear, Gauge, Paragraph, Wrap};
use ratatui::Frame;

use super::app::{App, Focus, Phase, SourceView};
use super::history::page_range;
use super::markdown::{wrap, wrap_all};
use crate::engine::session::{NodeView, Stage};
use crate::sys::human_bytes;

const SPINNER: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
/// Below this the panes cannot show anything useful; a one-line notice is drawn instead.
const MIN_SIZE: (u16, u16) = (40, 12);

/// Where each pane goes on a screen of a given size.
pub struct Areas {
    pub chat: Rect,
    pub input: Rect,
    pub tree: Rect,
    pub sources: Rect,
    pub status: Rect,
}

/// Split the screen: chat and input on the left, tree over sources on the right, a
/// two-line status bar at the bottom.
pub fn layout(area: Rect, input_lines: usize) -> Areas {
    let [main, status] = Layout::vertical([Constraint::Min(1), Constraint::Length(2)]).areas(area);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(main);
    let input_h = (input_lines as u16).clamp(1, 4) + 2;
    let [chat, input] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(input_h)]).areas(left);
    let [tree, sources] =
        Layout::vertical([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(right);
    Areas {
        chat,
        input,
        tree,
        sources,
        status,
    }
}

/// Draw the whole screen.
pub fn draw(frame: &mut Frame, app: &App, now: Instant) {
    let area = frame.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let msg = format!(
            "slm-chat: the terminal is too small (needs {}×{})",
            MIN_SIZE.0, MIN_SIZE.1
        );
        frame.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), area);
        return;
    }
    match &app.phase {
        Phase::Starting => draw_progress(frame, app, area),
        Phase::Failed(err) => draw_error(frame, app, err, area),
        Phase::Ready => {
            let a = layout(area, app.input.lines().len());
            draw_chat(frame, app, a.chat);
            draw_input(frame, app, a.input);
            draw_tree(frame, app, a.tree);
            draw_sources(frame, app, a.sources);
            draw_status(frame, app, a.status, now);
        }
    }
    if app.help {
        draw_help(frame, app, area);
    }
}

fn pane<'a>(title: impl Into<Line<'a>>, focused: bool) -> Block<'a> {
    let border = if focused {
        Style::default().fg(Color::Cyan)
    } else {
        Style::default().fg(Color::DarkGray)
    };
    Block::default()
        .borders(Borders::ALL)
        .border_type(if focused {
            BorderType::Thick
        } else {
            BorderType::Plain
        })
        .border_style(border)
        .title(title)
}

/// A rectangle of at most `w`×`h` centred in `area`.
fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Model => "Loading the model",
        Stage::Document => "Reading the document",
        Stage::Encode => "Building the context tree",
        Stage::Open => "Opening the context tree",
        Stage::Embed => "Embedding passages for dense search",
    }
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn draw_progress(frame: &mut Frame, app: &App, area: Rect) {
    let outer = pane(format!(" slm-chat · {} ", app.title), false);
    frame.render_widget(outer, area);
    let boxed = centered(area, 72, 14);
    frame.render_widget(Clear, boxed);
    let block = pane(" Getting ready ", true);
    let inner = block.inner(boxed);
    frame.render_widget(block, boxed);
    let [head, gauge, figures, log, keys] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(1),
        Constraint::Length(2),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(inner);
    let spin = SPINNER[(app.ticks % SPINNER.len() as u64) as usize];
    let (stage, message) = match &app.progress {
        Some(p) => (stage_name(p.stage), p.message.as_str()),
        None => ("Starting", ""),
    };
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(vec![
                Span::styled(format!("{spin} "), Style::default().fg(Color::Cyan)),
                Span::styled(stage, Style::default().add_modifier(Modifier::BOLD)),
            ]),
            Line::raw(message.to_string()),
        ])
        .wrap(Wrap { trim: true }),
        head,
    );
    if let Some(p) = app.progress.as_ref().filter(|p| p.total > 0) {
        let ratio = (p.done as f64 / p.total as f64).clamp(0.0, 1.0);
        frame.render_widget(
            Gauge::default()
                .gauge_style(Style::default().fg(Color::Cyan).bg(Color::Black))
                .ratio(ratio)
                .label(format!("{}/{} chunks", p.done, p.total)),
            gauge,
        );
        let eta = p.eta_secs.map_or_else(|| "–".to_string(), duration);
        frame.render_widget(
            Paragraph::new(format!("{:.0} tokens/s · ETA {eta}", p.tok_s)),
            figures,
        );
    }
    let earlier: Vec<Line> = app
        .progress_log
        .iter()
        .rev()
        .take(usize::from(log.height))
        .rev()
        .map(|m| Line::styled(format!("✓ {m}"), Style::default().fg(Color::DarkGray)))
        .collect();
    frame.render_widget(Paragraph::new(earlier), log);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            "Esc".bold(),
            " cancel (finished chunks are kept; reopening resumes)  ".into(),
            "Ctrl-C".bold(),
            " quit".into(),
        ]))
        .style(Style::default().fg(Color::Gray)),
        keys,
    );
}

fn draw_error(frame: &mut Frame, app: &App, err: &str, area: Rect) {
    frame.render_widget(pane(format!(" slm-chat · {} ", app.title), false), area);
    let boxed = centered(area, 72, 10);
    frame.render_widget(Clear, boxed);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(Style::default().fg(Color::Red))
        .title(" Cannot open the document ");
    let inner = block.inner(boxed);
    frame.render_widget(block, boxed);
    let [text, keys] = Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(inner);
    frame.render_widget(
        Paragraph::new(format!("slm-chat: {err}"))
            .style(Style::default().fg(Color::Red))
            .wrap(Wrap { trim: true }),
        text,
    );
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            "q".bold(),
            " or ".into(),
            "Esc".bold(),
            " quit".into(),
        ])),
        keys,
    );
}

/// The chat's rows at `width`, from the bottom up, until `need` rows are there (the last
/// `need` rows of the conversation, in order, and whether there are more above).
fn chat_rows(app: &App, width: usize, need: usize) -> (Vec<Line<'static>>, bool) {
    let you = Style::default()
        .fg(Color::Green)
        .add_modifier(Modifier::BOLD);
    let meta = Style::default().fg(Color::DarkGray);
    // Each block is a run of logical lines; blocks are added newest first.
    let mut blocks: Vec<Vec<Line<'static>>> = Vec::new();
    if let Some(p) = &app.pending {
        let mut b = question_lines(&p.question, you);
        if p.text.is_empty() {
            let spin = SPINNER[(app.ticks % SPINNER.len() as u64) as usize];
            b.push(Line::styled(
                format!("{spin} reading the relevant pages…"),
                meta,
            ));
        } else {
            b.extend(p.lines.iter().cloned());
            if let Some(last) = b.last_mut() {
                last.spans
                    .push(Span::styled("▌", Style::default().fg(Color::Cyan)));
            }
        }
        blocks.push(b);
    }
    for (i, t) in app.turns.iter().enumerate().rev() {
        let mut b = question_lines(&t.question, you);
        b.extend(app.rendered.get(i).into_iter().flatten().cloned());
        let mut pages: Vec<String> = Vec::new();
        for s in &t.sources {
            let p = format!("p.{}", page_range(s.pages));
            if !pages.contains(&p) && pages.len() < 4 {
                pages.push(p);
            }
        }
        let mut m = format!("  — {}", t.stop);
        if !pages.is_empty() {
            m.push_str(&format!(" · {}", pages.join(", ")));
        }
        let mut footer = Line::styled(m, meta);
        if t.supported == Some(false) {
            footer.spans.push(Span::styled(
                format!(" · {}", crate::engine::trust::UNSUPPORTED),
                Style::default().fg(Color::Yellow),
            ));
        }
        b.push(footer);
        b.push(Line::default());
        let next = app
            .turns
            .get(i + 1)
            .map_or(app.conversation, |n| n.conversation);
        if i + 1 == app.restored {
            b.push(
                Line::styled("── saved conversation above ──", meta).alignment(Alignment::Center),
            );
            b.push(Line::default());
        } else if next != t.conversation {
            b.push(Line::styled("── new conversation ──", meta).alignment(Alignment::Center));
            b.push(Line::default());
        }
        blocks.push(b);
    }
    let mut rows: Vec<Line<'static>> = Vec::new();
    let mut more = false;
    for (k, b) in blocks.iter().enumerate() {
        if rows.len() >= need {
            more = k < blocks.len();
            break;
        }
        let mut wrapped = wrap_all(b, width);
        wrapped.append(&mut rows);
        rows = wrapped;
    }
    if rows.len() > need {
        more = true;
        rows.drain(..rows.len() - need);
    }
    (rows, more)
}

fn question_lines(q: &str, style: Style) -> Vec<Line<'static>> {
    q.lines()
        .enumerate()
        .map(|(i, l)| {
            let lead = if i == 0 { "▶ " } else { "  " };
            Line::styled(format!("{lead}{l}"), style)
        })
        .collect()
}

fn draw_chat(frame: &mut Frame, app: &App, area: Rect) {
    let block = pane(format!(" Chat · {} ", app.title), app.focus == Focus::Chat);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if app.turns.is_empty() && app.pending.is_none() {
        let hint = vec![
            Line::raw(""),
            Line::styled(
                "Ask a question about the document below.",
                Style::default().fg(Color::Gray),
            ),
            Line::styled(
                "Tab moves between panes · ? or F1 lists every key",
                Style::default().fg(Color::DarkGray),
            ),
        ];
        frame.render_widget(Paragraph::new(hint).wrap(Wrap { trim: true }), inner);
        return;
    }
    let h = usize::from(inner.height);
    let (mut rows, more) = chat_rows(app, usize::from(inner.width), h + app.chat_scroll);
    // Scrolled past the top: stop at the first row instead of showing blank space.
    let scroll = app.chat_scroll.min(rows.len().saturating_sub(h));
    rows.truncate(rows.len() - scroll);
    let start = rows.len().saturating_sub(h);
    let visible: Vec<Line> = rows.drain(start..).collect();
    frame.render_widget(Paragraph::new(visible), inner);
    if scroll > 0 || (more && start > 0) {
        let tag = if scroll > 0 {
            format!(" ↑ scrolled {scroll} · End/G bottom ")
        } else {
            " ↑ more ".to_string()
        };
        let w = (tag.chars().count() as u16).min(area.width.saturating_sub(2));
        let r = Rect::new(area.right().saturating_sub(w + 1), area.y, w, 1);
        frame.render_widget(
            Paragraph::new(tag).style(Style::default().fg(Color::Yellow)),
            r,
        );
    }
}

fn draw_input(frame: &mut Frame, app: &App, area: Rect) {
    let title = if app.generating() {
        " Question · answering… Esc stops "
    } else {
        " Question · Enter sends · Alt-Enter new line "
    };
    let block = pane(title, app.focus == Focus::Input);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    frame.render_widget(&app.input, inner);
}

fn node_label(n: &NodeView) -> String {
    if n.level == 0 {
        format!("#{}", n.chunk)
    } else {
        format!("L{}.{}", n.level, n.index)
    }
}

fn draw_tree(frame: &mut Frame, app: &App, area: Rect) {
    let Some(tree) = &app.tree else { return };
    let chunks = tree.roots.len();
    let title = format!(" Tree · {chunks} chunks · {} nodes ", tree.view.nodes.len());
    let focused = app.focus == Focus::Tree;
    let block = pane(title, focused);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let h = usize::from(inner.height);
    if h == 0 {
        return;
    }
    // Keep the selection in view: stateless, the selected row is at most the last one.
    let offset = (app.tree_sel + 1).saturating_sub(h);
    let lines: Vec<Line> = app
        .rows
        .iter()
        .enumerate()
        .skip(offset)
        .take(h)
        .map(|(row, &(n, depth))| {
            let node = &tree.view.nodes[n];
            let arrow = if tree.children[n].is_empty() {
                "  "
            } else if app.open.contains(&n) {
                "▾ "
            } else {
                "▸ "
            };
            let mut spans = vec![
                Span::raw("  ".repeat(depth)),
                Span::raw(arrow),
                Span::styled(
                    node_label(node),
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Span::styled(
                    format!(" p.{}", page_range(node.pages)),
                    Style::default().fg(Color::Yellow),
                ),
            ];
            let mut style = Style::default();
            if let Some(m) = app.marks.get(&n) {
                spans.push(Span::styled(
                    format!(" ● L{} α{} {:.2}", m.level, m.alpha, m.score),
                    Style::default()
                        .fg(Color::Green)
                        .add_modifier(Modifier::BOLD),
                ));
                style = style.fg(Color::Green);
            } else if app.on_path.contains(&n) {
                style = style.fg(Color::Cyan);
            }
            spans.push(Span::styled(
                format!(" {}", node.preview),
                Style::default().fg(Color::Gray),
            ));
            let mut line = Line::from(spans).style(style);
            if row == app.tree_sel {
                line = line.style(if focused {
                    style.add_modifier(Modifier::REVERSED)
                } else {
                    style.bg(Color::DarkGray)
                });
            }
            line
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

/// A passage as the pane shows it: paragraphs (split at blank lines) with the page's hard
/// line breaks joined and words hyphenated across a line end made whole again, so the
/// pane's own wrapping reads as prose. An empty string stands between paragraphs.
pub fn reflow(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut para = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            if !para.is_empty() {
                out.push(std::mem::take(&mut para));
                out.push(String::new());
            }
            continue;
        }
        let starts_lower = line.chars().next().is_some_and(char::is_lowercase);
        let hyphen = para
            .strip_suffix(['-', '\u{AD}'])
            .filter(|p| p.chars().next_back().is_some_and(char::is_alphabetic));
        match hyphen {
            Some(p) if starts_lower => para.truncate(p.len()),
            _ if !para.is_empty() => para.push(' '),
            _ => {}
        }
        para.push_str(line);
    }
    if !para.is_empty() {
        out.push(para);
    } else if out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    out
}

fn draw_sources(frame: &mut Frame, app: &App, area: Rect) {
    let heading = Style::default()
        .fg(Color::Yellow)
        .add_modifier(Modifier::BOLD);
    let mut lines: Vec<Line<'static>> = Vec::new();
    let title = match (app.source_view, &app.tree) {
        (SourceView::Node(i), Some(tree)) => {
            let n = &tree.view.nodes[i];
            lines.push(Line::styled(
                format!(
                    "pages {} · chunk {} {}",
                    page_range(n.pages),
                    n.chunk,
                    node_label(n)
                ),
                heading,
            ));
            lines.extend(reflow(tree.text(i)).into_iter().map(Line::raw));
            format!(" Source · {} p.{} ", node_label(n), page_range(n.pages))
        }
        (_, tree) => {
            let tree: Option<&super::app::Tree> = tree.as_ref();
            if app.last_sources.is_empty() {
                lines.push(Line::styled(
                    "The pages the next answer draws on show here. Select a node in the tree to read it.",
                    Style::default().fg(Color::DarkGray),
                ));
            }
            for n in app.last_sources.iter().take(5) {
                lines.push(Line::styled(
                    format!(
                        "pages {} · chunk {} {} · α {} · score {:.2}",
                        page_range(n.pages),
                        n.chunk,
                        node_label(n),
                        n.alpha,
                        n.score
                    ),
                    heading,
                ));
                let text = tree
                    .and_then(|t| t.find(n).map(move |i| t.text(i)))
                    .filter(|t| !t.is_empty())
                    .unwrap_or(&n.preview);
                lines.extend(reflow(text).into_iter().map(Line::raw));
                lines.push(Line::default());
            }
            " Sources · last answer ".to_string()
        }
    };
    let block = pane(title, app.focus == Focus::Sources);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let rows: Vec<Line> = lines
        .iter()
        .flat_map(|l| wrap(l, usize::from(inner.width)))
        .collect();
    let scroll = app
        .sources_scroll
        .min(rows.len().saturating_sub(usize::from(inner.height)));
    let visible: Vec<Line> = rows
        .into_iter()
        .skip(scroll)
        .take(usize::from(inner.height))
        .collect();
    frame.render_widget(Paragraph::new(visible), inner);
}

fn draw_status(frame: &mut Frame, app: &App, area: Rect, now: Instant) {
    frame.render_widget(
        Paragraph::new(vec![status_figures(app), status_activity(app, now)])
            .style(Style::default().bg(Color::Reset)),
        area,
    );
}

fn status_sep() -> Span<'static> {
    Span::styled(" · ", Style::default().fg(Color::DarkGray))
}

/// The status bar's first line: model, device, memory, the tree.
fn status_figures(app: &App) -> Line<'static> {
    let s = &app.stats;
    let sep = status_sep;
    let rss = if app.rss > 0 { app.rss } else { s.rss_bytes };
    let doc_tokens = app.tree.as_ref().map_or(0, |t| t.view.document_tokens);
    Line::from(vec![
        Span::styled(
            if s.model.is_empty() {
                "model…".to_string()
            } else {
                s.model.clone()
            },
            Style::default().fg(Color::Cyan),
        ),
        sep(),
        Span::raw(if s.device.is_empty() {
            "?".to_string()
        } else {
            s.device.clone()
        }),
        sep(),
        Span::raw(format!("RSS {}", human_bytes(rss))),
        sep(),
        Span::raw(format!(
            "tree {} disk, {} mapped",
            human_bytes(s.store_bytes),
            human_bytes(s.mapped_bytes)
        )),
        sep(),
        Span::raw(format!("{doc_tokens} doc tokens")),
    ])
}

/// The status bar's second line: a notice, the injected KV, and the answer under way (or
/// the last answer's rates, or the keys).
fn status_activity(app: &App, now: Instant) -> Line<'static> {
    let s = &app.stats;
    let dim = Style::default().fg(Color::DarkGray);
    let sep = status_sep;
    let mut second: Vec<Span> = Vec::new();
    if let Some(n) = &app.notice {
        second.push(Span::styled(
            format!("{n} "),
            Style::default().fg(Color::Black).bg(Color::Yellow),
        ));
        second.push(sep());
    }
    if s.injected_tokens > 0 || s.budget_tokens > 0 {
        second.push(Span::raw(format!(
            "KV {}/{} tok ({})",
            s.injected_tokens,
            s.budget_tokens,
            human_bytes(s.injected_bytes)
        )));
        second.push(sep());
    }
    if let Some(p) = &app.pending {
        let spin = SPINNER[(app.ticks % SPINNER.len() as u64) as usize];
        second.push(Span::styled(
            format!("{spin} answering"),
            Style::default().fg(Color::Cyan),
        ));
        if let Some(ttft) = app.live_first_token() {
            second.push(sep());
            second.push(Span::raw(format!(
                "TTFT {:.0} ms",
                ttft.as_secs_f64() * 1000.0
            )));
        }
        if let Some(rate) = app.live_decode_rate(now) {
            second.push(sep());
            second.push(Span::raw(format!(
                "decode ~{rate:.1} tok/s ({} tok)",
                p.pieces
            )));
        }
        second.push(sep());
        second.push(Span::styled("Esc stops", dim));
    } else if s.decode_tokens > 0 {
        second.push(Span::raw(format!(
            "TTFT {:.0} ms",
            s.first_token_ms.unwrap_or(0.0)
        )));
        second.push(sep());
        second.push(Span::raw(format!(
            "prefill {:.0} tok/s · decode {:.1} tok/s ({} tok)",
            s.prefill_tok_s, s.decode_tok_s, s.decode_tokens
        )));
    } else {
        second.push(Span::styled("? help · Tab focus · Ctrl-C quit", dim));
    }
    Line::from(second)
}

/// Every key, for the help overlay (and nothing else: keep it in step with `App::key`).
pub const KEYS: [(&str, &str); 18] = [
    ("Enter", "send the question (in the question box)"),
    ("Alt-Enter", "new line in the question"),
    (
        "Esc",
        "stop the answer being generated, else back to the question",
    ),
    ("Tab / Shift-Tab", "next / previous pane"),
    ("↑ ↓  j k", "scroll the chat or sources; move in the tree"),
    (
        "PageUp PageDown",
        "scroll a page (the chat, from the question box)",
    ),
    ("Home End  g G", "top / bottom"),
    ("Enter Space →", "open or close a tree node (tree)"),
    ("← h", "close a node / go to its parent (tree)"),
    ("a", "sources: back to the last answer's nodes"),
    ("y", "copy the last answer (clipboard, or OSC 52 over SSH)"),
    ("e", "export the conversation to Markdown"),
    (
        "n  Ctrl-N",
        "new conversation: earlier turns no longer followed",
    ),
    ("? / F1", "this help (? outside the question box)"),
    ("Ctrl-C", "quit"),
    ("", ""),
    ("tree marks", "● level, α (tokens per KV entry), score"),
    (
        "history",
        "saved per book; reopening starts a new conversation",
    ),
];

fn draw_help(frame: &mut Frame, app: &App, area: Rect) {
    let boxed = centered(area, 76, KEYS.len() as u16 + 5);
    frame.render_widget(Clear, boxed);
    let block = pane(" Keys · any key closes ", true);
    let inner = block.inner(boxed);
    frame.render_widget(block, boxed);
    let mut lines: Vec<Line> = KEYS
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(
                    format!("{k:>16}  "),
                    Style::default()
                        .fg(Color::Cyan)
                        .add_modifier(Modifier::BOLD),
                ),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::default());
    lines.push(Line::styled(
        format!("log: {}", app.log_path),
        Style::default().fg(Color::DarkGray),
    ));
    frame.render_widget(Paragraph::new(lines), inner);
}

#[cfg(test)]
mod tests {
    use super::reflow;

    #[test]
    fn reflow_joins_lines_and_undoes_line_end_hyphens() {
        let pdf = "Our 152-layer residual net is the deep-\nest network yet presented\non ImageNet.\n\n  Second para-\n  graph.\nWell-\nKnown stays.\n";
        assert_eq!(
            reflow(pdf),
            [
                "Our 152-layer residual net is the deepest network yet presented on ImageNet.",
                "",
                "Second paragraph. Well- Known stays.",
            ]
        );
        assert!(reflow("\n\n").is_empty());
    }
}
