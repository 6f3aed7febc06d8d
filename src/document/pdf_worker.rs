//! The PDF worker: the code that runs inside the hidden `__pdf-worker` subprocess. It caps
//! its own memory, loads the PDF once and extracts page by page (pdf-extract and
//! lopdf 0.47, each under `catch_unwind`, the better text wins), and streams one JSON line per page on
//! stdout so the parent keeps every page received even if this process aborts (a stack
//! overflow, an allocation failure under the cap) or is killed on timeout. Panic messages are
//! recorded, never printed. Also defines the line protocol the parent reads.

use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::thread;

use serde::{Deserialize, Serialize};

use super::normalize::visible_chars;

/// Stack for the extraction thread: deep content streams recurse (upstream pdf-extract #128
/// overflows the default 8 MB), and a bigger stack makes that rarer. It is address space
/// only until touched.
const WORKER_STACK_BYTES: usize = 256 << 20;

/// lopdf's text replaces pdf-extract's for a page when it has 1.5 times as many visible
/// characters plus this margin, so a few stray glyphs never swap a good page for lopdf's
/// rougher text (it drops ligatures and spaces, pdf-probe.md).
const FALLBACK_MARGIN_CHARS: usize = 20;

/// Arguments of the hidden `__pdf-worker` subcommand; the parent builds the same command line
/// with [`PdfWorkerArgs::to_args`], so the binary only has to embed this struct.
#[derive(Debug, Clone, clap::Args)]
pub struct PdfWorkerArgs {
    /// The PDF to read.
    pub path: PathBuf,
    /// First page to extract (1-based); the parent restarts a crashed worker after the page
    /// that killed it.
    #[arg(long, default_value_t = 1)]
    pub first_page: u32,
    /// Address-space cap in bytes (RLIMIT_AS); 0 means none.
    #[arg(long, default_value_t = 0)]
    pub memory_cap: u64,
}

impl PdfWorkerArgs {
    /// The command line after the executable: `__pdf-worker PATH --first-page N --memory-cap B`.
    pub(crate) fn to_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "__pdf-worker".into(),
            self.path.clone().into_os_string(),
            "--first-page".into(),
            self.first_page.to_string().into(),
            "--memory-cap".into(),
            self.memory_cap.to_string().into(),
        ]
    }
}

/// One line of the worker's stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum WorkerEvent {
    /// The file opened; `pages` is the physical page count.
    Open {
        pages: u32,
        encrypted: bool,
        title: Option<String>,
        notes: Vec<String>,
    },
    Page {
        number: u32,
        text: String,
        extractor: String,
        failed: bool,
        warnings: Vec<String>,
    },
    /// The file could not be opened at all.
    Failed {
        kind: FailureKind,
        detail: String,
    },
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FailureKind {
    Unreadable,
    Damaged,
    PasswordRequired,
}

/// The last panic message, recorded by the hook instead of being printed.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn record_panic(info: &panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    let location = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    if let Ok(mut last) = LAST_PANIC.lock() {
        *last = Some(format!("{message}{location}"));
    }
}

fn take_panic() -> String {
    LAST_PANIC
        .lock()
        .ok()
        .and_then(|mut last| last.take())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic into `Err(message)`.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| take_panic())
}

/// Entry point of the hidden `__pdf-worker` subcommand: extracts `args.path` and writes
/// [`WorkerEvent`] JSON lines to stdout. Exit 0 when it got to the end, 1 otherwise (the
/// parent reads the events, not the code).
pub fn run_pdf_worker(args: &PdfWorkerArgs) -> ExitCode {
    panic::set_hook(Box::new(record_panic));
    let notes = limit_resources(args.memory_cap);
    let args = args.clone();
    let worker = thread::Builder::new()
        .name("pdf-worker".into())
        .stack_size(WORKER_STACK_BYTES)
        .spawn(move || extract(&args, notes));
    match worker.map(|handle| handle.join()) {
        Ok(Ok(Ok(()))) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// No core files from a crash, and the address-space cap; returns notes for what failed.
fn limit_resources(memory_cap: u64) -> Vec<String> {
    let mut notes = Vec::new();
    // A crash here is expected on hostile files; a core dump would only fill the disk.
    let _ = rlimit::Resource::CORE.set(0, 0);
    if memory_cap > 0 {
        if let Err(err) = rlimit::Resource::AS.set(memory_cap, memory_cap) {
            notes.push(format!("memory cap not applied: {err}"));
        }
    }
    notes
}

/// Writes events as JSON lines, flushing each so a later crash loses nothing already sent.
struct EventWriter<W: Write>(W);

impl<W: Write> EventWriter<W> {
    fn send(&mut self, event: &WorkerEvent) -> io::Result<()> {
        serde_json::to_writer(&mut self.0, event).map_err(io::Error::other)?;
        self.0.write_all(b"\n")?;
        self.0.flush()
    }
}

/// The document as pdf-extract (with its lopdf 0.42) opened it; `None` when it could not, and
/// lopdf 0.47 alone reads the file (its parser opens some files 0.42 cannot).
type Primary = Option<pdf_extract::Document>;

/// The document's `/Info /Title`; a macro because pdf-extract's lopdf 0.42 and lopdf 0.47
/// have the same API but different types.
macro_rules! info_title {
    ($doc:expr) => {{
        let doc = $doc;
        let info = doc.trailer.get(b"Info").ok().and_then(|info| match info {
            Object::Reference(id) => doc.get_dictionary(*id).ok(),
            Object::Dictionary(dict) => Some(dict),
            _ => None,
        });
        info.and_then(|info| info.get(b"Title").ok())
            .and_then(|title| title.as_str().ok())
            .map(decode_pdf_string)
            .filter(|title| !title.trim().is_empty())
    }};
}

/// A PDF text string: UTF-16BE with a BOM, UTF-8 with a BOM, else PDFDocEncoding, which
/// matches Latin-1 for the characters titles use.
fn decode_pdf_string(bytes: &[u8]) -> String {
    if let Some(utf16) = bytes.strip_prefix(&[0xFE, 0xFF]) {
        let units: Vec<u16> = utf16
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
            .collect();
        return String::from_utf16_lossy(&units);
    }
    if let Some(utf8) = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
        return String::from_utf8_lossy(utf8).into_owned();
    }
    bytes.iter().map(|&b| char::from(b)).collect()
}

fn lopdf_title(doc: &lopdf::Document) -> Option<String> {
    use lopdf::Object;
    info_title!(doc)
}

fn pdf_extract_title(doc: &pdf_extract::Document) -> Option<String> {
    use pdf_extract::Object;
    info_title!(doc)
}

/// lopdf 0.47 leaves `/Encrypt` in the trailer and loads no objects when the empty password
/// does not open the file.
fn lopdf_needs_password(doc: &lopdf::Document) -> bool {
    doc.trailer.has(b"Encrypt") && !doc.was_encrypted()
}

fn load_lopdf(bytes: &[u8]) -> Result<lopdf::Document, String> {
    match guarded(|| lopdf::Document::load_mem(bytes)) {
        Ok(Ok(doc)) => Ok(doc),
        Ok(Err(err)) => Err(err.to_string()),
        Err(panic) => Err(format!("lopdf panicked: {panic}")),
    }
}

/// The file opened by pdf-extract (decrypted with the empty password when it is
/// encrypted), whether it was encrypted, and what went wrong opening it, if anything.
fn open_primary(bytes: &[u8]) -> (Option<pdf_extract::Document>, bool, Option<String>) {
    let mut encrypted = false;
    let mut open_problem = None;
    let primary = match guarded(|| pdf_extract::Document::load_mem(bytes)) {
        Ok(Ok(mut doc)) => {
            encrypted = doc.is_encrypted();
            if encrypted {
                match doc.decrypt("") {
                    Ok(()) => Some(doc),
                    // lopdf 0.42 also says "incorrect password" for encryption it does not
                    // know (AES-256, R6) while poppler opens the file with the empty
                    // password, so lopdf 0.47 has the last word on "password required".
                    Err(err) => {
                        open_problem = Some(format!("pdf-extract could not decrypt: {err}"));
                        None
                    }
                }
            } else {
                Some(doc)
            }
        }
        Ok(Err(err)) => {
            open_problem = Some(format!("pdf-extract could not open: {err}"));
            None
        }
        Err(panic) => {
            open_problem = Some(format!("pdf-extract panicked while opening: {panic}"));
            None
        }
    };
    (primary, encrypted, open_problem)
}

fn extract(args: &PdfWorkerArgs, notes: Vec<String>) -> io::Result<()> {
    let mut out = EventWriter(io::stdout().lock());
    let bytes = match std::fs::read(&args.path) {
        Ok(bytes) => bytes,
        Err(err) => {
            return out.send(&WorkerEvent::Failed {
                kind: FailureKind::Unreadable,
                detail: err.to_string(),
            })
        }
    };

    let (primary, mut encrypted, open_problem) = open_primary(&bytes);

    let primary_pages: Vec<u32> = match &primary {
        Some(doc) => guarded(|| doc.get_pages().into_keys().collect()).unwrap_or_default(),
        None => Vec::new(),
    };
    // lopdf 0.47 is loaded when pdf-extract cannot read the file, or lazily for a page.
    let mut fallback: Option<Result<lopdf::Document, String>> = None;
    let (primary, page_numbers) = if primary_pages.is_empty() {
        let doc = load_lopdf(&bytes);
        let pages: Vec<u32> = match &doc {
            Ok(doc) if lopdf_needs_password(doc) => {
                return out.send(&WorkerEvent::Failed {
                    kind: FailureKind::PasswordRequired,
                    detail: "the empty password does not open it".into(),
                })
            }
            Ok(doc) => guarded(|| doc.get_pages().into_keys().collect()).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        if pages.is_empty() {
            let detail = match (&doc, open_problem) {
                (Err(err), Some(problem)) => format!("{problem}; lopdf: {err}"),
                (Err(err), None) => err.clone(),
                (Ok(_), problem) => problem.unwrap_or_else(|| "the page tree is empty".into()),
            };
            return out.send(&WorkerEvent::Failed {
                kind: FailureKind::Damaged,
                detail,
            });
        }
        if let Ok(doc) = &doc {
            encrypted |= doc.was_encrypted();
        }
        fallback = Some(doc);
        (None, pages)
    } else {
        (primary, primary_pages)
    };

    let title = match (&primary, &fallback) {
        (Some(doc), _) => guarded(|| pdf_extract_title(doc)).ok().flatten(),
        (None, Some(Ok(doc))) => guarded(|| lopdf_title(doc)).ok().flatten(),
        _ => None,
    };
    let mut open_notes = notes;
    open_notes.extend(open_problem);
    out.send(&WorkerEvent::Open {
        pages: page_numbers.len() as u32,
        encrypted,
        title,
        notes: open_notes,
    })?;

    for (index, &page_number) in page_numbers.iter().enumerate() {
        let number = index as u32 + 1;
        if number < args.first_page {
            continue;
        }
        let event = extract_page(&primary, &mut fallback, &bytes, number, page_number);
        out.send(&event)?;
    }
    out.send(&WorkerEvent::Done)
}

/// One page from both readers. pdf-extract's text is better (ligatures, spaces, PowerPoint
/// fonts) but it silently drops whole text runs in some fonts (the body of the enscript book
/// in corpus/pdf: only the header line comes back), so lopdf 0.47, which is several times
/// faster, reads every page too and wins when it finds clearly more visible characters.
fn extract_page(
    primary: &Primary,
    fallback: &mut Option<Result<lopdf::Document, String>>,
    bytes: &[u8],
    number: u32,
    page_number: u32,
) -> WorkerEvent {
    let mut warnings = Vec::new();
    let mut from_pdf_extract = None;
    if let Some(doc) = primary {
        let result = guarded(|| {
            let mut text = String::new();
            let mut output = pdf_extract::PlainTextOutput::new(&mut text);
            pdf_extract::output_doc_page(doc, &mut output, page_number).map(|()| text)
        });
        match result {
            Ok(Ok(text)) => from_pdf_extract = Some(text),
            Ok(Err(err)) => warnings.push(format!("pdf-extract failed: {err}")),
            Err(panic) => warnings.push(format!("pdf-extract panicked: {panic}")),
        }
    }
    let mut from_lopdf = None;
    match fallback.get_or_insert_with(|| load_lopdf(bytes)) {
        Ok(doc) => match guarded(|| lopdf_page_text(&mut *doc, page_number)) {
            Ok((text, errors)) => {
                if let Some(first) = errors.first() {
                    let more = errors.len() - 1;
                    let more = if more > 0 {
                        format!(" (and {more} more)")
                    } else {
                        String::new()
                    };
                    warnings.push(format!("lopdf skipped text: {first}{more}"));
                }
                from_lopdf = text;
            }
            Err(panic) => warnings.push(format!("lopdf panicked: {panic}")),
        },
        Err(err) => warnings.push(format!("lopdf could not open the file: {err}")),
    }
    let chosen = match (from_pdf_extract, from_lopdf) {
        (Some(primary), Some(fallback)) => {
            let primary_chars = visible_chars(&primary);
            if visible_chars(&fallback) > primary_chars + primary_chars / 2 + FALLBACK_MARGIN_CHARS
            {
                Some((fallback, "lopdf"))
            } else {
                Some((primary, "pdf-extract"))
            }
        }
        (Some(primary), None) => Some((primary, "pdf-extract")),
        (None, Some(fallback)) => Some((fallback, "lopdf")),
        (None, None) => None,
    };
    match chosen {
        Some((text, extractor)) => WorkerEvent::Page {
            number,
            text,
            extractor: extractor.into(),
            failed: false,
            warnings,
        },
        None => WorkerEvent::Page {
            number,
            text: String::new(),
            extractor: "none".into(),
            failed: true,
            warnings,
        },
    }
}

/// lopdf's text for one page, keeping the runs it could decode: `extract_text` drops the
/// whole page when one font's encoding is unsupported (a predefined CJK CMap next to Latin
/// text), `extract_text_chunks` reports that font's runs as errors and keeps the rest.
/// When nothing decodes, the page is retried once with `Tf` operators that lost their font
/// name removed (a number like `1e2` parses as an operator and takes the operand with it,
/// and lopdf then rejects the whole page).
fn lopdf_page_text(doc: &mut lopdf::Document, page_number: u32) -> (Option<String>, Vec<String>) {
    let (text, errors) = lopdf_chunks(doc, page_number);
    if text.is_some() || errors.is_empty() || !repair_font_operators(doc, page_number) {
        return (text.or_else(|| errors.is_empty().then(String::new)), errors);
    }
    let (repaired, _) = lopdf_chunks(doc, page_number);
    (repaired, errors)
}

fn lopdf_chunks(doc: &lopdf::Document, page_number: u32) -> (Option<String>, Vec<String>) {
    let mut text = None;
    let mut errors = Vec::new();
    for chunk in doc.extract_text_chunks(&[page_number]) {
        match chunk {
            Ok(chunk) => text.get_or_insert_with(String::new).push_str(&chunk),
            Err(err) => errors.push(err.to_string()),
        }
    }
    (text, errors)
}

/// Drops `Tf` operations without a font name from the page's content; true if any went.
fn repair_font_operators(doc: &mut lopdf::Document, page_number: u32) -> bool {
    let Some(&page_id) = doc.get_pages().get(&page_number) else {
        return false;
    };
    let Ok(mut content) = doc.get_and_decode_page_content(page_id) else {
        return false;
    };
    let before = content.operations.len();
    content.operations.retain(|op| {
        op.operator != "Tf"
            || op
                .operands
                .first()
                .is_some_and(|name| name.as_name().is_ok())
    });
    if content.operations.len() == before {
        return false;
    }
    content
        .encode()
        .ok()
        .is_some_and(|bytes| doc.change_page_content(page_id, bytes).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdf_strings_decode() {
        assert_eq!(
            decode_pdf_string(b"\xFE\xFF\x00O\x01\x1F\x00u\x00z"),
            "Oğuz"
        );
        assert_eq!(decode_pdf_string(b"caf\xE9"), "café");
        assert_eq!(decode_pdf_string(b"\xEF\xBB\xBFna\xC3\xAFve"), "naïve");
    }

    #[test]
    fn events_round_trip_as_json_lines() {
        let mut buffer = Vec::new();
        let mut writer = EventWriter(&mut buffer);
        writer
            .send(&WorkerEvent::Page {
                number: 3,
                text: "a\nb".into(),
                extractor: "lopdf".into(),
                failed: false,
                warnings: vec![],
            })
            .ok();
        writer.send(&WorkerEvent::Done).ok();
        let text = String::from_utf8(buffer).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(matches!(
            serde_json::from_str::<WorkerEvent>(lines[0]),
            Ok(WorkerEvent::Page { number: 3, .. })
        ));
        assert!(matches!(
            serde_json::from_str::<WorkerEvent>(lines[1]),
            Ok(WorkerEvent::Done)
        ));
    }
}
