//! slm-chat: ask questions about long documents and whole books with a small local model.
//!
//! The pipeline runs one way: [`document`] turns files into text with pages and sections;
//! [`tree`] cuts it into chunks and scores them; [`model`] is the transformer the rest is
//! built on (an open forward over layer ranges with injected KV); [`engine`] answers one
//! question end to end; [`tui`] is the terminal app on top of [`engine::session`];
//! [`config`] layers the settings file, environment and flags into the settings each part
//! takes. The binary (`src/main.rs`, `src/cli/`) wires them to the command line.
//!
//! `unsafe` is denied everywhere except, each behind a `SAFETY` comment: the SIMD kernels
//! (`model::quant`, F16C rounding in `model::attention`) and the safetensors mmap.
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod bench;
pub mod config;
pub mod document;
pub mod engine;
pub mod eval;
pub mod model;
pub mod store;
pub mod sys;
pub mod tree;
pub mod tui;
