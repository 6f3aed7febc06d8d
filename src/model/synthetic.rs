//! Models of a known shape on random weights, for speed figures without a file (`bench
//! --synthetic`): the speed of a shape before downloading it, and device checks on machines
//! a model file cannot reach. The weights are quantized to the formats the real checkpoints
//! ship in and loaded through the same code as a GGUF file's, so the kernels are the same.
//! [`write_gguf`] saves the same model as a GGUF file with a byte-level tokenizer and a
//! ChatML template, so the whole app (ingest, ask, eval) runs on it.

use std::path::Path;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::config::{Config, RopeScaling, RopeStyle};
use super::load::{build, linear_weights, Source, Weight};
use super::transformer::{Model, Weights};
use super::{ModelError, Result};

/// A model shape `bench --synthetic` can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// SmolLM2-135M-Instruct as the default GGUF ships it: Q4_1 projections, a Q8_0
    /// embedding that is also the head, LLaMA block.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    /// Qwen2.5-1.5B-Instruct about as Q4_K_M: Q4_K, with Q6_K for V, down and the tied
    /// embedding (llama.cpp gives Q6_K to some of the V and down matrices only).
    #[value(name = "qwen2.5-1.5b")]
    Qwen25_1_5b,
}

impl Shape {
    /// The name `--synthetic` takes.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Smollm2_135m => "smollm2-135m",
            Shape::Qwen25_1_5b => "qwen2.5-1.5b",
        }
    }

    fn config(self) -> Config {
        match self {
            Shape::Smollm2_135m => Config {
                arch: "llama".into(),
                name: "synthetic smollm2-135m".into(),
                n_layer: 30,
                d_model: 576,
                n_head: 9,
                n_kv_head: 3,
                head_dim: 64,
                d_ff: 1536,
                vocab_size: 49152,
                rms_eps: 1e-5,
                rope_theta: 100_000.0,
                rope_style: RopeStyle::Interleaved,
                rope_scaling: RopeScaling::None,
                context_length: 8192,
                attention_bias: false,
            },
            Shape::Qwen25_1_5b => Config {
                arch: "qwen2".into(),
                name: "synthetic qwen2.5-1.5b".into(),
                n_layer: 28,
                d_model: 1536,
                n_head: 12,
                n_kv_head: 2,
                head_dim: 128,
                d_ff: 8960,
                vocab_size: 151_936,
                rms_eps: 1e-6,
                rope_theta: 1_000_000.0,
                rope_style: RopeStyle::Neox,
                rope_scaling: RopeScaling::None,
                context_length: 32_768,
                attention_bias: true,
            },
        }
    }

    /// Mean and standard deviation of weight `w`'s values. GPT-2's initialisation: 0.02,
    /// the projections that write into the residual stream scaled by 1/√(2 layers), norms
    /// near 1. Plain 0.02 everywhere gives near-flat logits (the best two tokens of SmolLM2's
    /// shape 0.08 apart at the median, 0.78 in the real model), so two correct kernels
    /// disagree on the argmax at a few % of positions; the checkpoints' own scales (SmolLM2's
    /// are about 0.2) make a random 30-layer net chaotic. The embedding, which is also the
    /// head, is scaled so the best logit stands about as far above the rest as in the real
    /// checkpoint (5–7 standard deviations).
    fn scale(self, w: Weight) -> (f32, f32) {
        let residual = 0.02 / (2.0 * self.config().n_layer as f32).sqrt();
        match w {
            Weight::AttnNorm(_) | Weight::FfnNorm(_) | Weight::OutputNorm => (1.0, 0.05),
            Weight::O(_) | Weight::Down(_) => (0.0, residual),
            Weight::Embed | Weight::Output => match self {
                Shape::Smollm2_135m => (0.0, 0.05),
                Shape::Qwen25_1_5b => (0.0, 0.1),
            },
            _ => (0.0, 0.02),
        }
    }

    /// The block format of weight `w` in the checkpoint this shape stands for.
    fn format(self, w: Weight) -> GgmlDType {
        match (self, w) {
            (Shape::Smollm2_135m, Weight::Embed) => GgmlDType::Q8_0,
            (Shape::Smollm2_135m, _) => GgmlDType::Q4_1,
            (Shape::Qwen25_1_5b, Weight::V(_) | Weight::Down(_) | Weight::Embed) => GgmlDType::Q6K,
            (Shape::Qwen25_1_5b, _) => GgmlDType::Q4K,
        }
    }
}

/// Random weights of `shape` on `device`, the same for the same `seed`.
pub fn model(shape: Shape, seed: u64, device: &Device) -> Result<Model> {
    let mut src = Random::new(shape, seed, device);
    let mut m = build(shape.config(), device, &mut src, true)?;
    // As a GGUF model: llama.cpp's f16 rounding of Q, K, V.
    m.kv_f16 = true;
    Ok(m)
}

/// Write [`model`]`(shape, seed)` to `path` as a GGUF file (through a temporary file beside
/// it, so a stopped write leaves nothing half-written) with a byte-level tokenizer (one
/// token per byte; the rest of the vocabulary are words the tokenizer never produces) and
/// ChatML. Returns the file's size.
pub fn write_gguf(shape: Shape, seed: u64, path: &Path) -> Result<u64> {
    let mut src = Random::new(shape, seed, &Device::Cpu);
    src.record = Some(Vec::new());
    let config = shape.config();
    build(config.clone(), &Device::Cpu, &mut src, true)?;
    let tensors = src.record.take().unwrap_or_default();
    let metadata = gguf_metadata(shape, &config);
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile appends "at path <temp name>": the user named `path`.
    let io = |e: std::io::Error| {
        let e = e.to_string();
        let e = e.split(" at path ").next().unwrap_or_default();
        ModelError::Io(format!("cannot write {}: {e}", path.display()))
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        gguf_file::write(&mut w, &metadata, &tensors)?;
        std::io::Write::flush(&mut w).map_err(io)?;
    }
    let bytes = tmp.as_file().metadata().map_err(io)?.len();
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(bytes)
}

/// Special tokens of the synthetic vocabulary, at ids 0, 1, 2 as in SmolLM2.
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, as SmolLM2 and Qwen2.5 use it.
const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The GGUF metadata llama.cpp writes for `config`, with the synthetic tokenizer.
fn gguf_metadata(shape: Shape, c: &Config) -> Vec<(String, Value)> {
    let a = |key: &str| format!("{}.{key}", c.arch);
    let u = |n: usize| Value::U32(n as u32);
    let tokens = vocabulary(c.vocab_size);
    let types = (0..tokens.len())
        .map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    vec![
        ("general.architecture".into(), Value::String(c.arch.clone())),
        (
            "general.name".into(),
            Value::String(format!("{} (random weights)", c.name)),
        ),
        (a("block_count"), u(c.n_layer)),
        (a("context_length"), u(c.context_length)),
        (a("embedding_length"), u(c.d_model)),
        (a("feed_forward_length"), u(c.d_ff)),
        (a("attention.head_count"), u(c.n_head)),
        (a("attention.head_count_kv"), u(c.n_kv_head)),
        (a("attention.key_length"), u(c.head_dim)),
        (a("attention.value_length"), u(c.head_dim)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_eps as f32),
        ),
        (a("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(
                match shape {
                    Shape::Smollm2_135m => "smollm",
                    Shape::Qwen25_1_5b => "qwen2",
                }
                .into(),
            ),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
        ("tokenizer.ggml.padding_token_id".into(), u(0)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML.into()),
        ),
    ]
}

/// `n` token texts: the specials, the 256 bytes as GPT-2's byte-level alphabet spells them
/// (printable bytes as themselves, the rest shifted past 255), then " w<i>" words.
fn vocabulary(n: usize) -> Vec<String> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut shifted = 0u32;
    let bytes = (0..=255u8).map(|b| {
        let c = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or('?')
        };
        c.to_string()
    });
    let mut v: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    v.extend(bytes);
    // 'Ġ' is the byte-level space.
    let words = (v.len()..n).map(|i| format!("\u{120}w{i}"));
    v.extend(words);
    v.truncate(n);
    v
}

/// `n` token ids of `vocab`, the same for the same `seed` (no tokenizer needed).
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

struct Random<'a> {
    shape: Shape,
    rng: StdRng,
    device: &'a Device,
    /// The embedding's blocks: a GPU lookup table is read back from them, as from a file.
    embed: Option<QTensor>,
    /// Every tensor made, under its GGUF name, as the file stores it (for [`write_gguf`]).
    record: Option<Vec<(String, QTensor)>>,
}

impl<'a> Random<'a> {
    fn new(shape: Shape, seed: u64, device: &'a Device) -> Self {
        Self {
            shape,
            rng: StdRng::seed_from_u64(seed),
            device,
            embed: None,
            record: None,
        }
    }

    /// Uniform values of standard deviation `sd` around `mean`, on the CPU. Drawn in
    /// parallel (a 1.5B shape is 1.5G draws): each piece has its own stream, seeded from the
    /// tensor's seed and the piece's index, so the values do not depend on the thread count.
    fn values(&mut self, shape: &[usize], mean: f32, sd: f32) -> Vec<f32> {
        const PIECE: usize = 1 << 16;
        let half = sd * 3f32.sqrt();
        let seed: u64 = self.rng.random();
        let mut v = vec![0f32; shape.iter().product()];
        v.par_chunks_mut(PIECE).enumerate().for_each(|(i, piece)| {
            let mut rng =
                StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for x in piece {
                *x = mean + rng.random_range(-half..half);
            }
        });
        v
    }
}

/// The blocks of `values` (rows of `cols`) quantized to `format`, row groups in parallel: a
/// row's blocks depend on that row alone, so the bytes are those of quantizing the matrix
/// whole (candle does it on one thread: a minute for the 1.5B shape).
fn quantize(values: &[f32], cols: usize, format: GgmlDType) -> Result<Vec<u8>> {
    const ROWS: usize = 256;
    let pieces: Vec<Vec<u8>> = values
        .par_chunks(ROWS * cols)
        .map(|piece| {
            let t = Tensor::from_slice(piece, (piece.len() / cols, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&t, format)?.data()?.into_owned())
        })
        .collect::<Result<_>>()?;
    Ok(pieces.concat())
}

impl Source for Random<'_> {
    fn get(&mut self, w: Weight, shape: &[usize]) -> Result<Tensor> {
        if let (Weight::Embed, Some(q)) = (w, &self.embed) {
            return Ok(q.dequantize(self.device)?);
        }
        let (mean, sd) = self.shape.scale(w);
        let t = Tensor::from_vec(self.values(shape, mean, sd), shape, &Device::Cpu)?;
        if let Some(record) = &mut self.record {
            record.push((w.gguf(), QTensor::quantize(&t, GgmlDType::F32)?));
        }
        Ok(t.to_device(self.device)?)
    }

    fn has(&self, w: Weight) -> bool {
        // No separate output head (tied); biases where the architecture has them.
        match w {
            Weight::Output => false,
            Weight::QBias(_) | Weight::KBias(_) | Weight::VBias(_) => {
                self.shape.config().attention_bias
            }
            _ => true,
        }
    }

    fn get_linear(&mut self, w: Weight, shape: &[usize]) -> Result<Weights> {
        let (mean, sd) = self.shape.scale(w);
        let format = self.shape.format(w);
        let blocks = quantize(&self.values(shape, mean, sd), shape[1], format)?;
        let copy = |device: &Device| qtensor_from_ggml(format, &blocks, shape.to_vec(), device);
        let q = copy(&Device::Cpu)?;
        if let Some(record) = &mut self.record {
            record.push((w.gguf(), copy(&Device::Cpu)?));
        }
        if let Weight::Embed = w {
            self.embed = Some(copy(&Device::Cpu)?);
        }
        let device = self.device;
        linear_weights(&w.gguf(), q, shape, device, &mut || Ok(copy(device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_model_and_tokens() -> Result<()> {
        let ids = tokens(64, 49152, 7);
        assert_eq!(ids, tokens(64, 49152, 7));
        assert!(ids.iter().all(|&t| t < 49152));
        assert_ne!(ids, tokens(64, 49152, 8));
        let a = model(Shape::Smollm2_135m, 1, &Device::Cpu)?;
        let b = model(Shape::Smollm2_135m, 1, &Device::Cpu)?;
        let (la, lb) = (
            a.prefill(&ids[..8], &mut a.new_cache())?,
            b.prefill(&ids[..8], &mut b.new_cache())?,
        );
        assert_eq!(la.to_vec1::<f32>()?, lb.to_vec1::<f32>()?);
        assert_eq!(la.dims(), &[49152]);
        let logits = la.to_vec1::<f32>()?;
        assert!(logits.iter().all(|x| x.is_finite()));
        // The best token stands clear of the rest, as in a trained model: a device check's
        // argmax agreement then measures the kernels, not ties.
        let n = logits.len() as f32;
        let mean = logits.iter().sum::<f32>() / n;
        let sd = (logits.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
        let best = logits[crate::model::argmax(&logits) as usize];
        assert!(
            (best - mean) / sd > 4.0,
            "best logit {best}, mean {mean}, sd {sd}"
        );
        Ok(())
    }

    #[test]
    fn row_groups_quantize_to_the_bytes_of_the_whole() -> Result<()> {
        let mut src = Random::new(Shape::Qwen25_1_5b, 5, &Device::Cpu);
        let v = src.values(&[600, 512], 0.0, 0.02);
        let f = Tensor::from_slice(&v, (600, 512), &Device::Cpu)?;
        for format in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let whole = QTensor::quantize(&f, format)?;
            let same = quantize(&v, 512, format)? == whole.data()?.as_ref();
            assert!(
                same,
                "{format:?}: the row groups' bytes differ from the whole's"
            );
        }
        Ok(())
    }

    #[test]
    fn the_written_gguf_is_the_same_model_with_a_byte_tokenizer() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("synthetic.gguf");
        let bytes = write_gguf(Shape::Smollm2_135m, 3, &path)?;
        assert_eq!(bytes, std::fs::metadata(&path)?.len());
        let llm = crate::model::load(&path, &Device::Cpu)?;
        let m = model(Shape::Smollm2_135m, 3, &Device::Cpu)?;
        assert_eq!(llm.model.weight_bytes(), m.weight_bytes());
        let ids = tokens(8, 49152, 3);
        let (a, b) = (
            llm.model.prefill(&ids, &mut llm.model.new_cache())?,
            m.prefill(&ids, &mut m.new_cache())?,
        );
        assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);

        let text = "Hi there,\n\tcafé 42!";
        let t = &llm.tokenizer;
        let ids = t.encode(text, false)?;
        assert_eq!(ids.len(), text.len(), "one token per byte: {ids:?}");
        assert_eq!(t.decode(&ids)?, text);
        assert_eq!(t.encode("<|im_end|>", true)?, vec![2]);
        assert_eq!(t.decode(&[300, 301])?, " w300 w301");
        let prompt = llm
            .chat
            .render(&[crate::model::Message::user("Q?")], true)?;
        assert!(prompt.ends_with("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"));
        Ok(())
    }
}
