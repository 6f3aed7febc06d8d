//! Models of a known shape on random weights, for speed figures without a file (`bench
//! --synthetic`): the speed of a shape before downloading it, and device checks on machines
//! a model file cannot reach. The weights are quantized to the formats the real checkpoints
//! ship in and loaded through the same code as a GGUF file's, so the kernels are the same.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{Config, RopeScaling, RopeStyle};
use super::load::{build, linear_weights, Source, Weight};
use super::transformer::{Model, Weights};
use super::Result;

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
    let mut src = Random {
        shape,
        rng: StdRng::seed_from_u64(seed),
        device,
        embed: None,
    };
    let mut m = build(shape.config(), device, &mut src, true)?;
    // As a GGUF model: llama.cpp's f16 rounding of Q, K, V.
    m.kv_f16 = true;
    Ok(m)
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
}

impl Random<'_> {
    /// Uniform values of standard deviation `sd` around `mean`, on the CPU.
    fn values(&mut self, shape: &[usize], mean: f32, sd: f32) -> Result<Tensor> {
        let half = sd * 3f32.sqrt();
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| mean + self.rng.random_range(-half..half))
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

impl Source for Random<'_> {
    fn get(&mut self, w: Weight, shape: &[usize]) -> Result<Tensor> {
        if let (Weight::Embed, Some(q)) = (w, &self.embed) {
            return Ok(q.dequantize(self.device)?);
        }
        // Norm weights near 1, everything else small, as trained checkpoints have them.
        let t = match w {
            Weight::AttnNorm(_) | Weight::FfnNorm(_) | Weight::OutputNorm => {
                self.values(shape, 1.0, 0.05)?
            }
            _ => self.values(shape, 0.0, 0.02)?,
        };
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
        let f = self.values(shape, 0.0, 0.02)?;
        let format = self.shape.format(w);
        let q = QTensor::quantize(&f, format)?;
        if let Weight::Embed = w {
            self.embed = Some(QTensor::quantize(&f, format)?);
        }
        let device = self.device;
        linear_weights(&w.gguf(), q, shape, device, &mut || {
            Ok(QTensor::quantize_onto(&f, format, device)?)
        })
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
        assert!(la.to_vec1::<f32>()?.iter().all(|x| x.is_finite()));
        Ok(())
    }
}
