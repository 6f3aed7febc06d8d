//! `slm-chat bench`: prefill, encode and decode speed and memory on this machine.

use std::process::ExitCode;

use anyhow::Result;

use super::engine_settings;
use super::output;
use super::Exit;
use slm_chat::bench::{self, Parity, PARITY_TOKENS, SYNTHETIC_SEED};
use slm_chat::config::Config;
use slm_chat::engine::Settings;
use slm_chat::model::{select_device, synthetic, DeviceChoice, ModelChoice};

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
    /// Instead of timing: run the model on DEVICE and on the CPU over the same 512-token
    /// prompt and compare the logits at every position (the best token's agreement, max
    /// |Δ|); exits 1 when the best token differs at more than 1 % of positions.
    #[arg(long, value_name = "DEVICE")]
    parity: Option<DeviceChoice>,
}

pub fn run(config: &Config, args: &BenchArgs) -> Result<ExitCode> {
    let settings = engine_settings(config)?;
    if let Some(device) = args.parity {
        let p = parity(&settings, args.synthetic, device)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&p)?);
        } else {
            print!("{}", bench::render_parity(&p));
        }
        if !p.passed {
            return Err(Exit {
                message: format!(
                    "parity failed: the best token differs at {} of {} positions",
                    p.positions - p.argmax_agree,
                    p.positions
                ),
                code: 1,
            }
            .into());
        }
        return Ok(ExitCode::SUCCESS);
    }
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

/// The same weights on the CPU and on `device`, compared over one prompt.
fn parity(
    settings: &Settings,
    shape: Option<synthetic::Shape>,
    device: DeviceChoice,
) -> Result<Parity> {
    let on = |d: DeviceChoice| ModelChoice {
        device: d,
        ..settings.model.clone()
    };
    Ok(match shape {
        Some(shape) => {
            let cpu = synthetic::model(shape, SYNTHETIC_SEED, &select_device(DeviceChoice::Cpu)?)?;
            let other = synthetic::model(shape, SYNTHETIC_SEED, &select_device(device)?)?;
            let vocab = cpu.config().vocab_size;
            let tokens = synthetic::tokens(PARITY_TOKENS, vocab, SYNTHETIC_SEED);
            let name = format!("synthetic {} (random weights)", shape.name());
            bench::parity(name, &cpu, &other, &tokens)?
        }
        None => {
            let cpu = output::load_model(&on(DeviceChoice::Cpu))?;
            let other = output::load_model(&on(device))?;
            let mut tokens = cpu.tokenizer.encode(bench::SAMPLE_TEXT, false)?;
            tokens.truncate(PARITY_TOKENS);
            let name = cpu.path.display().to_string();
            bench::parity(name, &cpu.model, &other.model, &tokens)?
        }
    })
}
