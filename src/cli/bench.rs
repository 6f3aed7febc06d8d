//! `slm-chat bench`: prefill, encode and decode speed and memory on this machine.

use std::process::ExitCode;

use anyhow::Result;

use super::engine_settings;
use super::output;
use slm_chat::bench;
use slm_chat::config::Config;

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
}

pub fn run(config: &Config, args: &BenchArgs) -> Result<ExitCode> {
    let llm = output::load_model(&engine_settings(config)?.model)?;
    let plan = bench::BenchPlan {
        prefill_sizes: args.prefill.clone(),
        reps: args.reps,
    };
    let report = bench::run(&llm, &plan, &mut |m| eprintln!("{m}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::render(&report));
    }
    Ok(ExitCode::SUCCESS)
}
