//! Integration tests, one binary. Each module is one area; all of them use the real model
//! or real files where the area has them (`../shared` is read in place, never copied).

mod util;

// The model on tiny random weights: layer ranges, injection, block attention.
mod model_tiny;
// The real default model against llama.cpp's reference vectors.
mod model_parity;
// METHOD.md checks A and B on the real default model.
mod model_inject;
// Generation on the real model: stop tokens, limits, cancellation.
mod generate;
// Documents: PDF (worker subprocess), text, Markdown, EPUB, and bad input.
mod document;
// The context tree: encoder equals a plain forward; store resume and damage.
mod tree;
// METHOD.md checks A, B, E through store, search and injection.
mod tree_answer;
// Dense search: the real embedder, dense vectors stored with a real tree, BM25 fallback.
mod dense;
// `slm-chat eval`: needle placement as materialize.py, a dataset through the binary.
mod eval;
// The real binary: ask, bench, and bad model input.
mod cli;
// The terminal app: screen snapshots from scripted events, and the real binary in tmux.
mod tui;
// The crate's layers: no module imports one above it (DESIGN.md's one-way flow).
mod layers;
