//! The terminal app: `slm-chat FILE`.
//!
//! One event loop ([`run`]) owns the terminal, the engine session and every file it
//! writes. Keys, engine events, a tick and SIGTERM all become [`app::Msg`]s; the
//! [`app::App`] turns them into state and [`app::Effect`]s; [`ui::draw`] paints the state.
//! The UI never sees the model: only the session's typed events.

pub mod app;
pub mod history;
pub mod markdown;
pub mod ui;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, DisableBracketedPaste, EnableBracketedPaste};
use ratatui::crossterm::terminal::{self, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::crossterm::{cursor, execute};
use ratatui::Terminal;
use sha2::Digest;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::config::Config;
use crate::engine::session::{self, Event, SessionOptions};
use app::{App, Effect, Msg};

/// What the TUI needs to start.
pub struct Options {
    pub file: PathBuf,
    pub config: Config,
    /// Where conversations are kept (the data dir's `history` when None).
    pub history_dir: Option<PathBuf>,
}

/// Redraws per second while nothing else happens (spinners, live rates, RSS).
const TICK: Duration = Duration::from_millis(250);
/// Events handled before a redraw, so a burst of tokens cannot starve the keyboard.
const BATCH: usize = 64;
/// How long quitting waits for the engine to finish what it is writing.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// Run the TUI on `opts.file` until the user quits.
pub fn run(opts: Options) -> Result<()> {
    // Document problems (unreadable, not a PDF, …) are shown inside the app; a path that
    // is not there at all is a typo better answered before the screen is taken over.
    if !opts.file.is_file() {
        anyhow::bail!("{}: no such file", opts.file.display());
    }
    if !std::io::stdout().is_terminal() {
        return Err(crate::cli::Exit {
            message: format!(
                "{}: standard output is not a terminal; for scripts use `slm-chat ask {} \"QUESTION\"`",
                opts.file.display(),
                opts.file.display()
            ),
            code: 2,
        }
        .into());
    }
    let log_path = opts.config.cache_dir().join("logs").join("slm-chat.log");
    let _log_guard = init_logging(&log_path)?;
    tracing::info!(file = %opts.file.display(), "starting the TUI");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start the event loop")?;
    let result = rt.block_on(event_loop(opts, &log_path));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}

fn init_logging(path: &Path) -> Result<tracing_appender::non_blocking::WorkerGuard> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open the log", path.display()))?;
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
        terminal::enable_raw_mode().context("cannot switch the terminal to raw mode")?;
        let guard = TerminalGuard;
        execute!(
            std::io::stdout(),
            EnterAlternateScreen,
            EnableBracketedPaste
        )
        .context("cannot set up the terminal")?;
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

async fn event_loop(opts: Options, log_path: &Path) -> Result<()> {
    let started = Instant::now();
    let title = opts.file.file_name().map_or_else(
        || opts.file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let history_dir = opts
        .history_dir
        .clone()
        .unwrap_or_else(history::default_dir);
    let file = opts.file.clone();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch for SIGHUP")?;

    install_panic_hook();
    let guard = TerminalGuard::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    terminal.clear()?;

    let session = session::start(SessionOptions {
        file: opts.file.clone(),
        config: opts.config.clone(),
    });
    let requests = session.requests.clone();
    let cancel = session.cancel.clone();
    let (tx, mut rx) = unbounded_channel::<Msg>();
    let (gone_tx, mut gone_rx) = tokio::sync::watch::channel(false);
    bridge_engine(session.events, tx.clone(), gone_tx);
    read_terminal(tx.clone());

    let mut app = App::new(title.clone(), log_path.display().to_string());
    let size = terminal.size()?;
    app.size = (size.width, size.height);
    let mut out = Outside {
        history_dir,
        file,
        title,
        key: None,
        clipboard: None,
    };
    let mut tick = tokio::time::interval(TICK);
    let mut frames = FrameTimes::default();
    loop {
        let t = Instant::now();
        terminal.draw(|f| ui::draw(f, &app, t))?;
        frames.add(t.elapsed());
        let msg = tokio::select! {
            biased;
            _ = sigterm.recv() => Msg::Quit,
            _ = sighup.recv() => Msg::Quit,
            Some(m) = rx.recv() => m,
            _ = tick.tick() => {
                if let Some(rss) = crate::sys::rss_bytes() {
                    let _ = tx.send(Msg::Rss(rss));
                }
                Msg::Tick
            }
        };
        let mut next = Some(msg);
        let mut handled = 0;
        while let Some(msg) = next.take() {
            if let Msg::Engine(Event::Ready(view)) = &msg {
                tracing::info!(
                    secs = started.elapsed().as_secs_f64(),
                    nodes = view.nodes.len(),
                    "ready"
                );
                let key = out.document_key(&view.document_key);
                match history::load(&out.history_dir, &key) {
                    Ok(turns) => {
                        let _ = tx.send(Msg::History(turns));
                    }
                    Err(e) => {
                        let _ = tx.send(Msg::Notice(format!("history not loaded: {e}")));
                    }
                }
                out.key = Some(key);
            }
            for effect in app.update(msg, Instant::now()) {
                match effect {
                    Effect::Ask(q) => {
                        tracing::info!(question = %q, "ask");
                        if requests.send(session::Request::Ask(q)).is_err() {
                            app.update(Msg::EngineGone, Instant::now());
                        }
                    }
                    Effect::Stop => cancel.store(true, Ordering::SeqCst),
                    Effect::Quit => {}
                    other => {
                        if let Some(n) = out.carry_out(other, &app) {
                            app.update(Msg::Notice(n), Instant::now());
                        }
                    }
                }
            }
            handled += 1;
            if handled < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if app.quit {
            break;
        }
    }
    drop(terminal);
    drop(guard);
    tracing::info!(
        frames = frames.count,
        mean_us = frames.mean_us(),
        max_us = frames.max.as_micros() as u64,
        "frame render times"
    );
    // Stop what the engine is doing (an answer, or building the tree: it keeps the
    // chunks finished so far) and give it a moment to close its files.
    cancel.store(true, Ordering::SeqCst);
    let _ = requests.send(session::Request::Quit);
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

/// The side of the app that touches the world: files and the clipboard.
struct Outside {
    history_dir: PathBuf,
    file: PathBuf,
    title: String,
    key: Option<String>,
    /// Kept alive: on X11 the copied text lives only as long as its owner.
    clipboard: Option<arboard::Clipboard>,
}

impl Outside {
    /// The engine's key for the document, or a hash of the file's bytes.
    fn document_key(&self, engine_key: &str) -> String {
        if !engine_key.is_empty() {
            return engine_key.to_string();
        }
        match std::fs::read(&self.file) {
            Ok(bytes) => {
                let digest = sha2::Sha256::digest(&bytes);
                digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
            }
            // Unreadable now (it was readable a moment ago): key by name instead.
            Err(_) => self.title.clone(),
        }
    }

    /// Do one effect; returns a line for the status bar.
    fn carry_out(&mut self, effect: Effect, app: &App) -> Option<String> {
        match effect {
            Effect::SaveHistory => {
                let key = self.key.as_deref()?;
                match history::save(&self.history_dir, key, &self.title, &app.turns) {
                    Ok(_) => None,
                    Err(e) => Some(format!("history not saved: {e}")),
                }
            }
            Effect::Export => {
                let key = self.key.as_deref()?;
                Some(
                    match history::export(&self.history_dir, key, &self.title, &app.turns) {
                        Ok(p) => format!("exported to {}", p.display()),
                        Err(e) => format!("export failed: {e}"),
                    },
                )
            }
            Effect::Copy(text) => Some(self.copy(&text)),
            Effect::Ask(_) | Effect::Stop | Effect::Quit => None,
        }
    }

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
