//! The `slm-chat` binary: parse the command line, run it, print one clear line on failure.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{Args, Exit};

fn main() -> ExitCode {
    slm_chat::sys::pin_thread_count();
    match cli::run(Args::parse()) {
        Ok(code) => code,
        Err(err) => {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            eprintln!("slm-chat: {err:#}");
            ExitCode::from(err.downcast_ref::<Exit>().map_or(2, |e| e.code))
        }
    }
}
