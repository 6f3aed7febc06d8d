//! The TUI's state and the one function that changes it, [`App::update`].
//!
//! No I/O happens here: the engine's events, keys, the clock and the results of side
//! effects come in as [`Msg`]s, and what must be done outside (send a question, copy,
//! save) goes out as [`Effect`]s for the event loop to carry out.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::text::Line;
use tui_textarea::TextArea;

use super::history::{SourceRef, Turn};
use super::markdown;
use crate::engine::session::{Event, NodeView, Progress, Stats, TreeView};
use crate::engine::Exchange;

/// Everything that can happen to the app.
#[derive(Debug)]
pub enum Msg {
    Key(KeyEvent),
    Paste(String),
    Resize(u16, u16),
    Engine(Event),
    /// The engine's thread has ended (its channel closed).
    EngineGone,
    /// The saved conversation for this document, loaded after `Ready`.
    History(Vec<Turn>),
    /// This process's resident memory, sampled on each tick.
    Rss(u64),
    Tick,
    /// A line for the status bar (the outcome of an effect).
    Notice(String),
    /// Leave now (a signal).
    Quit,
}

/// Work for the event loop, which owns the terminal, the session and the files.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Answer `question`, following `history` (the current conversation's turns).
    Ask {
        question: String,
        history: Vec<Exchange>,
    },
    /// Stop the answer being generated.
    Stop,
    Copy(String),
    Export,
    SaveHistory,
    Quit,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Loading the model and document, opening or building the tree.
    Starting,
    Ready,
    /// Getting ready failed; the message says why.
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Input,
    Chat,
    Tree,
    Sources,
}

impl Focus {
    fn next(self, back: bool) -> Focus {
        const ORDER: [Focus; 4] = [Focus::Input, Focus::Chat, Focus::Tree, Focus::Sources];
        let i = ORDER.iter().position(|f| *f == self).unwrap_or(0);
        let n = if back { i + ORDER.len() - 1 } else { i + 1 };
        ORDER[n % ORDER.len()]
    }
}

/// What the sources pane shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceView {
    /// The best-scoring nodes of the last answer.
    Answer,
    /// One node of the tree (an index into [`Tree::view`]'s nodes).
    Node(usize),
}

/// The answer being generated.
#[derive(Debug)]
pub struct Pending {
    pub question: String,
    pub text: String,
    /// `text` rendered; redone on each token (only this message, never the history).
    pub lines: Vec<Line<'static>>,
    pub asked_at: Instant,
    pub first_token_at: Option<Instant>,
    /// Pieces of text received (about one per token).
    pub pieces: usize,
    pub expanded: Vec<NodeView>,
}

/// The document's tree with parent/child links worked out from (chunk, level, index).
#[derive(Debug)]
pub struct Tree {
    pub view: TreeView,
    pub children: Vec<Vec<usize>>,
    pub parent: Vec<Option<usize>>,
    pub roots: Vec<usize>,
    by_key: HashMap<(usize, usize, usize), usize>,
}

impl Tree {
    pub fn new(view: TreeView) -> Tree {
        let n = view.nodes.len();
        let by_key: HashMap<_, _> = view
            .nodes
            .iter()
            .enumerate()
            .map(|(i, v)| ((v.chunk, v.level, v.index), i))
            .collect();
        let mut children = vec![Vec::new(); n];
        let mut parent = vec![None; n];
        let mut roots = Vec::new();
        for (i, v) in view.nodes.iter().enumerate() {
            // Level w has 2^w nodes per chunk, so node (w, i)'s parent is (w-1, i/2).
            let up = (v.level > 0)
                .then(|| by_key.get(&(v.chunk, v.level - 1, v.index / 2)).copied())
                .flatten();
            match up {
                Some(p) => {
                    children[p].push(i);
                    parent[i] = Some(p);
                }
                None => roots.push(i),
            }
        }
        Tree {
            view,
            children,
            parent,
            roots,
            by_key,
        }
    }

    /// The node with this (chunk, level, index), if the tree has it.
    pub fn find(&self, n: &NodeView) -> Option<usize> {
        self.by_key.get(&(n.chunk, n.level, n.index)).copied()
    }

    /// The text of node `i` (empty if its range does not fit the text).
    pub fn text(&self, i: usize) -> &str {
        self.view
            .nodes
            .get(i)
            .and_then(|n| self.view.text.get(n.chars.0..n.chars.1))
            .unwrap_or("")
    }
}

pub struct App {
    pub title: String,
    pub phase: Phase,
    pub progress: Option<Progress>,
    /// Earlier progress messages, newest last.
    pub progress_log: Vec<String>,
    pub tree: Option<Tree>,
    /// Tree nodes shown open.
    pub open: HashSet<usize>,
    /// The visible tree rows: (node, depth).
    pub rows: Vec<(usize, usize)>,
    /// The selected row.
    pub tree_sel: usize,
    /// Nodes expanded for the last answer, with their α and score.
    pub marks: HashMap<usize, NodeView>,
    /// Ancestors of marked nodes: the path the search took.
    pub on_path: HashSet<usize>,
    pub source_view: SourceView,
    /// The last answer's nodes, best score first.
    pub last_sources: Vec<NodeView>,
    pub turns: Vec<Turn>,
    /// Each turn's answer rendered once, when it finished.
    pub rendered: Vec<Vec<Line<'static>>>,
    /// How many of `turns` came from the saved history.
    pub restored: usize,
    /// The conversation new questions follow (a [`Turn::conversation`]).
    pub conversation: u32,
    pub pending: Option<Pending>,
    pub input: TextArea<'static>,
    pub focus: Focus,
    pub help: bool,
    /// Chat rows scrolled up from the bottom (0 follows the conversation).
    pub chat_scroll: usize,
    pub sources_scroll: usize,
    pub stats: Stats,
    pub rss: u64,
    pub notice: Option<String>,
    /// The terminal's size, for paging and clamping scroll offsets.
    pub size: (u16, u16),
    pub ticks: u64,
    pub quit: bool,
    /// Where the log goes, for the help overlay.
    pub log_path: String,
}

impl App {
    pub fn new(title: impl Into<String>, log_path: impl Into<String>) -> App {
        let mut input = TextArea::default();
        input.set_placeholder_text("Ask about the document (Enter sends, Alt-Enter new line)");
        input.set_cursor_line_style(ratatui::style::Style::default());
        App {
            title: title.into(),
            phase: Phase::Starting,
            progress: None,
            progress_log: Vec::new(),
            tree: None,
            open: HashSet::new(),
            rows: Vec::new(),
            tree_sel: 0,
            marks: HashMap::new(),
            on_path: HashSet::new(),
            source_view: SourceView::Answer,
            last_sources: Vec::new(),
            turns: Vec::new(),
            rendered: Vec::new(),
            restored: 0,
            conversation: 0,
            pending: None,
            input,
            focus: Focus::Input,
            help: false,
            chat_scroll: 0,
            sources_scroll: 0,
            stats: Stats::default(),
            rss: 0,
            notice: None,
            size: (80, 24),
            ticks: 0,
            quit: false,
            log_path: log_path.into(),
        }
    }

    /// Apply one message at time `now`; returns the effects to carry out.
    pub fn update(&mut self, msg: Msg, now: Instant) -> Vec<Effect> {
        match msg {
            Msg::Key(key) if key.kind != KeyEventKind::Release => self.key(key, now),
            Msg::Key(_) => Vec::new(),
            Msg::Paste(text) => {
                if self.phase == Phase::Ready && self.focus == Focus::Input {
                    self.input.insert_str(text);
                }
                Vec::new()
            }
            Msg::Resize(w, h) => {
                self.size = (w, h);
                Vec::new()
            }
            Msg::Engine(e) => self.engine(e, now),
            Msg::EngineGone => {
                match self.phase {
                    Phase::Starting => {
                        self.phase = Phase::Failed(format!(
                            "the engine stopped before the document was ready (see {})",
                            self.log_path
                        ))
                    }
                    _ if !self.quit => {
                        self.pending = None;
                        self.notice = Some("the engine has stopped; quit and restart".into());
                    }
                    _ => {}
                }
                Vec::new()
            }
            Msg::History(turns) => {
                // Questions asked before the history arrived stay after it; reopening a
                // book starts a conversation after the saved ones.
                let newer = std::mem::replace(&mut self.turns, turns);
                self.restored = self.turns.len();
                self.conversation = self
                    .turns
                    .iter()
                    .map(|t| t.conversation + 1)
                    .max()
                    .unwrap_or(0);
                let current = self.conversation;
                self.turns.extend(newer.into_iter().map(|t| Turn {
                    conversation: current,
                    ..t
                }));
                self.rendered = self
                    .turns
                    .iter()
                    .map(|t| markdown::render(&t.answer))
                    .collect();
                Vec::new()
            }
            Msg::Rss(b) => {
                self.rss = b;
                Vec::new()
            }
            Msg::Tick => {
                self.ticks += 1;
                Vec::new()
            }
            Msg::Notice(n) => {
                self.notice = Some(n);
                Vec::new()
            }
            Msg::Quit => self.quit(),
        }
    }

    fn quit(&mut self) -> Vec<Effect> {
        self.quit = true;
        vec![Effect::Quit]
    }

    fn engine(&mut self, e: Event, now: Instant) -> Vec<Effect> {
        match e {
            Event::Progress(p) => {
                if let Some(old) = self.progress.take() {
                    if old.message != p.message && !old.message.is_empty() {
                        self.progress_log.push(old.message);
                    }
                }
                self.progress = Some(p);
            }
            Event::Ready(view) => {
                self.stats.store_bytes = view.store_bytes;
                let tree = Tree::new(view);
                self.open.clear();
                self.tree = Some(tree);
                self.phase = Phase::Ready;
                self.rebuild_rows();
            }
            Event::Token(piece) => {
                if let Some(p) = &mut self.pending {
                    p.first_token_at.get_or_insert(now);
                    p.pieces += 1;
                    p.text.push_str(&piece);
                    p.lines = markdown::render(&p.text);
                }
            }
            Event::Expanded(nodes) => self.mark(nodes),
            Event::Stats(s) => {
                let store = if s.store_bytes > 0 {
                    s.store_bytes
                } else {
                    self.stats.store_bytes
                };
                self.stats = Stats {
                    store_bytes: store,
                    ..s
                };
            }
            Event::Done(done) => {
                if let Some(p) = self.pending.take() {
                    let answer = if done.answer.is_empty() {
                        p.text
                    } else {
                        done.answer
                    };
                    self.rendered.push(markdown::render(&answer));
                    self.turns.push(Turn {
                        question: p.question,
                        answer,
                        stop: done.stop,
                        supported: done.supported,
                        conversation: self.conversation,
                        sources: read_first(&p.expanded)
                            .iter()
                            .map(|n| SourceRef {
                                chunk: n.chunk,
                                level: n.level,
                                index: n.index,
                                alpha: n.alpha,
                                score: n.score,
                                pages: n.pages,
                            })
                            .collect(),
                    });
                    return vec![Effect::SaveHistory];
                }
            }
            Event::Error(msg) => match self.phase {
                Phase::Starting => self.phase = Phase::Failed(msg),
                _ => {
                    if let Some(p) = self.pending.take() {
                        // Keep the question in the box so it can be sent again.
                        if self.input.is_empty() {
                            self.input.insert_str(&p.question);
                        }
                    }
                    self.notice = Some(format!("error: {msg}"));
                }
            },
        }
        Vec::new()
    }

    /// Mark the nodes chosen for the answer, open the path to them and select the best.
    fn mark(&mut self, nodes: Vec<NodeView>) {
        let Some(tree) = &self.tree else { return };
        self.marks.clear();
        self.on_path.clear();
        let mut best: Option<(usize, f32)> = None;
        for n in &nodes {
            let Some(i) = tree.find(n) else { continue };
            self.marks.insert(i, n.clone());
            let mut up = tree.parent[i];
            while let Some(p) = up {
                self.on_path.insert(p);
                self.open.insert(p);
                up = tree.parent[p];
            }
            if best.is_none_or(|(_, s)| n.score > s) {
                best = Some((i, n.score));
            }
        }
        self.last_sources = read_first(&nodes);
        if let Some(p) = &mut self.pending {
            p.expanded = nodes;
        }
        self.source_view = SourceView::Answer;
        self.sources_scroll = 0;
        self.rebuild_rows();
        if let Some((node, _)) = best {
            if let Some(row) = self.rows.iter().position(|(n, _)| *n == node) {
                self.tree_sel = row;
            }
        }
    }

    fn rebuild_rows(&mut self) {
        let Some(tree) = &self.tree else { return };
        let selected = self.rows.get(self.tree_sel).map(|(n, _)| *n);
        let mut rows = Vec::new();
        let mut stack: Vec<(usize, usize)> = tree.roots.iter().rev().map(|&r| (r, 0)).collect();
        while let Some((n, depth)) = stack.pop() {
            rows.push((n, depth));
            if self.open.contains(&n) {
                stack.extend(tree.children[n].iter().rev().map(|&c| (c, depth + 1)));
            }
        }
        self.rows = rows;
        self.tree_sel = selected
            .and_then(|s| self.rows.iter().position(|(n, _)| *n == s))
            .unwrap_or(0)
            .min(self.rows.len().saturating_sub(1));
    }

    /// True while an answer is being generated.
    pub fn generating(&self) -> bool {
        self.pending.is_some()
    }

    /// Seconds from the question to the first token, measured here while streaming.
    pub fn live_first_token(&self) -> Option<Duration> {
        let p = self.pending.as_ref()?;
        Some(p.first_token_at?.duration_since(p.asked_at))
    }

    /// Pieces per second since the first token (the live decode rate).
    pub fn live_decode_rate(&self, now: Instant) -> Option<f64> {
        let p = self.pending.as_ref()?;
        let secs = now.duration_since(p.first_token_at?).as_secs_f64();
        (secs > 0.2 && p.pieces > 1).then(|| (p.pieces - 1) as f64 / secs)
    }

    fn key(&mut self, key: KeyEvent, now: Instant) -> Vec<Effect> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('q')) {
            return self.quit();
        }
        if self.help {
            self.help = false;
            return Vec::new();
        }
        if key.code == KeyCode::F(1) {
            self.help = true;
            return Vec::new();
        }
        match self.phase {
            // Leaving while the tree is built cancels it; the store keeps finished chunks.
            Phase::Starting | Phase::Failed(_) => {
                if matches!(key.code, KeyCode::Esc | KeyCode::Char('q')) {
                    return self.quit();
                }
                if key.code == KeyCode::Char('?') {
                    self.help = true;
                }
                return Vec::new();
            }
            Phase::Ready => {}
        }
        self.notice = None;
        match key.code {
            KeyCode::Tab => {
                self.focus = self.focus.next(false);
                return Vec::new();
            }
            KeyCode::BackTab => {
                self.focus = self.focus.next(true);
                return Vec::new();
            }
            KeyCode::Esc if self.generating() => return vec![Effect::Stop],
            KeyCode::Esc if self.focus != Focus::Input => {
                self.focus = Focus::Input;
                return Vec::new();
            }
            KeyCode::PageUp if self.focus == Focus::Input => {
                self.scroll_chat(self.page() as isize);
                return Vec::new();
            }
            KeyCode::PageDown if self.focus == Focus::Input => {
                self.scroll_chat(-(self.page() as isize));
                return Vec::new();
            }
            KeyCode::Char('n') if ctrl => {
                self.new_conversation();
                return Vec::new();
            }
            _ => {}
        }
        match self.focus {
            Focus::Input => self.input_key(key, now),
            focus => self.pane_key(focus, key),
        }
    }

    fn input_key(&mut self, key: KeyEvent, now: Instant) -> Vec<Effect> {
        let alt = key
            .modifiers
            .intersects(KeyModifiers::ALT | KeyModifiers::SHIFT);
        match key.code {
            KeyCode::Enter if alt => {
                self.input.insert_newline();
                Vec::new()
            }
            KeyCode::Enter => {
                let question = self.input.lines().join("\n").trim().to_string();
                if question.is_empty() {
                    return Vec::new();
                }
                if self.generating() {
                    self.notice = Some("an answer is still coming (Esc stops it)".into());
                    return Vec::new();
                }
                self.input = fresh_input(&self.input);
                self.pending = Some(Pending {
                    question: question.clone(),
                    text: String::new(),
                    lines: Vec::new(),
                    asked_at: now,
                    first_token_at: None,
                    pieces: 0,
                    expanded: Vec::new(),
                });
                self.chat_scroll = 0;
                vec![Effect::Ask {
                    question,
                    history: self.history(),
                }]
            }
            _ => {
                self.input.input(key);
                Vec::new()
            }
        }
    }

    fn pane_key(&mut self, focus: Focus, key: KeyEvent) -> Vec<Effect> {
        let page = self.page() as isize;
        let step: Option<isize> = match key.code {
            KeyCode::Up | KeyCode::Char('k') => Some(-1),
            KeyCode::Down | KeyCode::Char('j') => Some(1),
            KeyCode::PageUp => Some(-page),
            KeyCode::PageDown => Some(page),
            KeyCode::Home | KeyCode::Char('g') => Some(isize::MIN / 2),
            KeyCode::End | KeyCode::Char('G') => Some(isize::MAX / 2),
            _ => None,
        };
        if let Some(step) = step {
            match focus {
                // Chat offsets count up from the bottom, so "down" lowers them.
                Focus::Chat => self.scroll_chat(-step),
                Focus::Tree => self.move_tree(step),
                Focus::Sources => {
                    self.sources_scroll = self.sources_scroll.saturating_add_signed(step)
                }
                Focus::Input => {}
            }
            return Vec::new();
        }
        match key.code {
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char('y') => match self.turns.last() {
                Some(t) => return vec![Effect::Copy(t.answer.clone())],
                None => self.notice = Some("no answer to copy yet".into()),
            },
            KeyCode::Char('e') => return vec![Effect::Export],
            KeyCode::Char('n') => self.new_conversation(),
            KeyCode::Char('a') => {
                self.source_view = SourceView::Answer;
                self.sources_scroll = 0;
            }
            KeyCode::Enter | KeyCode::Char(' ') | KeyCode::Right | KeyCode::Char('l')
                if focus == Focus::Tree =>
            {
                self.toggle_tree(key.code != KeyCode::Right && key.code != KeyCode::Char('l'));
            }
            KeyCode::Left | KeyCode::Char('h') if focus == Focus::Tree => self.close_tree(),
            _ => {}
        }
        Vec::new()
    }

    /// The current conversation's turns, for the next question to follow.
    fn history(&self) -> Vec<Exchange> {
        self.turns
            .iter()
            .filter(|t| t.conversation == self.conversation && !t.answer.trim().is_empty())
            .map(|t| Exchange::new(t.question.clone(), t.answer.clone()))
            .collect()
    }

    /// Let the next question start a conversation of its own.
    fn new_conversation(&mut self) {
        self.notice = Some(if self.generating() {
            "an answer is still coming (Esc stops it)".into()
        } else if self
            .turns
            .last()
            .is_none_or(|t| t.conversation != self.conversation)
        {
            "the next question already starts a new conversation".into()
        } else {
            self.conversation += 1;
            "new conversation: the next question does not follow the earlier ones".into()
        });
    }

    /// Rows a page scroll moves: most of the chat pane's height.
    fn page(&self) -> usize {
        usize::from(self.size.1).saturating_sub(10).max(1)
    }

    fn scroll_chat(&mut self, up: isize) {
        self.chat_scroll = self.chat_scroll.saturating_add_signed(up);
    }

    fn move_tree(&mut self, step: isize) {
        if self.rows.is_empty() {
            return;
        }
        let last = self.rows.len() - 1;
        self.tree_sel = self.tree_sel.saturating_add_signed(step).min(last);
        self.select_current();
    }

    fn select_current(&mut self) {
        if let Some((n, _)) = self.rows.get(self.tree_sel) {
            self.source_view = SourceView::Node(*n);
            self.sources_scroll = 0;
        }
    }

    fn toggle_tree(&mut self, may_close: bool) {
        let Some(&(n, _)) = self.rows.get(self.tree_sel) else {
            return;
        };
        let has_children = self
            .tree
            .as_ref()
            .is_some_and(|t| !t.children[n].is_empty());
        if has_children && !self.open.insert(n) && may_close {
            self.open.remove(&n);
        }
        self.rebuild_rows();
        self.select_current();
    }

    fn close_tree(&mut self) {
        let Some(&(n, _)) = self.rows.get(self.tree_sel) else {
            return;
        };
        if !self.open.remove(&n) {
            // Already closed: go to the parent instead, as file trees do.
            let parent = self.tree.as_ref().and_then(|t| t.parent[n]);
            if let Some(row) = parent.and_then(|p| self.rows.iter().position(|(r, _)| *r == p)) {
                self.tree_sel = row;
            }
        }
        self.rebuild_rows();
        self.select_current();
    }
}

/// An empty input box with the old one's look.
fn fresh_input(old: &TextArea<'static>) -> TextArea<'static> {
    let mut t = TextArea::default();
    t.set_placeholder_text(old.placeholder_text());
    t.set_cursor_line_style(old.cursor_line_style());
    t
}

/// The nodes read word for word (α = 1) first, then the rest; best score first in each.
fn read_first(nodes: &[NodeView]) -> Vec<NodeView> {
    let mut sorted = nodes.to_vec();
    sorted.sort_by(|a, b| {
        (a.alpha > 1)
            .cmp(&(b.alpha > 1))
            .then(b.score.total_cmp(&a.score))
    });
    sorted
}
