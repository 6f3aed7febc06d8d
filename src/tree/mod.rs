//! The context tree's parts that need no model: cutting a tokenized document into chunks at
//! sentence ends with their pages, and BM25 statistics over them.
//!
//! Knows documents (for pages) and token ids, never files on disk or the UI.

mod bm25;
mod chunk;

pub use bm25::Bm25;
pub use chunk::{chunk, Chunk};
