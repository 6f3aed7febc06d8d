//! slm-chat: ask questions about long documents and whole books with a small local model.
//!
//! The pipeline runs one way: [`model`] is the transformer the rest is built on (an open
//! forward over layer ranges with injected KV).
#![deny(unsafe_code)]

pub mod config;
pub mod model;
