//! `slm-chat bench`: prefill, encode and decode throughput and memory on this machine, so
//! speed is tracked from day one. Each figure is the median of several runs.

use std::time::Instant;

use serde::Serialize;

use candle_core::Device;

use crate::model::{argmax, synthetic, Forward, Llm, Model, ModelError};

/// Text the bench tokenizes: the bundled sample (real prose, about 35K tokens).
pub const SAMPLE_TEXT: &str = include_str!("../assets/sherlock_holmes_adventures_1-3.txt");

/// Chunk size and sink prefix length of the encode figure (the context tree's defaults).
const ENCODE_CHUNK: usize = 512;
const ENCODE_PREFIX: usize = 32;
const ENCODE_CHUNKS: usize = 4;
const DECODE_PROMPT: usize = 512;
const DECODE_TOKENS: usize = 128;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub prefill_sizes: Vec<usize>,
    pub reps: usize,
}

/// One figure: median and spread over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub tokens: usize,
    pub median_tok_s: f64,
    pub min_tok_s: f64,
    pub max_tok_s: f64,
    pub runs: Vec<f64>,
}

/// Everything one `bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub threads: usize,
    pub load_secs: f64,
    pub weight_bytes: usize,
    pub figures: Vec<Figure>,
    pub peak_rss_bytes: Option<u64>,
}

fn figure(name: String, tokens: usize, runs: Vec<f64>) -> Figure {
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Figure {
        name,
        tokens,
        median_tok_s: median,
        min_tok_s: sorted[0],
        max_tok_s: sorted[sorted.len() - 1],
        runs,
    }
}

/// Run the plan on `llm` over the bundled sample's tokens; `progress` gets a line before
/// each measurement.
pub fn run(
    llm: &Llm,
    plan: &BenchPlan,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport, ModelError> {
    let tokens = llm.tokenizer.encode(SAMPLE_TEXT, false)?;
    let figures = measure(&llm.model, &tokens, plan, progress)?;
    Ok(report(
        llm.path.display().to_string(),
        &llm.model,
        llm.load_secs,
        figures,
    ))
}

/// Seed of `--synthetic` weights and tokens: the same model on every machine.
pub const SYNTHETIC_SEED: u64 = 20_261_207;

/// Run the plan on random weights of `shape` on `device`, over random token ids.
pub fn run_synthetic(
    shape: synthetic::Shape,
    device: &Device,
    plan: &BenchPlan,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport, ModelError> {
    progress(&format!("building {} on random weights", shape.name()));
    let start = Instant::now();
    let m = synthetic::model(shape, SYNTHETIC_SEED, device)?;
    let load_secs = start.elapsed().as_secs_f64();
    let longest = plan.prefill_sizes.iter().copied().max().unwrap_or(0);
    let needed = longest.max(ENCODE_PREFIX + ENCODE_CHUNKS * ENCODE_CHUNK);
    let tokens = synthetic::tokens(needed, m.config().vocab_size, SYNTHETIC_SEED);
    let figures = measure(&m, &tokens, plan, progress)?;
    let name = format!("synthetic {} (random weights)", shape.name());
    Ok(report(name, &m, load_secs, figures))
}

fn report(model: String, m: &Model, load_secs: f64, figures: Vec<Figure>) -> BenchReport {
    BenchReport {
        model,
        device: crate::model::device_name(m.device()).to_string(),
        threads: rayon::current_num_threads(),
        load_secs,
        weight_bytes: m.weight_bytes(),
        figures,
        peak_rss_bytes: crate::sys::peak_rss_bytes(),
    }
}

/// Prefill, encode and decode figures of `m` over `tokens`.
fn measure(
    m: &Model,
    tokens: &[u32],
    plan: &BenchPlan,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Figure>, ModelError> {
    let reps = plan.reps.max(1);
    let mut figures = Vec::new();

    let window = m.config().context_length;
    for &n in &plan.prefill_sizes {
        if n == 0 || n > window {
            return Err(ModelError::Input(format!(
                "--prefill {n}: must be between 1 and the model's {window}-token window"
            )));
        }
        if n > tokens.len() {
            return Err(ModelError::Input(format!(
                "prefill {n} needs more than the sample's {} tokens",
                tokens.len()
            )));
        }
        progress(&format!("prefill {n} tokens × {reps}"));
        let runs = (0..reps)
            .map(|_| {
                let mut cache = m.new_cache();
                let t = Instant::now();
                m.prefill(&tokens[..n], &mut cache)?;
                Ok(n as f64 / t.elapsed().as_secs_f64())
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        figures.push(figure(format!("prefill-{n}"), n, runs));
    }

    progress(&format!(
        "encode {ENCODE_CHUNKS} chunks of {ENCODE_CHUNK} tokens × {reps}"
    ));
    let runs = (0..reps)
        .map(|_| encode_rate(m, tokens))
        .collect::<Result<Vec<_>, ModelError>>()?;
    figures.push(figure(
        format!("encode-{ENCODE_CHUNK}x{ENCODE_CHUNKS}"),
        ENCODE_CHUNK * ENCODE_CHUNKS,
        runs,
    ));

    progress(&format!(
        "decode {DECODE_TOKENS} tokens after {DECODE_PROMPT} × {reps}"
    ));
    let runs = (0..reps)
        .map(|_| decode_rate(m, tokens))
        .collect::<Result<Vec<_>, ModelError>>()?;
    figures.push(figure(
        format!("decode-after-{DECODE_PROMPT}"),
        DECODE_TOKENS,
        runs,
    ));
    Ok(figures)
}

/// Encode: what building a context tree does per chunk — a shared sink prefix, then each
/// chunk through every layer with its keys and values kept and no output head; tokens/s.
fn encode_rate(m: &Model, tokens: &[u32]) -> Result<f64, ModelError> {
    let prefix = &tokens[..ENCODE_PREFIX];
    let mut base = m.new_cache();
    m.prefill(prefix, &mut base)?;
    let t = Instant::now();
    for c in 0..ENCODE_CHUNKS {
        let start = ENCODE_PREFIX + c * ENCODE_CHUNK;
        let chunk = &tokens[start..start + ENCODE_CHUNK];
        let pos: Vec<u32> = (ENCODE_PREFIX as u32..(ENCODE_PREFIX + ENCODE_CHUNK) as u32).collect();
        let mut cache = base.fork()?;
        let f = Forward {
            keep_kv: true,
            ..Forward::all(m, &pos)
        };
        m.forward(&m.embed(chunk)?, &f, &mut cache)?;
    }
    Ok((ENCODE_CHUNKS * ENCODE_CHUNK) as f64 / t.elapsed().as_secs_f64())
}

/// Greedy decoding of `DECODE_TOKENS` after a `DECODE_PROMPT`-token prompt; tokens/s.
fn decode_rate(m: &Model, tokens: &[u32]) -> Result<f64, ModelError> {
    let mut cache = m.new_cache();
    let mut logits = m.prefill(&tokens[..DECODE_PROMPT], &mut cache)?;
    let t = Instant::now();
    for _ in 0..DECODE_TOKENS {
        let next = argmax(&logits.to_vec1::<f32>()?);
        logits = m.prefill(&[next], &mut cache)?;
    }
    Ok(DECODE_TOKENS as f64 / t.elapsed().as_secs_f64())
}

/// Tokens of the `--parity` prompt, and the share of its positions whose best token must be
/// the same on both devices.
pub const PARITY_TOKENS: usize = 512;
pub const PARITY_BAR: f64 = 0.99;

/// Logits of one model on two devices over the same prompt, position by position.
#[derive(Debug, Clone, Serialize)]
pub struct Parity {
    pub model: String,
    pub reference: String,
    pub device: String,
    pub positions: usize,
    /// Positions where both devices pick the same best token.
    pub argmax_agree: usize,
    pub argmax_agreement: f64,
    pub max_abs_delta: f32,
    pub mean_abs_delta: f32,
    /// Standard deviation of the reference's logits (the scale `max_abs_delta` is read on).
    pub logit_sd: f32,
    /// `argmax_agreement` reaches [`PARITY_BAR`].
    pub passed: bool,
}

/// Compare `other`'s logits at every position of `tokens` with `reference`'s (the same
/// weights on another device).
pub fn parity(
    model: String,
    reference: &Model,
    other: &Model,
    tokens: &[u32],
) -> Result<Parity, ModelError> {
    let a = all_logits(reference, tokens)?;
    let b = all_logits(other, tokens)?;
    let (mut agree, mut max, mut sum, mut count) = (0, 0f32, 0f64, 0usize);
    let (mut mean, mut square) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        agree += usize::from(argmax(x) == argmax(y));
        for (p, q) in x.iter().zip(y) {
            let d = (p - q).abs();
            max = max.max(d);
            sum += d as f64;
            mean += *p as f64;
            square += (*p as f64).powi(2);
        }
        count += x.len();
    }
    let n = count.max(1) as f64;
    mean /= n;
    let positions = a.len();
    let agreement = agree as f64 / positions.max(1) as f64;
    Ok(Parity {
        model,
        reference: crate::model::device_name(reference.device()).to_string(),
        device: crate::model::device_name(other.device()).to_string(),
        positions,
        argmax_agree: agree,
        argmax_agreement: agreement,
        max_abs_delta: max,
        mean_abs_delta: (sum / n) as f32,
        logit_sd: (square / n - mean * mean).max(0.0).sqrt() as f32,
        passed: positions > 0 && agreement >= PARITY_BAR,
    })
}

/// Logits `(n, vocab)` of every position of `tokens`, run as one causal prompt.
fn all_logits(m: &Model, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
    let positions: Vec<u32> = (0..tokens.len() as u32).collect();
    let f = Forward::all(m, &positions);
    let hidden = m.forward(&m.embed(tokens)?, &f, &mut m.new_cache())?.hidden;
    Ok(m.logits(&hidden)?.to_vec2::<f32>()?)
}

/// The parity figures as a line for people.
pub fn render_parity(p: &Parity) -> String {
    format!(
        "model   {}\nparity  {} against {} over {} positions: the best token agrees at {} ({:.1} %, bar {:.0} %); \
         max |Δ| {:.4}, mean |Δ| {:.5}, logit sd {:.3}\n",
        p.model,
        p.device,
        p.reference,
        p.positions,
        p.argmax_agree,
        100.0 * p.argmax_agreement,
        100.0 * PARITY_BAR,
        p.max_abs_delta,
        p.mean_abs_delta,
        p.logit_sd
    )
}

/// The report as a table for people.
pub fn render(r: &BenchReport) -> String {
    let mut out = format!(
        "model   {}\ndevice  {} ({} threads), loaded in {:.2} s, weights {}\n\n",
        r.model,
        r.device,
        r.threads,
        r.load_secs,
        crate::sys::human_bytes(r.weight_bytes as u64)
    );
    out += &format!(
        "{:<22} {:>8} {:>12} {:>20}\n",
        "figure", "tokens", "median tok/s", "min – max"
    );
    for f in &r.figures {
        out += &format!(
            "{:<22} {:>8} {:>12.1} {:>20}\n",
            f.name,
            f.tokens,
            f.median_tok_s,
            format!("{:.1} – {:.1}", f.min_tok_s, f.max_tok_s)
        );
    }
    if let Some(peak) = r.peak_rss_bytes {
        out += &format!("\npeak RSS {}\n", crate::sys::human_bytes(peak));
    }
    out
}
