//! PDFs, parent side: runs the `__pdf-worker` subprocess under a wall-clock deadline, reads
//! its page stream on a thread (so the parent never blocks on a hung worker), kills it on
//! timeout, restarts it after the page that crashed it, and turns the pages received into a
//! normalised [`Document`] with the clear outcomes (password, scanned, damaged, partial).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::normalize::{clean_pdf_page, finish_pdf_page, strip_running_lines, visible_chars};
use super::pdf_worker::{FailureKind, PdfWorkerArgs, WorkerEvent};
use super::{DocKind, Document, DocumentError, LoadOptions, Page};

/// A worker that crashes is restarted after the page that killed it at most this many times;
/// a file that crashes it on every page is better reported than retried forever.
const MAX_RESTARTS: u32 = 5;

/// A document with fewer visible characters than this in total has no usable text layer.
const MIN_DOCUMENT_CHARS: usize = 10;

/// How much of the worker's stderr is kept to explain a crash (the runtime's abort message).
const STDERR_KEEP_BYTES: u64 = 16 << 10;

/// True when `%PDF-` appears in the first KiB, where readers accept the header.
pub(crate) fn has_pdf_header(bytes: &[u8]) -> bool {
    bytes[..bytes.len().min(1024)]
        .windows(5)
        .any(|window| window == b"%PDF-")
}

/// A page as the worker sent it.
#[derive(Debug, Default)]
struct RawPage {
    text: String,
    extractor: String,
    failed: bool,
    warnings: Vec<String>,
}

/// Everything learned from one or more worker runs.
#[derive(Debug, Default)]
struct Collected {
    total: Option<u32>,
    encrypted: bool,
    title: Option<String>,
    notes: Vec<String>,
    pages: BTreeMap<u32, RawPage>,
    failure: Option<(FailureKind, String)>,
}

impl Collected {
    fn apply(&mut self, event: WorkerEvent) {
        match event {
            WorkerEvent::Open {
                pages,
                encrypted,
                title,
                notes,
            } => {
                // A restarted worker re-announces the document; keep the first answer.
                if self.total.is_none() {
                    self.total = Some(pages);
                    self.encrypted = encrypted;
                    self.title = title;
                    self.notes.extend(notes);
                }
            }
            WorkerEvent::Page {
                number,
                text,
                extractor,
                failed,
                warnings,
            } => {
                self.pages.insert(
                    number,
                    RawPage {
                        text,
                        extractor,
                        failed,
                        warnings,
                    },
                );
            }
            WorkerEvent::Failed { kind, detail } => self.failure = Some((kind, detail)),
            WorkerEvent::Done => {}
        }
    }

    /// First page at or after `from` that no worker has answered.
    fn next_missing(&self, from: u32) -> Option<u32> {
        let total = self.total?;
        (from..=total).find(|n| !self.pages.contains_key(n))
    }

    fn fail_page(&mut self, number: u32, warning: String) {
        self.pages.insert(
            number,
            RawPage {
                extractor: "none".into(),
                failed: true,
                warnings: vec![warning],
                ..RawPage::default()
            },
        );
    }
}

/// How one worker run ended.
enum RunEnd {
    /// It sent `done` (or `failed`, a clean refusal to open the file).
    Finished,
    TimedOut,
    Crashed(String),
}

/// Loads a PDF through the worker; see the module doc.
pub(crate) fn load(
    path: &Path,
    shown: &str,
    fallback_title: String,
    opts: &LoadOptions,
) -> Result<Document, DocumentError> {
    let (mut collected, timed_out) = collect(path, shown, opts)?;
    if let Some((kind, detail)) = collected.failure.clone() {
        if collected.total.is_none() {
            return Err(match kind {
                FailureKind::PasswordRequired => {
                    DocumentError::PasswordRequired { path: shown.into() }
                }
                FailureKind::Damaged => DocumentError::DamagedPdf { path: shown.into() },
                FailureKind::Unreadable => DocumentError::Io {
                    path: shown.into(),
                    reason: detail.to_lowercase(),
                },
            });
        }
    }
    let Some(total) = collected.total else {
        return Err(DocumentError::ExtractionFailed {
            path: shown.into(),
            reason: format!(
                "timed out after {} s before the first page",
                opts.timeout.as_secs()
            ),
        });
    };
    let why_missing = if timed_out {
        format!(
            "not reached within the {} s time limit",
            opts.timeout.as_secs()
        )
    } else {
        "not attempted after repeated crashes of the pdf reader".to_string()
    };
    for number in 1..=total {
        if !collected.pages.contains_key(&number) {
            collected.fail_page(number, why_missing.clone());
        }
    }
    assemble(collected, total, shown, fallback_title, timed_out, opts)
}

/// Runs workers over the file until every page is in `Collected`, the time limit passes
/// (then `true`), or the reader crashed too often; a worker that crashes on a page is
/// restarted after it, the page marked failed.
fn collect(
    path: &Path,
    shown: &str,
    opts: &LoadOptions,
) -> Result<(Collected, bool), DocumentError> {
    let deadline = Instant::now() + opts.timeout;
    let mut collected = Collected::default();
    let mut first_page = 1;
    let mut restarts = 0;
    let mut timed_out = false;
    loop {
        let args = PdfWorkerArgs {
            path: path.to_path_buf(),
            first_page,
            memory_cap: opts.memory_cap_bytes,
        };
        let end = run_worker(&opts.worker_exe, &args, deadline, &mut collected).map_err(|err| {
            DocumentError::ExtractionFailed {
                path: shown.into(),
                reason: format!(
                    "cannot start the pdf worker: {}",
                    err.to_string().to_lowercase()
                ),
            }
        })?;
        match end {
            RunEnd::Finished => break,
            RunEnd::TimedOut => {
                timed_out = true;
                break;
            }
            RunEnd::Crashed(detail) => {
                let Some(bad) = collected.next_missing(first_page) else {
                    if collected.total.is_none() {
                        return Err(DocumentError::ExtractionFailed {
                            path: shown.into(),
                            reason: format!(
                                "the pdf reader crashed while opening the file: {detail}"
                            ),
                        });
                    }
                    break;
                };
                collected.fail_page(
                    bad,
                    format!("the pdf reader crashed on this page: {detail}"),
                );
                restarts += 1;
                first_page = bad + 1;
                if restarts > MAX_RESTARTS {
                    break;
                }
            }
        }
    }
    Ok((collected, timed_out))
}

/// Spawns one worker and feeds its events into `collected` until it ends or `deadline`.
fn run_worker(
    exe: &Path,
    args: &PdfWorkerArgs,
    deadline: Instant,
    collected: &mut Collected,
) -> std::io::Result<RunEnd> {
    let mut child = Command::new(exe)
        .args(args.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (sender, receiver) = mpsc::channel();
    let stdout = child.stdout.take();
    let reader = thread::spawn(move || {
        let Some(stdout) = stdout else { return };
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Anything that is not a protocol line (a crate printing to stdout) is ignored.
            if let Ok(event) = serde_json::from_str::<WorkerEvent>(&line) {
                if sender.send(event).is_err() {
                    break;
                }
            }
        }
    });
    let stderr = child.stderr.take();
    let stderr_reader: JoinHandle<String> = thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(stderr) = stderr {
            let mut limited = stderr.take(STDERR_KEEP_BYTES);
            let _ = limited.read_to_end(&mut kept);
            // Drain the rest so the worker never blocks on a full pipe.
            let mut rest = limited.into_inner();
            let _ = std::io::copy(&mut rest, &mut std::io::sink());
        }
        String::from_utf8_lossy(&kept).into_owned()
    });

    let mut finished = false;
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left) {
            Ok(event) => {
                finished |= matches!(event, WorkerEvent::Done | WorkerEvent::Failed { .. });
                collected.apply(event);
            }
            Err(RecvTimeoutError::Timeout) => {
                stop(&mut child);
                break None;
            }
            Err(RecvTimeoutError::Disconnected) => break wait_until(&mut child, deadline),
        }
    };
    let _ = reader.join();
    let stderr_text = stderr_reader.join().unwrap_or_default();
    Ok(match end {
        None => RunEnd::TimedOut,
        Some(_) if finished => RunEnd::Finished,
        Some(status) => RunEnd::Crashed(describe_crash(status, &stderr_text)),
    })
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for a worker that closed its stdout; `None` (after killing it) if it outlives the
/// deadline.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            _ => {
                stop(child);
                return None;
            }
        }
    }
}

/// One phrase for a worker that ended without finishing: the runtime's last stderr line
/// ("thread 'pdf-worker' has overflowed its stack", "memory allocation of … failed") or
/// the signal or status.
fn describe_crash(status: ExitStatus, stderr: &str) -> String {
    let last_line = stderr
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .map(|line| line.trim_start_matches("fatal runtime error: ").to_string());
    let how = exit_description(status);
    match last_line {
        Some(line) => format!("{line} ({how})"),
        None => how,
    }
}

#[cfg(unix)]
fn exit_description(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.signal(), status.code()) {
        (Some(signal), _) => format!("killed by signal {signal}"),
        (None, Some(code)) => format!("exit status {code}"),
        (None, None) => "unknown exit".into(),
    }
}

#[cfg(not(unix))]
fn exit_description(status: ExitStatus) -> String {
    status.code().map_or_else(
        || "unknown exit".into(),
        |code| format!("exit status {code}"),
    )
}

/// "1-3, 7, 9" for a sorted page list, cut after 20 runs.
fn page_list(pages: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &page in pages {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == page => *end = page,
            _ => runs.push((page, page)),
        }
    }
    let shown: Vec<String> = runs
        .iter()
        .take(20)
        .map(|&(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            }
        })
        .collect();
    let more = if runs.len() > 20 { ", …" } else { "" };
    format!("{}{more}", shown.join(", "))
}

/// Why a PDF yields no document: no page could be read, or no text was found on those
/// that could (encrypted, a scan, or the rest failed); `None` when there is text.
fn nothing_readable(
    raw: &[RawPage],
    texts: &[String],
    failed: &[u32],
    encrypted: bool,
    shown: &str,
) -> Option<DocumentError> {
    let visible: usize = texts.iter().map(|text| visible_chars(text)).sum();
    if failed.len() == raw.len() {
        let first = raw
            .first()
            .and_then(|page| page.warnings.first().cloned())
            .unwrap_or_default();
        return Some(DocumentError::ExtractionFailed {
            path: shown.into(),
            reason: format!("no page could be read: {first}"),
        });
    }
    if visible < MIN_DOCUMENT_CHARS {
        return Some(if encrypted {
            DocumentError::Undecryptable { path: shown.into() }
        } else if failed.is_empty() {
            DocumentError::NoTextLayer { path: shown.into() }
        } else {
            DocumentError::ExtractionFailed {
                path: shown.into(),
                reason: format!(
                    "no text on the pages that could be read; pages {} failed",
                    page_list(failed)
                ),
            }
        });
    }
    None
}

/// The pages' texts joined with blank lines, each page's range in the result, and the pages
/// with no text that did not fail (images or scans).
fn join_pages(total: u32, raw: Vec<RawPage>, texts: Vec<String>) -> (String, Vec<Page>, Vec<u32>) {
    let mut text = String::new();
    let mut pages = Vec::with_capacity(raw.len());
    let mut empty = Vec::new();
    for ((number, page), body) in (1..=total).zip(raw).zip(texts) {
        if number > 1 {
            text.push_str("\n\n");
        }
        let start = text.len();
        text.push_str(&body);
        let mut warnings = page.warnings;
        if body.is_empty() && !page.failed {
            warnings.push("no text on this page (an image or a scan?)".into());
            empty.push(number);
        }
        pages.push(Page {
            number,
            text_range: start..text.len(),
            synthetic: false,
            extractor: page.extractor,
            warnings,
        });
    }
    (text, pages, empty)
}

/// Normalises the pages, removes running lines, joins the text and decides the outcome.
fn assemble(
    collected: Collected,
    total: u32,
    shown: &str,
    fallback_title: String,
    timed_out: bool,
    opts: &LoadOptions,
) -> Result<Document, DocumentError> {
    let raw: Vec<RawPage> = collected.pages.into_values().collect();
    let mut texts: Vec<String> = raw.iter().map(|page| clean_pdf_page(&page.text)).collect();
    let removed = strip_running_lines(&mut texts);
    let texts: Vec<String> = texts.iter().map(|text| finish_pdf_page(text)).collect();

    let failed: Vec<u32> = (1..=total)
        .zip(&raw)
        .filter(|(_, page)| page.failed)
        .map(|(n, _)| n)
        .collect();
    if let Some(e) = nothing_readable(&raw, &texts, &failed, collected.encrypted, shown) {
        return Err(e);
    }

    let (text, pages, empty) = join_pages(total, raw, texts);

    let mut notes = collected.notes;
    if !failed.is_empty() {
        let limit = if timed_out {
            format!(" (stopped at the {} s limit)", opts.timeout.as_secs())
        } else {
            String::new()
        };
        notes.insert(
            0,
            format!(
                "partial: text from {} of {total} pages; failed pages: {}{limit}",
                total as usize - failed.len(),
                page_list(&failed)
            ),
        );
    }
    if !empty.is_empty() {
        notes.push(format!(
            "{} of {total} pages have no text layer (images or scans; OCR is not supported): {}",
            empty.len(),
            page_list(&empty)
        ));
    }
    if !removed.is_empty() {
        let quoted: Vec<String> = removed.iter().map(|line| format!("'{line}'")).collect();
        notes.push(format!(
            "removed running headers/footers (digits shown as #): {}",
            quoted.join(", ")
        ));
    }
    Ok(Document {
        title: collected.title.unwrap_or(fallback_title),
        kind: DocKind::Pdf,
        text,
        pages,
        sections: Vec::new(),
        notes,
        failed_pages: failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_lists_compress_runs() {
        assert_eq!(page_list(&[1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
        assert_eq!(page_list(&[]), "");
        let many: Vec<u32> = (1..=100).step_by(2).collect();
        assert!(page_list(&many).ends_with(", …"));
    }

    #[test]
    fn pdf_header_found_after_junk() {
        assert!(has_pdf_header(b"%PDF-1.7\n"));
        assert!(has_pdf_header(b"\x00\x01junk%PDF-1.4"));
        assert!(!has_pdf_header(b"PK\x03\x04"));
    }

    #[test]
    fn crash_description_uses_the_abort_message() {
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            let status = ExitStatus::from_raw(6);
            assert_eq!(
                describe_crash(status, "\nthread 'pdf-worker' has overflowed its stack\nfatal runtime error: stack overflow\n"),
                "stack overflow (killed by signal 6)"
            );
            assert_eq!(
                describe_crash(ExitStatus::from_raw(9), ""),
                "killed by signal 9"
            );
        }
    }
}
