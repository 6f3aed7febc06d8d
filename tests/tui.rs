//! The TUI: snapshot tests of each screen drawn from scripted session events (no model),
//! and one end-to-end run of the real binary in tmux with the real model on a real book.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use slm_chat::engine::session::{Done, Event, NodeView, Progress, Stage, Stats, TreeView};
use slm_chat::tui::app::{App, Focus, Msg};
use slm_chat::tui::ui;

use crate::util::{corpus, default_model, exe};

/// A small document: three chunks; chunk 1 has levels 0..=2 (1 + 2 + 4 nodes).
fn tree_view() -> TreeView {
    let paras = [
        "Mr. Jabez Wilson came to Baker Street with a story about red hair.",
        "The Red-headed League paid four pounds a week for copying the Encyclopaedia. Wilson copied articles on Abbots, Archery and Armour. Then one morning the door was locked and a card said the League was dissolved.",
        "Holmes sat smoking his pipe: it was quite a three-pipe problem.",
    ];
    let text: String = paras.join("\n\n");
    let mut nodes = Vec::new();
    let mut at = 0;
    for (c, p) in paras.iter().enumerate() {
        let start = at;
        let end = start + p.len();
        at = end + 2;
        let levels = if c == 1 { 3 } else { 1 };
        for level in 0..levels {
            let parts = 1usize << level;
            for index in 0..parts {
                let a = start + (end - start) * index / parts;
                let b = start + (end - start) * (index + 1) / parts;
                let (a, b) = (floor_char(&text, a), floor_char(&text, b));
                nodes.push(NodeView {
                    chunk: c,
                    level,
                    index,
                    alpha: 1 << (3 - level.min(3)),
                    score: 0.0,
                    tokens: (a / 4, b / 4),
                    chars: (a, b),
                    pages: (c as u32 + 1, c as u32 + 1 + u32::from(level == 0 && c == 1)),
                    preview: text[a..b].chars().take(40).collect(),
                    supports: None,
                });
            }
        }
    }
    TreeView {
        title: "league.txt".into(),
        text: Arc::from(text.as_str()),
        document_tokens: text.len() / 4,
        nodes,
        store_bytes: 1_234_567,
        document_key: "k".into(),
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn key(code: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

/// Feed messages at fixed times after `t0`, so drawn timings are the same on every run.
struct Script {
    app: App,
    t0: Instant,
    ms: u64,
}

impl Script {
    fn new() -> Script {
        let mut app = App::new("league.txt", "/tmp/slm-chat.log");
        app.update(Msg::Resize(80, 24), Instant::now());
        Script {
            app,
            t0: Instant::now(),
            ms: 0,
        }
    }

    fn at(&mut self, ms: u64, msg: Msg) {
        self.ms = ms;
        self.app.update(msg, self.t0 + Duration::from_millis(ms));
    }

    fn typed(&mut self, ms: u64, text: &str) {
        for c in text.chars() {
            self.at(ms, key(KeyCode::Char(c)));
        }
    }

    fn screen(&self, w: u16, h: u16) -> Terminal<TestBackend> {
        let mut t = Terminal::new(TestBackend::new(w, h)).expect("test terminal");
        let now = self.t0 + Duration::from_millis(self.ms);
        t.draw(|f| ui::draw(f, &self.app, now)).expect("draw");
        t
    }

    /// Ready, one question answered from chunk 1's level-1 and level-2 nodes.
    fn answered() -> Script {
        let mut s = Script::new();
        s.at(0, Msg::Engine(Event::Ready(tree_view())));
        s.at(
            1,
            Msg::Engine(Event::Stats(Stats {
                model: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
                device: "cpu".into(),
                rss_bytes: 345_000_000,
                ..Stats::default()
            })),
        );
        s.typed(10, "How much did the League pay?");
        s.at(20, key(KeyCode::Enter));
        let tree = tree_view();
        let chosen: Vec<NodeView> = tree
            .nodes
            .iter()
            .filter(|n| n.chunk == 1 && (n.level, n.index) != (0, 0) && n.index < 2)
            .map(|n| NodeView {
                score: 2.5 / (n.level + n.index + 1) as f32,
                ..n.clone()
            })
            .collect();
        s.at(900, Msg::Engine(Event::Expanded(chosen)));
        let answer = "The League paid **four pounds** a week for:\n\n- copying the *Encyclopaedia*\n- staying in the office\n\n```\n£4 / week\n```\n";
        for (i, piece) in answer.split_inclusive(' ').enumerate() {
            s.at(
                1000 + 20 * i as u64,
                Msg::Engine(Event::Token(piece.into())),
            );
        }
        s.at(
            1500,
            Msg::Engine(Event::Stats(Stats {
                model: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
                device: "cpu".into(),
                rss_bytes: 412_000_000,
                mapped_bytes: 1_234_567,
                injected_tokens: 1285,
                injected_bytes: 74_900_000,
                budget_tokens: 1536,
                first_token_ms: Some(980.0),
                prefill_tok_s: 1311.0,
                decode_tok_s: 48.5,
                decode_tokens: 24,
                ..Stats::default()
            })),
        );
        s.at(
            1501,
            Msg::Engine(Event::Done(Done {
                answer: answer.into(),
                stop: "end of turn".into(),
                supported: None,
            })),
        );
        s
    }
}

#[test]
fn tui_snapshot_ingest_progress() {
    let mut s = Script::new();
    let progress = |stage, done, total, message: &str| {
        Msg::Engine(Event::Progress(Progress {
            stage,
            done,
            total,
            tok_s: if total > 0 { 1843.0 } else { 0.0 },
            eta_secs: (total > 0).then_some(95.0),
            message: message.into(),
        }))
    };
    s.at(0, progress(Stage::Document, 0, 0, "reading league.txt"));
    s.at(10, progress(Stage::Model, 0, 0, "loading the model"));
    s.at(
        20,
        progress(Stage::Encode, 12, 40, "encoding chunk 13 of 40"),
    );
    insta::assert_snapshot!(s.screen(80, 24).backend());
}

#[test]
fn tui_snapshot_chat_with_a_finished_answer() {
    let s = Script::answered();
    insta::assert_snapshot!(s.screen(80, 24).backend());
}

/// An answer none of whose passages hold its key words is flagged under it; one that is
/// backed, or has nothing to check, is not.
#[test]
fn tui_flags_an_answer_its_passages_do_not_support() {
    let text = |s: &Script| s.screen(200, 40).backend().to_string();
    let backed = Script::answered();
    assert!(!text(&backed).contains(slm_chat::engine::trust::UNSUPPORTED));
    let mut s = Script::answered();
    s.typed(2000, "What is the capital of France?");
    s.at(2010, key(KeyCode::Enter));
    s.at(2100, Msg::Engine(Event::Token("Paris.".into())));
    s.at(
        2200,
        Msg::Engine(Event::Done(Done {
            answer: "Paris.".into(),
            stop: "end of answer".into(),
            supported: Some(false),
        })),
    );
    let screen = text(&s);
    assert!(
        screen.contains("not found in the passages read"),
        "{screen}"
    );
    assert_eq!(s.app.turns[1].supported, Some(false), "kept in the history");
}

#[test]
fn tui_snapshot_tree_with_expanded_nodes() {
    let mut s = Script::answered();
    s.at(2000, key(KeyCode::Tab));
    s.at(2000, key(KeyCode::Tab));
    assert_eq!(s.app.focus, Focus::Tree);
    // Down selects the next node and shows its text in the sources pane.
    s.at(2001, key(KeyCode::Down));
    insta::assert_snapshot!(s.screen(100, 28).backend());
}

#[test]
fn tui_snapshot_help_overlay() {
    let mut s = Script::answered();
    s.at(2000, key(KeyCode::Tab));
    s.at(2000, key(KeyCode::Char('?')));
    insta::assert_snapshot!(s.screen(80, 24).backend());
    s.at(2001, key(KeyCode::Esc));
    assert!(!s.app.help, "any key closes the help");
}

#[test]
fn tui_snapshot_error_screen() {
    let mut s = Script::new();
    s.at(
        0,
        Msg::Engine(Event::Error(
            "scan.pdf: no extractable text on any page (scanned?)".into(),
        )),
    );
    insta::assert_snapshot!(s.screen(80, 24).backend());
}

#[test]
fn tui_draws_at_every_small_size_and_resizes_without_panicking() {
    let mut s = Script::answered();
    s.at(2000, key(KeyCode::Tab));
    s.at(2000, key(KeyCode::PageUp));
    for (w, h) in [
        (1, 1),
        (0, 0),
        (10, 3),
        (39, 11),
        (40, 12),
        (41, 13),
        (80, 24),
        (200, 60),
    ] {
        s.at(2001, Msg::Resize(w, h));
        s.app.help = w % 2 == 0;
        let _ = s.screen(w, h);
    }
    let mut p = Script::new();
    for (w, h) in [(1, 1), (40, 12), (50, 14)] {
        let _ = p.screen(w, h);
        p.at(1, Msg::Engine(Event::Error("x".repeat(500))));
        let _ = p.screen(w, h);
    }
}

#[test]
fn tui_esc_stops_the_answer_and_enter_waits_for_it() {
    use slm_chat::tui::app::Effect;
    let mut s = Script::new();
    s.at(0, Msg::Engine(Event::Ready(tree_view())));
    s.typed(1, "q1");
    let t = s.t0 + Duration::from_millis(2);
    assert_eq!(
        s.app.update(key(KeyCode::Enter), t),
        vec![Effect::Ask {
            question: "q1".into(),
            history: Vec::new()
        }]
    );
    s.typed(3, "q2");
    assert!(
        s.app.update(key(KeyCode::Enter), t).is_empty(),
        "one answer at a time"
    );
    assert_eq!(s.app.update(key(KeyCode::Esc), t), vec![Effect::Stop]);
    let done = Msg::Engine(Event::Done(Done {
        answer: "partial".into(),
        stop: "stopped".into(),
        supported: None,
    }));
    assert_eq!(s.app.update(done, t), vec![Effect::SaveHistory]);
    assert!(!s.app.quit, "Esc stops the answer, not the app");
    assert_eq!(s.app.turns[0].stop, "stopped");
}

#[test]
fn tui_follow_ups_carry_the_conversation_until_n_starts_a_new_one() {
    use slm_chat::engine::Exchange;
    use slm_chat::tui::app::Effect;
    let mut s = Script::new();
    s.at(0, Msg::Engine(Event::Ready(tree_view())));
    let t = s.t0 + Duration::from_millis(2);
    let done = |answer: &str| {
        Msg::Engine(Event::Done(Done {
            answer: answer.into(),
            stop: "end of turn".into(),
            supported: None,
        }))
    };
    let ask = |s: &mut Script, q: &str| {
        s.typed(1, q);
        s.app.update(key(KeyCode::Enter), t)
    };
    let first = ask(&mut s, "Who wrote the letter?");
    assert_eq!(
        first,
        vec![Effect::Ask {
            question: "Who wrote the letter?".into(),
            history: Vec::new()
        }]
    );
    s.app.update(done("Jabez Wilson."), t);
    let second = ask(&mut s, "What did he want?");
    assert_eq!(
        second,
        vec![Effect::Ask {
            question: "What did he want?".into(),
            history: vec![Exchange::new("Who wrote the letter?", "Jabez Wilson.")]
        }]
    );
    s.app.update(done("A job."), t);
    // `n` from a pane (in the question box it is a letter), Ctrl-N anywhere.
    s.app.update(key(KeyCode::Tab), t);
    s.app.update(key(KeyCode::Char('n')), t);
    assert!(s
        .app
        .notice
        .as_deref()
        .is_some_and(|n| n.contains("new conversation")));
    s.app.update(key(KeyCode::BackTab), t);
    let third = ask(&mut s, "Who is Holmes?");
    assert_eq!(
        third,
        vec![Effect::Ask {
            question: "Who is Holmes?".into(),
            history: Vec::new()
        }]
    );
    s.app.update(done("A detective."), t);
    let groups: Vec<u32> = s.app.turns.iter().map(|t| t.conversation).collect();
    assert_eq!(groups, vec![0, 0, 1]);
    let screen = s.screen(100, 40).backend().to_string();
    assert!(screen.contains("── new conversation ──"), "{screen}");
    let ctrl_n = KeyEvent::new(KeyCode::Char('n'), KeyModifiers::CONTROL);
    s.app.update(Msg::Key(ctrl_n), t);
    assert_eq!(s.app.conversation, 2);
    s.app.update(Msg::Key(ctrl_n), t);
    assert_eq!(
        s.app.conversation, 2,
        "an empty conversation is not left behind"
    );
}

/// A tmux session running the real binary; killed when dropped.
struct Tmux {
    name: String,
}

impl Tmux {
    fn run(args: &[&str]) -> String {
        let o = Command::new("tmux").args(args).output().expect("run tmux");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn capture(&self) -> String {
        Tmux::run(&["capture-pane", "-p", "-t", &self.name])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.name];
        args.extend_from_slice(keys);
        Tmux::run(&args);
    }

    /// Wait until the screen satisfies `ok`; panics with the screen after `secs`.
    fn wait(&self, what: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let screen = self.capture();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < end,
                "waited {secs} s for {what}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        Tmux::run(&["kill-session", "-t", &self.name]);
    }
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The real app in tmux: start, wait for ready, ask, see the answer, the marked tree with
/// pages and the rates, open the help, quit, and find the terminal back in cooked mode.
#[test]
fn tui_end_to_end_in_tmux_with_the_real_model() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED tui_end_to_end_in_tmux_with_the_real_model: tmux is not installed (apt-get install tmux)");
        return;
    }
    let model = default_model();
    let data = tempfile::tempdir().expect("temp dir");
    // The first two adventures of the real book (~24K tokens): the app reads them into a
    // tree on first open, which is part of what this test watches.
    let text = std::fs::read_to_string(corpus("books/sherlock_holmes.txt")).expect("book");
    let end = text
        .find("ADVENTURE III.")
        .expect("the third adventure's title");
    let book = data.path().join("sherlock_1-2.txt");
    std::fs::write(&book, &text[..end]).expect("write the book");
    let tmux = Tmux {
        name: format!("slm-chat-e2e-{}", std::process::id()),
    };
    // After the app exits the shell reports its exit code and whether the terminal is in
    // canonical mode again (raw mode left on would print -icanon).
    let script = format!(
        "env XDG_DATA_HOME={} SLM_CHAT_PATHS_CACHE_DIR={} SLM_CHAT_GENERATE_MAX_TOKENS=48 {} --model {} {}; echo SLM_CHAT_EXIT=$?; stty -a | grep -o -- ' -*icanon'; sleep 120",
        quote(data.path()),
        quote(&data.path().join("cache")),
        quote(&exe()),
        quote(&model),
        quote(&book)
    );
    Tmux::run(&[
        "new-session",
        "-d",
        "-s",
        &tmux.name,
        "-x",
        "100",
        "-y",
        "30",
        "sh",
        "-c",
        &script,
    ]);

    let started = Instant::now();
    let progress = tmux.wait("the progress screen", 120, |s| {
        s.contains(" chunks") && s.contains("tokens/s · ETA")
    });
    assert!(
        progress.contains("cancel"),
        "the progress screen offers a cancel key:\n{progress}"
    );
    tmux.wait("the app to read the book and be ready", 600, |s| {
        s.contains("Tree · ") && s.contains("Ask a question")
    });
    eprintln!("ready after {:.1} s", started.elapsed().as_secs_f64());

    tmux.keys(&[
        "How many pounds a week did the Red-headed League pay?",
        "Enter",
    ]);
    let screen = tmux.wait("the answer to finish", 240, |s| {
        s.contains("prefill ") && s.contains(" — ")
    });
    assert!(
        screen.contains("pounds"),
        "the answer names the pay:\n{screen}"
    );
    let marked: Vec<&str> = screen.lines().filter(|l| l.contains("● L")).collect();
    assert!(
        !marked.is_empty(),
        "the tree marks expanded nodes:\n{screen}"
    );
    assert!(
        marked.iter().all(|l| l.contains(" p.")),
        "marked nodes show pages:\n{screen}"
    );
    let decode = screen
        .split("decode ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .expect("decode rate in the status bar");
    assert!(decode > 0.0, "decode {decode} tok/s:\n{screen}");
    let capture = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tui-e2e-capture.txt");
    std::fs::write(&capture, &screen).expect("write capture");
    eprintln!("screen saved to {}", capture.display());

    tmux.keys(&["Tab"]);
    tmux.keys(&["?"]);
    tmux.wait("the help overlay", 10, |s| {
        s.contains("Keys · any key closes") && s.contains("Ctrl-C")
    });
    tmux.keys(&["Escape"]);
    tmux.wait("the help to close", 10, |s| {
        !s.contains("Keys · any key closes")
    });
    tmux.keys(&["C-c"]);
    let after = tmux.wait("the app to exit", 20, |s| s.contains("SLM_CHAT_EXIT="));
    assert!(after.contains("SLM_CHAT_EXIT=0"), "clean exit:\n{after}");
    assert!(
        after.contains(" icanon") && !after.contains("-icanon"),
        "cooked mode again:\n{after}"
    );
    assert_eq!(
        Tmux::run(&["display", "-p", "-t", &tmux.name, "#{alternate_on}"]).trim(),
        "0",
        "the alternate screen is left"
    );
    let history = data.path().join("slm-chat/history");
    let saved = std::fs::read_dir(&history).map(|d| d.count()).unwrap_or(0);
    assert_eq!(saved, 1, "one history file in {}", history.display());
}

/// Without a terminal the app refuses in one line and points to `ask`; a missing file and
/// a missing FILE are one line too. Global flags before FILE still parse.
#[test]
fn tui_refuses_without_a_terminal_in_one_line() {
    let book = corpus("books/emma.txt");
    // Its own cache folder: a refusal must leave nothing in it (no tree begun).
    let cache = tempfile::tempdir().expect("tmp");
    let run = |args: &[&std::ffi::OsStr]| {
        let o = Command::new(exe())
            .args(args)
            .env("SLM_CHAT_PATHS_CACHE_DIR", cache.path())
            .output()
            .expect("run slm-chat");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--device".as_ref(), "cpu".as_ref(), book.as_os_str()]);
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not a terminal") && err.contains("slm-chat ask"),
        "{err}"
    );
    assert!(
        !cache.path().join("trees").exists(),
        "the refused app began a tree"
    );
    let (code, err) = run(&["/no/such/book.pdf".as_ref()]);
    assert_eq!(
        (code, err.trim()),
        (Some(2), "slm-chat: /no/such/book.pdf: no such file")
    );
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(err.starts_with("slm-chat: give a FILE"), "{err}");
}
