//! Documents through the real binary and real corpus files.

// PDFs from ../shared/corpus through the worker subprocess: pages, headers, clean errors.
mod pdf;
// Plain text: encodings, synthetic pages, bad input of every kind.
mod text;
// Markdown headings as sections.
mod markdown;
// EPUBs built by the test (zip + OPF + XHTML): spine order, chapter titles.
pub(crate) mod epub;
// proptest: arbitrary bytes never panic the text, Markdown and EPUB loaders.
mod fuzz;
