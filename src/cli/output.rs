//! What the commands share: loading the model and documents, opening trees with a progress
//! bar, and turning engine errors into one line with the right exit code.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use super::Exit;
use slm_chat::document::{self, LoadOptions};
use slm_chat::engine::ingest::IngestSettings;
use slm_chat::engine::session::Progress;
use slm_chat::engine::{self, EngineError};
use slm_chat::model::{Llm, ModelChoice};
use slm_chat::store;

/// A line for the user on stderr.
pub fn say(message: &str) {
    eprintln!("slm-chat: {message}");
}

pub fn load_model(model: &ModelChoice) -> Result<Llm> {
    Ok(model.load(&mut say)?)
}

/// Load a document; `all_notes` prints every note (for `extract`), otherwise only the
/// warning that matters when asking: pages that could not be read.
pub fn load_document(
    file: &Path,
    load: &LoadOptions,
    all_notes: bool,
) -> Result<document::Document> {
    let doc = document::load(file, load).map_err(|e| Exit {
        message: e.to_string(),
        code: e.exit_code(),
    })?;
    if all_notes || !doc.failed_pages.is_empty() {
        for note in &doc.notes {
            say(&format!("{}: {note}", file.display()));
        }
    }
    Ok(doc)
}

/// The document's own loader words a missing or unreadable file (and picks its exit code):
/// run it for the message before anything slow starts.
pub fn check_file(file: &Path, load: &LoadOptions) -> Result<()> {
    if !file.is_file() {
        load_document(file, load, false)?;
    }
    Ok(())
}

/// A document error with its own exit code, or any other engine error with the file named.
pub fn engine_error(file: &Path, e: EngineError) -> anyhow::Error {
    match e {
        // A document error names the file itself.
        EngineError::Document(d) => anyhow::Error::new(Exit {
            message: d.to_string(),
            code: d.exit_code(),
        }),
        e => anyhow::Error::new(e).context(file.display().to_string()),
    }
}

/// Open (building if needed) the tree of `file`, with progress on stderr.
pub fn open_tree(llm: &Llm, settings: &IngestSettings, file: &Path) -> Result<store::Tree> {
    let cancel = AtomicBool::new(false);
    let bar = progress_bar(file);
    let mut show = |p: &Progress| show_progress(&bar, p);
    let result = engine::ingest::open_or_build(llm, file, settings, false, &mut show, &cancel);
    bar.finish_and_clear();
    let (tree, report) = result.map_err(|e| engine_error(file, e))?;
    if let Some(why) = &report.rebuilt {
        say(&format!("{why}; rebuilt it"));
    }
    if report.built {
        say(&format!(
            "read {} tokens into {} chunks in {:.1} s ({:.0} tok/s); stored at {}",
            report.tokens,
            report.chunks,
            report.seconds,
            report.tok_s,
            report.path.display()
        ));
    }
    Ok(tree)
}

pub fn progress_bar(file: &Path) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} chunks · {msg}")
        .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar.set_prefix(
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    bar
}

/// Progress on the bar, or one line per tenth of the work when stderr is not a terminal.
pub fn show_progress(bar: &ProgressBar, p: &Progress) {
    if bar.is_hidden() {
        let step = (p.total / 10).max(1);
        if p.total == 0 || p.done.is_multiple_of(step) || p.done == p.total {
            if p.total == 0 {
                say(&p.message);
            } else {
                say(&format!(
                    "{} · {:.0} tok/s · ETA {:.0} s",
                    p.message,
                    p.tok_s,
                    p.eta_secs.unwrap_or(0.0)
                ));
            }
        }
        return;
    }
    if p.total == 0 {
        bar.set_message(p.message.clone());
        return;
    }
    bar.set_length(p.total as u64);
    bar.set_position(p.done as u64);
    bar.set_message(format!(
        "{:.0} tok/s · ETA {:.0} s",
        p.tok_s,
        p.eta_secs.unwrap_or(0.0)
    ));
}

/// Streams answer pieces to stdout, keeping the first write error to report once the
/// answer is done (a full disk must not exit 0 with the answer cut short).
pub struct Stream<'a> {
    out: std::io::StdoutLock<'a>,
    error: Option<std::io::Error>,
}

impl Stream<'_> {
    pub fn new() -> Self {
        Self {
            out: std::io::stdout().lock(),
            error: None,
        }
    }

    pub fn piece(&mut self, piece: &str) {
        if self.error.is_none() {
            if let Err(e) = self
                .out
                .write_all(piece.as_bytes())
                .and_then(|_| self.out.flush())
            {
                self.error = Some(e);
            }
        }
    }

    /// Write `text` after what was streamed, and report the first failure of either.
    pub fn finish(mut self, text: &str) -> std::io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }
}

/// `slm-chat extract`: the document's text with page markers, or as JSON.
pub fn extract(file: &Path, load: &LoadOptions, json: bool) -> Result<ExitCode> {
    let doc = load_document(file, load, true)?;
    let text = if json {
        serde_json::to_string_pretty(&doc)? + "\n"
    } else {
        document::render_with_page_markers(&doc)
    };
    // A closed pipe (`| head`) ends with exit 0 (main); any other failure is reported.
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(ExitCode::from(doc.exit_code()))
}
