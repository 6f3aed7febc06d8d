//! slm-chat: ask questions about long documents and whole books with a small local model.
//!
//! The pipeline runs one way: [`document`] turns files into text with pages and sections;
//! [`model`] is the transformer the rest is built on (an open forward over layer ranges with
//! injected KV).
#![deny(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod config;
pub mod document;
pub mod engine;
pub mod model;
pub mod sys;
pub mod tree;
