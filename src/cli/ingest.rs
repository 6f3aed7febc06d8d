//! `slm-chat ingest FILE…`: build and store each file's context tree.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::engine_settings;
use super::output::{self, say};
use slm_chat::config::Config;
use slm_chat::engine::ingest::IngestReport;
use slm_chat::engine::session::Progress;
use slm_chat::engine::{self};
use slm_chat::sys;

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print one JSON object per file instead of a summary line.
    #[arg(long)]
    json: bool,
}

pub fn run(config: &Config, args: &IngestArgs) -> Result<ExitCode> {
    let settings = engine_settings(config)?;
    for file in &args.files {
        output::check_file(file, &settings.ingest.load)?;
    }
    let llm = output::load_model(&settings.model)?;
    let embedder = engine::dense::load_embedder(settings.search.scorer, &settings.model, &mut say);
    let cancel = AtomicBool::new(false);
    for file in &args.files {
        let bar = output::progress_bar(file);
        let mut show = |p: &Progress| output::show_progress(&bar, p);
        let ingest = &settings.ingest;
        let result = engine::ingest::open_or_build(&llm, file, ingest, true, &mut show, &cancel)
            .and_then(|(tree, mut r)| {
                // The dense pass belongs to reading the book: embed its passages now.
                if let Some(e) = &embedder {
                    let start = std::time::Instant::now();
                    engine::dense::dense_index(&tree, e, &mut show)?;
                    let secs = start.elapsed().as_secs_f64();
                    r.dense_secs = Some(secs);
                    r.seconds += secs;
                    r.store_bytes = tree.disk_bytes();
                }
                Ok(r)
            });
        bar.finish_and_clear();
        let r = result.map_err(|e| output::engine_error(file, e))?;
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
            continue;
        }
        if let Some(why) = &r.rebuilt {
            say(&format!("{why}; rebuilt it"));
        }
        println!("{}", summary(&r));
    }
    Ok(ExitCode::SUCCESS)
}

/// One line for a file read (or found stored).
fn summary(r: &IngestReport) -> String {
    let what = if r.built {
        let resumed = if r.resumed_chunks > 0 {
            format!(" (resumed after {} finished chunks)", r.resumed_chunks)
        } else {
            String::new()
        };
        let dense = match r.dense_secs {
            Some(d) => format!(", {d:.1} s of it embedding passages"),
            None => String::new(),
        };
        format!(
            "built in {:.1} s at {:.0} tok/s{resumed}{dense}",
            r.seconds, r.tok_s
        )
    } else {
        format!("already stored, checked in {:.2} s", r.seconds)
    };
    format!(
        "{}: {} tokens, {} chunks, {what}; {} on disk ({}) at {}",
        r.source.display(),
        r.tokens,
        r.chunks,
        sys::human_bytes(r.store_bytes),
        if r.full_kv {
            "full KV kept"
        } else {
            "levels only"
        },
        r.path.display()
    )
}
