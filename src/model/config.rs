//! The transformer's shape, read from GGUF metadata or a Hugging Face `config.json`.
//!
//! The checkpoint formats (`HfConfig`, GGUF keys) are converted into one runtime [`Config`]
//! so the forward never looks at where the weights came from.

use serde::Deserialize;

use super::{ModelError, Result};

/// How query/key pairs are rotated.
///
/// llama.cpp's GGUF converter permutes the rows of `attn_q`/`attn_k` for LLaMA so that RoPE
/// rotates *adjacent* pairs `(2i, 2i+1)`; Hugging Face checkpoints (and GGUF `qwen2`) keep
/// the original layout, where dimension `i` pairs with `i + head_dim/2` ("NEOX" style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    Neox,
}

/// Frequency scaling for long-context checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x: per-frequency factors (arXiv 2407.21783, HF `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: f64,
    },
    /// GGUF `rope_freqs.weight`: each inverse frequency is divided by its factor.
    Factors(Vec<f32>),
}

/// Everything the forward needs to know about the network's shape.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: String,
    pub name: String,
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    /// The native window the model was trained for.
    pub context_length: usize,
    /// Qwen2 has biases on q, k and v.
    pub attention_bias: bool,
}

impl Config {
    /// Inverse frequencies of the rotary embedding, one per rotated pair.
    pub fn inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(factors) => base
                .iter()
                .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, s)| f / *s as f64)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Per rotated pair, what the plain angle is divided by (1 without scaling).
    pub fn rope_divisors(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        match &self.rope_scaling {
            RopeScaling::None => vec![1.0; half],
            RopeScaling::Linear { factor } => vec![*factor as f32; half],
            RopeScaling::Factors(f) => (0..half)
                .map(|i| f.get(i).copied().unwrap_or(1.0))
                .collect(),
            RopeScaling::Llama3 { .. } => {
                let plain = Self {
                    rope_scaling: RopeScaling::None,
                    ..self.clone()
                }
                .inv_freq();
                plain
                    .iter()
                    .zip(self.inv_freq())
                    .map(|(p, s)| (p / s) as f32)
                    .collect()
            }
        }
    }

    pub(crate) fn validate(self) -> Result<Self> {
        let bad = |what: String| Err(ModelError::Format(what));
        if self.n_layer == 0 || self.d_model == 0 || self.n_head == 0 || self.n_kv_head == 0 {
            return bad("layer, width and head counts must be positive".into());
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!(
                "{} attention heads do not divide into {} key/value heads",
                self.n_head, self.n_kv_head
            ));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return bad(format!("head dimension {} is not even", self.head_dim));
        }
        Ok(self)
    }
}

/// `config.json` of a Hugging Face LLaMA-family checkpoint (the fields slm-chat reads).
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_context")]
    max_position_embeddings: usize,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    pub(crate) tie_word_embeddings: bool,
}

fn default_rms_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_context() -> usize {
    4096
}

/// Model types whose blocks are the LLaMA block (RMSNorm, RoPE, GQA, SwiGLU).
const HF_LLAMA_FAMILY: &[&str] = &["llama", "mistral", "qwen2"];

impl HfConfig {
    pub(crate) fn into_config(self) -> Result<Config> {
        let model_type = self.model_type.clone().unwrap_or_default();
        if !HF_LLAMA_FAMILY.contains(&model_type.as_str()) {
            return Err(ModelError::UnsupportedArch(if model_type.is_empty() {
                self.architectures.join(",")
            } else {
                model_type
            }));
        }
        let rope_scaling = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => RopeScaling::None,
            Some(v) => parse_hf_rope_scaling(v)?,
        };
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        Config {
            name: model_type.clone(),
            attention_bias: self.attention_bias.unwrap_or(model_type == "qwen2"),
            arch: model_type,
            n_layer: self.num_hidden_layers,
            d_model: self.hidden_size,
            n_head: self.num_attention_heads,
            n_kv_head: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            d_ff: self.intermediate_size,
            vocab_size: self.vocab_size,
            rms_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_style: RopeStyle::Neox,
            rope_scaling,
            context_length: self.max_position_embeddings,
        }
        .validate()
    }
}

fn parse_hf_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let num = |key: &str| v.get(key).and_then(|x| x.as_f64());
    let factor = num("factor").unwrap_or(1.0);
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position: num("original_max_position_embeddings").unwrap_or(8192.0),
        }),
        other => Err(ModelError::Format(format!(
            "rope scaling '{other}' is not supported (supported: linear, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config {
            arch: "llama".into(),
            name: "t".into(),
            n_layer: 1,
            d_model: 8,
            n_head: 2,
            n_kv_head: 1,
            head_dim: 4,
            d_ff: 8,
            vocab_size: 10,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Interleaved,
            rope_scaling: RopeScaling::None,
            context_length: 16,
            attention_bias: false,
        }
    }

    #[test]
    fn inverse_frequencies_follow_the_rope_formula() {
        let f = base().inv_freq();
        assert_eq!(f.len(), 2);
        assert!((f[0] - 1.0).abs() < 1e-12);
        assert!((f[1] - 0.01).abs() < 1e-12);
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let mut c = base();
        c.head_dim = 128;
        c.rope_theta = 500_000.0;
        c.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        };
        let scaled = c.inv_freq();
        c.rope_scaling = RopeScaling::None;
        let plain = c.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-15);
    }

    #[test]
    fn heads_must_divide_into_kv_heads() {
        let mut c = base();
        c.n_kv_head = 3;
        assert!(c.validate().is_err());
    }
}
