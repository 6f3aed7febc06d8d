//! The terminal app: `slm-chat FILE`.
//!
//! One event loop ([`run`]) owns the terminal and the engine session it is given. Keys,
//! engine events, a tick and SIGTERM all become [`app::Msg`]s; the [`app::App`] turns them
//! into state and [`app::Effect`]s; [`ui::draw`] paints the state. Disk work (the saved
//! conversation) runs on its own thread ([`files`]). The UI never sees the model: only the
//! session's typed events.

pub mod app;
mod files;
pub mod history;
pub mod markdown;
pub mod ui;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, DisableBracketedPaste, EnableBracketedPaste};
use ratatui::crossterm::terminal::{self, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::crossterm::{cursor, execute};
use ratatui::Terminal;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::engine::session::{self, Event, Session};
use app::{App, Effect, Msg};
use files::Files;

/// What the TUI needs to start, besides the session answering its questions.
pub struct Options {
    pub file: PathBuf,
    /// Where the TUI's log goes.
    pub log_path: PathBuf,
    /// Where conversations are kept (the data dir's `history` when None).
    pub history_dir: Option<PathBuf>,
}

/// Why the TUI could not run.
#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error("{0}: no such file")]
    NoSuchFile(PathBuf),
    #[error("{file}: standard output is not a terminal; for scripts use `slm-chat ask {file} \"QUESTION\"`")]
    NotATerminal { file: String },
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
}

type Result<T> = std::result::Result<T, TuiError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TuiError {
    let what = what.into();
    move |error| TuiError::Io { what, error }
}

/// Redraws per second while nothing else happens (spinners, live rates, RSS).
const TICK: Duration = Duration::from_millis(250);
/// Events handled before a redraw, so a burst of tokens cannot starve the keyboard.
const BATCH: usize = 64;
/// How long quitting waits for the engine to finish what it is writing.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// Run the TUI on `opts.file` until the user quits, asking the session `start` gives. It is
/// started only once the file and the terminal are known to be there, so a refusal leaves
/// no work behind (no half-built tree).
pub fn run(opts: Options, start: impl FnOnce() -> Session) -> Result<()> {
    // Document problems (unreadable, not a PDF, …) are shown inside the app; a path that
    // is not there at all is a typo better answered before the screen is taken over.
    if !opts.file.is_file() {
        return Err(TuiError::NoSuchFile(opts.file.clone()));
    }
    if !std::io::stdout().is_terminal() {
        return Err(TuiError::NotATerminal {
            file: opts.file.display().to_string(),
        });
    }
    let session = start();
    let _log_guard = init_logging(&opts.log_path)?;
    tracing::info!(file = %opts.file.display(), "starting the TUI");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(io("cannot start the event loop"))?;
    let result = rt.block_on(event_loop(opts, session));
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    result
}

fn init_logging(path: &Path) -> Result<tracing_appender::non_blocking::WorkerGuard> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(format!("{}: cannot create", dir.display())))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(format!("{}: cannot open the log", path.display())))?;
    let (writer, guard) = tracing_appender::non_blocking(file);
    // A second TUI in the same process (tests) keeps the first subscriber; that is fine.
    let _ = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .try_init();
    Ok(guard)
}

/// The terminal in raw mode on the alternate screen; dropping it puts everything back.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> Result<TerminalGuard> {
        terminal::enable_raw_mode().map_err(io("cannot switch the terminal to raw mode"))?;
        let guard = TerminalGuard;
        execute!(
            std::io::stdout(),
            EnterAlternateScreen,
            EnableBracketedPaste
        )
        .map_err(io("cannot set up the terminal"))?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Leave the alternate screen and raw mode; failures are logged, since there is nothing
/// better to do with them while shutting down.
fn restore_terminal() {
    let mut out = std::io::stdout();
    if let Err(e) = execute!(
        out,
        DisableBracketedPaste,
        LeaveAlternateScreen,
        cursor::Show
    ) {
        tracing::warn!("restoring the screen: {e}");
    }
    if let Err(e) = terminal::disable_raw_mode() {
        tracing::warn!("leaving raw mode: {e}");
    }
    let _ = out.flush();
}

/// Restore the terminal before a panic on the UI thread is reported, so the report is
/// readable and the shell usable. Panics on other threads (the engine) are only logged:
/// the UI is still running and shows that the engine stopped.
fn install_panic_hook() {
    let ui_thread = std::thread::current().id();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("panic: {info}");
        if std::thread::current().id() == ui_thread {
            restore_terminal();
            previous(info);
        }
    }));
}

fn open_terminal() -> Result<Terminal<CrosstermBackend<std::io::Stdout>>> {
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))
        .map_err(io("cannot draw on the terminal"))?;
    terminal.clear().map_err(io("cannot clear the terminal"))?;
    Ok(terminal)
}

/// The loop's channels: messages in, and the engine's end.
struct Inbox {
    tx: UnboundedSender<Msg>,
    rx: UnboundedReceiver<Msg>,
    sigterm: tokio::signal::unix::Signal,
    sighup: tokio::signal::unix::Signal,
    tick: tokio::time::Interval,
}

impl Inbox {
    /// The next message: a signal first, then whatever arrived, else the tick.
    async fn next(&mut self) -> Msg {
        tokio::select! {
            biased;
            _ = self.sigterm.recv() => Msg::Quit,
            _ = self.sighup.recv() => Msg::Quit,
            Some(m) = self.rx.recv() => m,
            _ = self.tick.tick() => {
                if let Some(rss) = crate::sys::rss_bytes() {
                    let _ = self.tx.send(Msg::Rss(rss));
                }
                Msg::Tick
            }
        }
    }
}

/// The app and what it drives: the engine's requests, the history thread, the clipboard.
struct Driver {
    app: App,
    requests: std::sync::mpsc::Sender<session::Request>,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    files: Files,
    clipboard: Clipboard,
    started: Instant,
}

impl Driver {
    /// One message through the app, and the effects it asks for carried out.
    fn handle(&mut self, msg: Msg) {
        if let Msg::Engine(Event::Ready(view)) = &msg {
            tracing::info!(
                secs = self.started.elapsed().as_secs_f64(),
                nodes = view.nodes.len(),
                "ready"
            );
            self.files.load(&view.document_key);
        }
        for effect in self.app.update(msg, Instant::now()) {
            if let Some(m) = self.carry_out(effect) {
                self.app.update(m, Instant::now());
            }
        }
    }

    /// Do one effect; returns what the app should hear back at once.
    fn carry_out(&mut self, effect: Effect) -> Option<Msg> {
        match effect {
            Effect::Ask { question, history } => {
                tracing::info!(question = %question, follows = history.len(), "ask");
                let sent = self
                    .requests
                    .send(session::Request::Ask { question, history })
                    .is_ok();
                (!sent).then_some(Msg::EngineGone)
            }
            Effect::Stop => {
                self.cancel.store(true, Ordering::SeqCst);
                None
            }
            Effect::SaveHistory => {
                self.files.save(&self.app.turns);
                None
            }
            Effect::Export => {
                self.files.export(&self.app.turns);
                None
            }
            Effect::Copy(text) => Some(Msg::Notice(self.clipboard.copy(&text))),
            Effect::Quit => None,
        }
    }
}

async fn event_loop(opts: Options, session: Session) -> Result<()> {
    let started = Instant::now();
    let title = opts.file.file_name().map_or_else(
        || opts.file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let signal = |kind| tokio::signal::unix::signal(kind).map_err(io("cannot watch for signals"));
    let (tx, rx) = unbounded_channel::<Msg>();
    let mut inbox = Inbox {
        tx: tx.clone(),
        rx,
        sigterm: signal(tokio::signal::unix::SignalKind::terminate())?,
        sighup: signal(tokio::signal::unix::SignalKind::hangup())?,
        tick: tokio::time::interval(TICK),
    };
    install_panic_hook();
    let guard = TerminalGuard::enter()?;
    let mut terminal = open_terminal()?;

    let Session {
        requests,
        events,
        cancel,
        ..
    } = session;
    let (gone_tx, mut gone_rx) = tokio::sync::watch::channel(false);
    bridge_engine(events, tx.clone(), gone_tx);
    read_terminal(tx.clone());

    let mut app = App::new(title.clone(), opts.log_path.display().to_string());
    let size = terminal
        .size()
        .map_err(io("cannot read the terminal's size"))?;
    app.size = (size.width, size.height);
    let history_dir = opts.history_dir.unwrap_or_else(history::default_dir);
    let mut d = Driver {
        app,
        requests,
        cancel,
        files: Files::start(history_dir, opts.file, title, tx.clone()),
        clipboard: Clipboard::default(),
        started,
    };
    let mut frames = FrameTimes::default();
    while !d.app.quit {
        let t = Instant::now();
        terminal
            .draw(|f| ui::draw(f, &d.app, t))
            .map_err(io("cannot draw on the terminal"))?;
        frames.add(t.elapsed());
        d.handle(inbox.next().await);
        // More of what arrived meanwhile before the next redraw, up to a batch.
        for _ in 1..BATCH {
            match inbox.rx.try_recv() {
                Ok(msg) => d.handle(msg),
                Err(_) => break,
            }
        }
    }
    drop(terminal);
    drop(guard);
    frames.log();
    // Stop what the engine is doing (an answer, or building the tree: it keeps the
    // chunks finished so far) and give it a moment to close its files.
    d.cancel.store(true, Ordering::SeqCst);
    let _ = d.requests.send(session::Request::Quit);
    d.files.close();
    let _ = tokio::time::timeout(SHUTDOWN_WAIT, gone_rx.wait_for(|g| *g)).await;
    Ok(())
}

#[derive(Default)]
struct FrameTimes {
    count: u64,
    total: Duration,
    max: Duration,
}

impl FrameTimes {
    fn log(&self) {
        tracing::info!(
            frames = self.count,
            mean_us = self.mean_us(),
            max_us = self.max.as_micros() as u64,
            "frame render times"
        );
    }

    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.total += d;
        self.max = self.max.max(d);
    }

    fn mean_us(&self) -> u64 {
        (self.total.as_micros() as u64)
            .checked_div(self.count)
            .unwrap_or(0)
    }
}

/// Forward the session's events into the loop; when the engine ends, say so.
fn bridge_engine(
    events: std::sync::mpsc::Receiver<Event>,
    tx: UnboundedSender<Msg>,
    gone: tokio::sync::watch::Sender<bool>,
) {
    std::thread::spawn(move || {
        while let Ok(e) = events.recv() {
            if tx.send(Msg::Engine(e)).is_err() {
                break;
            }
        }
        let _ = tx.send(Msg::EngineGone);
        let _ = gone.send(true);
    });
}

/// Read keys, pastes and resizes on a thread (crossterm's reader blocks); it stops when
/// the loop has gone.
fn read_terminal(tx: UnboundedSender<Msg>) {
    std::thread::spawn(move || {
        while !tx.is_closed() {
            match event::poll(Duration::from_millis(100)) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!("terminal input: {e}");
                    break;
                }
            }
            let msg = match event::read() {
                Ok(event::Event::Key(k)) => Msg::Key(k),
                Ok(event::Event::Paste(p)) => Msg::Paste(p),
                Ok(event::Event::Resize(w, h)) => Msg::Resize(w, h),
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!("terminal input: {e}");
                    break;
                }
            };
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
}

/// The system clipboard, opened on first use.
#[derive(Default)]
struct Clipboard {
    /// Kept alive: on X11 the copied text lives only as long as its owner.
    clipboard: Option<arboard::Clipboard>,
}

impl Clipboard {
    fn copy(&mut self, text: &str) -> String {
        // Over SSH the local clipboard is the wrong one: the terminal's (OSC 52) is right.
        let ssh =
            std::env::var_os("SSH_CONNECTION").is_some() || std::env::var_os("SSH_TTY").is_some();
        if !ssh {
            if self.clipboard.is_none() {
                self.clipboard = arboard::Clipboard::new().ok();
            }
            if let Some(cb) = &mut self.clipboard {
                if cb.set_text(text.to_string()).is_ok() {
                    return "copied the last answer".into();
                }
            }
        }
        let mut out = std::io::stdout();
        match write!(out, "\x1b]52;c;{}\x07", base64(text.as_bytes())).and_then(|_| out.flush()) {
            Ok(()) => "copied the last answer (OSC 52: the terminal must allow it)".into(),
            Err(e) => format!("copy failed: {e}"),
        }
    }
}

/// Standard base64 (RFC 4648), for OSC 52.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                s.push(char::from(ABC[(n >> shift & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(plain.as_bytes()), enc);
        }
    }
}
