//! Documents: turns a PDF, plain-text, Markdown or EPUB file into one normalised text with
//! a page map (byte ranges per page) and sections, ready to be tokenised. This module owns
//! file sniffing, decoding, extraction (PDF in a worker subprocess), normalisation and the
//! user-facing error for bad input; it knows nothing about models, tensors or the UI.
//!
//! The one entry point is [`load`]. For PDFs the caller must say which executable runs the
//! hidden `__pdf-worker` subcommand ([`LoadOptions::worker_exe`]); that subcommand calls
//! [`run_pdf_worker`].

mod epub;
mod markdown;
mod normalize;
mod pdf;
mod pdf_worker;
mod text;

use std::fmt::Write as _;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use pdf_worker::{run_pdf_worker, PdfWorkerArgs};

/// Size a synthetic page aims for, in bytes of normalised text; about one printed page, so
/// "page N" in a citation points at a screenful the user can find.
const SYNTHETIC_PAGE_BYTES: usize = 3000;

/// A loaded document: the whole normalised text plus the maps that point into it.
#[derive(Debug, Clone, Serialize)]
pub struct Document {
    /// From the file's metadata (PDF Info, EPUB `dc:title`, first Markdown `#` heading), else
    /// the file name without its extension.
    pub title: String,
    pub kind: DocKind,
    /// The whole normalised text; pages are separated by a blank line.
    pub text: String,
    /// In reading order; ranges do not overlap and increase.
    pub pages: Vec<Page>,
    /// Headings or chapters, in reading order, where the format gives them.
    pub sections: Vec<Section>,
    /// Document-level remarks for the user (partial extraction, pages without text, …).
    pub notes: Vec<String>,
    /// Pages whose extraction failed (1-based); non-empty means the document is partial.
    pub failed_pages: Vec<u32>,
}

/// The format a document was read as (decided by content first, extension second).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DocKind {
    Pdf,
    Text,
    Markdown,
    Epub,
}

/// One page of a document: a byte range into [`Document::text`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page {
    /// 1-based. For PDFs the physical page index (not the printed label).
    pub number: u32,
    pub text_range: Range<usize>,
    /// True when the format has no pages and this one was cut by slm-chat (text, Markdown,
    /// one per spine item for EPUB).
    pub synthetic: bool,
    /// Which extractor produced the text: `pdf-extract`, `lopdf`, `none`, or the loader name.
    pub extractor: String,
    pub warnings: Vec<String>,
}

/// A heading or chapter; `text_range` runs to the next section of the same or a higher level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Section {
    pub title: String,
    /// 1 is a chapter or `#` heading.
    pub level: u8,
    pub text_range: Range<usize>,
}

/// How to load; only PDFs use these knobs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The executable that understands the hidden `__pdf-worker` subcommand (normally the
    /// running binary, `std::env::current_exe()`).
    pub worker_exe: PathBuf,
    /// Wall-clock budget for the whole PDF extraction; pages not done by then are reported as
    /// failed and the document is partial.
    pub timeout: Duration,
    /// Address-space cap (RLIMIT_AS) applied inside the worker; 0 means no cap.
    pub memory_cap_bytes: u64,
}

impl LoadOptions {
    /// Defaults: 45 s, so every file is answered within a minute even on a loaded machine, and a
    /// 4 GiB address-space cap, about 8× the worst peak RSS seen on the pdf.js corpus (473 MB,
    /// `../shared/research/pdf-probe.md`) with room for thread stacks and allocator arenas.
    pub fn new(worker_exe: impl Into<PathBuf>) -> Self {
        Self {
            worker_exe: worker_exe.into(),
            timeout: Duration::from_secs(45),
            memory_cap_bytes: 4 << 30,
        }
    }
}

/// Why a file could not be loaded. Messages are one lowercase line, path first.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("{path}: no such file")]
    NotFound { path: String },
    #[error("{path}: is a directory, not a document")]
    IsDirectory { path: String },
    #[error("{path}: cannot read: {reason}")]
    Io { path: String, reason: String },
    #[error("{path}: empty file")]
    Empty { path: String },
    #[error("{path}: unsupported file type (not PDF, EPUB, Markdown or text)")]
    Unsupported { path: String },
    #[error("{path}: not a PDF or damaged beyond reading")]
    DamagedPdf { path: String },
    #[error("{path}: not an EPUB or damaged beyond reading ({reason})")]
    DamagedEpub { path: String, reason: String },
    #[error("{path}: password required")]
    PasswordRequired { path: String },
    #[error("{path}: encrypted, and the text could not be decrypted")]
    Undecryptable { path: String },
    #[error("{path}: no text layer (the PDF looks scanned; OCR is not supported)")]
    NoTextLayer { path: String },
    #[error("{path}: text extraction failed ({reason})")]
    ExtractionFailed { path: String, reason: String },
}

/// Exit code of a successful load that is partial (some pages failed).
pub const EXIT_PARTIAL: u8 = 10;

impl DocumentError {
    /// The process exit code for this outcome, one per kind of problem (clap uses 2 for bad
    /// usage, a panic gives 101):
    ///
    /// | code | outcome |
    /// |---|---|
    /// | 3 | cannot read: no such file, a directory, I/O error |
    /// | 4 | unsupported file type or empty file |
    /// | 5 | not a PDF / not an EPUB / damaged beyond reading |
    /// | 6 | password required |
    /// | 7 | encrypted and undecryptable (e.g. AES-256 that decrypts to nothing) |
    /// | 8 | no text layer (scanned PDF) |
    /// | 9 | extraction failed on every page (worker crashed or timed out) |
    /// | 10 | ([`EXIT_PARTIAL`], not an error) text from only some pages |
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotFound { .. } | Self::IsDirectory { .. } | Self::Io { .. } => 3,
            Self::Empty { .. } | Self::Unsupported { .. } => 4,
            Self::DamagedPdf { .. } | Self::DamagedEpub { .. } => 5,
            Self::PasswordRequired { .. } => 6,
            Self::Undecryptable { .. } => 7,
            Self::NoTextLayer { .. } => 8,
            Self::ExtractionFailed { .. } => 9,
        }
    }
}

impl Document {
    /// The page that holds `byte_offset` of [`Document::text`] (binary search; offsets in a
    /// separator belong to the page before it, offsets past the end to the last page).
    pub fn page_at(&self, byte_offset: usize) -> u32 {
        let after = self
            .pages
            .partition_point(|page| page.text_range.start <= byte_offset);
        let index = after.saturating_sub(1);
        self.pages.get(index).map_or(1, |page| page.number)
    }

    /// The exit code `extract` should end with: 0, or [`EXIT_PARTIAL`] when pages failed.
    pub fn exit_code(&self) -> u8 {
        if self.failed_pages.is_empty() {
            0
        } else {
            EXIT_PARTIAL
        }
    }
}

/// Reads `path` into a [`Document`], deciding the format by content (`%PDF`, an EPUB zip)
/// and then by extension; anything else that decodes as text is read as text.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Document, DocumentError> {
    let shown = path.display().to_string();
    let bytes = read_file(path, &shown)?;
    if bytes.is_empty() {
        return Err(DocumentError::Empty { path: shown });
    }
    let title = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| shown.clone());
    let extension = path
        .extension()
        .map(|ext| ext.to_string_lossy().to_lowercase())
        .unwrap_or_default();

    // A .pdf without the header still goes to the worker: lopdf tolerates some junk, and its
    // answer ("not a PDF or damaged") is the same one line either way.
    if pdf::has_pdf_header(&bytes) || (extension == "pdf" && !epub::looks_like_epub(&bytes)) {
        drop(bytes);
        return pdf::load(path, &shown, title, opts);
    }
    if epub::looks_like_epub(&bytes) {
        return epub::load(&bytes, &shown, title);
    }
    match extension.as_str() {
        "epub" => Err(DocumentError::DamagedEpub {
            path: shown,
            reason: "not a zip archive with an EPUB mimetype".into(),
        }),
        "md" | "markdown" | "mdown" | "mkd" => {
            let decoded = text::decode(&bytes).ok_or(DocumentError::Unsupported {
                path: shown.clone(),
            })?;
            markdown::load(&decoded, &shown, title)
        }
        _ => {
            let decoded = text::decode(&bytes).ok_or(DocumentError::Unsupported {
                path: shown.clone(),
            })?;
            text::load(&decoded, &shown, title)
        }
    }
}

fn read_file(path: &Path, shown: &str) -> Result<Vec<u8>, DocumentError> {
    let io_error = |err: io::Error| match err.kind() {
        io::ErrorKind::NotFound => DocumentError::NotFound { path: shown.into() },
        io::ErrorKind::IsADirectory => DocumentError::IsDirectory { path: shown.into() },
        _ => DocumentError::Io {
            path: shown.into(),
            reason: io_reason(&err),
        },
    };
    let metadata = std::fs::metadata(path).map_err(io_error)?;
    if metadata.is_dir() {
        return Err(DocumentError::IsDirectory { path: shown.into() });
    }
    std::fs::read(path).map_err(io_error)
}

/// An `io::Error` as a lowercase phrase without the "(os error N)" suffix.
fn io_reason(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::NotFound => "no such file".into(),
        _ => {
            let text = err.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text).to_string();
            let mut chars = text.chars();
            chars.next().map_or(String::new(), |first| {
                first.to_lowercase().chain(chars).collect()
            })
        }
    }
}

/// The text with a `--- page N ---` line before each page (`(synthetic)` when slm-chat cut
/// the page), as `slm-chat extract` prints it.
pub fn render_with_page_markers(doc: &Document) -> String {
    let mut out = String::with_capacity(doc.text.len() + doc.pages.len() * 24);
    for page in &doc.pages {
        let synthetic = if page.synthetic { " (synthetic)" } else { "" };
        let _ = writeln!(out, "--- page {}{synthetic} ---", page.number);
        let body = &doc.text[page.text_range.clone()];
        out.push_str(body);
        if !body.is_empty() && !body.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// A text block while building a document: a heading (with its level) or a paragraph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Block {
    pub heading: Option<u8>,
    pub text: String,
}

/// Joins normalised blocks with blank lines and returns the text and the sections that the
/// headings open (each running to the next heading of the same or a higher level).
pub(crate) fn join_blocks(blocks: &[Block]) -> (String, Vec<Section>) {
    let mut text = String::new();
    let mut open: Vec<(String, u8, usize)> = Vec::new();
    let mut sections = Vec::new();
    for block in blocks {
        let body = block.text.trim();
        if body.is_empty() {
            continue;
        }
        if let Some(level) = block.heading {
            close_sections(&mut open, &mut sections, level, text.len());
        }
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        if let Some(level) = block.heading {
            open.push((body.replace('\n', " "), level, text.len()));
        }
        text.push_str(body);
    }
    close_sections(&mut open, &mut sections, 0, text.len());
    sections.sort_by_key(|section: &Section| section.text_range.start);
    (text, sections)
}

fn close_sections(
    open: &mut Vec<(String, u8, usize)>,
    sections: &mut Vec<Section>,
    level: u8,
    end: usize,
) {
    while let Some((_, open_level, _)) = open.last() {
        if *open_level < level {
            break;
        }
        if let Some((title, level, start)) = open.pop() {
            sections.push(Section {
                title,
                level,
                text_range: start..end.max(start),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc_with_pages(ranges: &[Range<usize>]) -> Document {
        Document {
            title: String::new(),
            kind: DocKind::Pdf,
            text: String::new(),
            pages: ranges
                .iter()
                .enumerate()
                .map(|(i, range)| Page {
                    number: i as u32 + 1,
                    text_range: range.clone(),
                    synthetic: false,
                    extractor: String::new(),
                    warnings: Vec::new(),
                })
                .collect(),
            sections: Vec::new(),
            notes: Vec::new(),
            failed_pages: Vec::new(),
        }
    }

    #[test]
    fn page_at_maps_offsets_and_separators() {
        let doc = doc_with_pages(&[0..10, 12..20, 22..22, 24..30]);
        assert_eq!(doc.page_at(0), 1);
        assert_eq!(doc.page_at(9), 1);
        assert_eq!(doc.page_at(11), 1, "separator belongs to the page before");
        assert_eq!(doc.page_at(12), 2);
        assert_eq!(doc.page_at(23), 3);
        assert_eq!(doc.page_at(24), 4);
        assert_eq!(doc.page_at(1000), 4);
    }

    #[test]
    fn join_blocks_nests_sections() {
        let block = |heading, text: &str| Block {
            heading,
            text: text.into(),
        };
        let (text, sections) = join_blocks(&[
            block(Some(1), "One"),
            block(None, "para"),
            block(Some(2), "Sub"),
            block(None, "more"),
            block(Some(1), "Two"),
            block(None, "end"),
        ]);
        assert_eq!(text, "One\n\npara\n\nSub\n\nmore\n\nTwo\n\nend");
        let got: Vec<_> = sections
            .iter()
            .map(|s| (s.title.as_str(), s.level, &text[s.text_range.clone()]))
            .collect();
        assert_eq!(
            got,
            vec![
                ("One", 1, "One\n\npara\n\nSub\n\nmore"),
                ("Sub", 2, "Sub\n\nmore"),
                ("Two", 1, "Two\n\nend"),
            ]
        );
    }
}
