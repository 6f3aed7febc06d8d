//! `slm-chat bench`: prefill, encode and decode speed and memory on this machine.

use std::process::ExitCode;

use anyhow::Result;

use super::engine_settings;
use super::output;
use slm_chat::bench;
use slm_chat::config::Config;
use slm_chat::model::{select_device, synthetic};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Prompt lengths for the prefill figures.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    prefill: Vec<usize>,
    /// Measure a model shape on random weights (quantized like its checkpoint, fixed seed)
    /// instead of a model file: no download, no tokenizer.
    #[arg(long, value_enum, value_name = "SHAPE")]
    synthetic: Option<synthetic::Shape>,
}

pub fn run(config: &Config, args: &BenchArgs) -> Result<ExitCode> {
    let settings = engine_settings(config)?;
    let plan = bench::BenchPlan {
        prefill_sizes: args.prefill.clone(),
        reps: args.reps,
    };
    let report = match args.synthetic {
        Some(shape) => {
            let device = select_device(settings.model.device)?;
            bench::run_synthetic(shape, &device, &plan, &mut |m| eprintln!("{m}"))?
        }
        None => {
            let llm = output::load_model(&settings.model)?;
            bench::run(&llm, &plan, &mut |m| eprintln!("{m}"))?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::render(&report));
    }
    Ok(ExitCode::SUCCESS)
}
