//! Rotary position embedding at arbitrary positions.
//!
//! Positions are given per token rather than as a start offset, because injected context
//! entries take positions chosen at question time (contiguous after the prompt prefix, or
//! the paper's chunk ids). Tables are computed for exactly the positions asked for, so there
//! is no maximum length.

use candle_core::{Device, Tensor};

use super::config::{Config, RopeStyle};
use super::Result;

/// Cosine and sine tables `(n, head_dim/2)` for a list of positions.
#[derive(Debug, Clone)]
pub(crate) struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl RopeTables {
    /// Tables for `config` at `positions`.
    ///
    /// Angles are computed as llama.cpp does: `theta = p`, multiplied by
    /// `base^(-2/head_dim)` once per pair in f32, each divided by its scaling divisor.
    /// Following its rounding keeps our logits next to llama.cpp's.
    pub(crate) fn new(config: &Config, positions: &[u32], device: &Device) -> Result<Self> {
        let divisors = config.rope_divisors();
        let half = divisors.len();
        let step = (config.rope_theta as f32).powf(-2.0 / config.head_dim as f32);
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let mut theta = p as f32;
            for &div in &divisors {
                let a = theta / div;
                cos.push(a.cos());
                sin.push(a.sin());
                theta *= step;
            }
        }
        let shape = (positions.len(), half);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
            style: config.rope_style,
        })
    }

    /// Rotate `x` of shape `(heads, n, head_dim)` (contiguous), one position per row.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.unsqueeze(0)?;
        let out = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &self.cos, &self.sin)?,
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&x, &self.cos, &self.sin)?,
        };
        Ok(out.squeeze(0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(style: RopeStyle) -> Config {
        // head_dim 4 and base 4: inverse frequencies 1 and 0.5.
        Config {
            arch: "llama".into(),
            name: "t".into(),
            n_layer: 1,
            d_model: 4,
            n_head: 1,
            n_kv_head: 1,
            head_dim: 4,
            d_ff: 4,
            vocab_size: 4,
            rms_eps: 1e-5,
            rope_theta: 4.0,
            rope_style: style,
            rope_scaling: crate::model::RopeScaling::None,
            context_length: 8,
            attention_bias: false,
        }
    }

    #[test]
    fn interleaved_rotates_adjacent_pairs_and_neox_rotates_halves() -> Result<()> {
        let dev = Device::Cpu;
        // One head, one token at position 1.
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &dev)?;
        let (c1, s1, c2, s2) = (1f32.cos(), 1f32.sin(), 0.5f32.cos(), 0.5f32.sin());
        let i = RopeTables::new(&config(RopeStyle::Interleaved), &[1], &dev)?.apply(&x)?;
        let want_i = [
            1. * c1 - 2. * s1,
            1. * s1 + 2. * c1,
            3. * c2 - 4. * s2,
            3. * s2 + 4. * c2,
        ];
        let n = RopeTables::new(&config(RopeStyle::Neox), &[1], &dev)?.apply(&x)?;
        let want_n = [
            1. * c1 - 3. * s1,
            2. * c2 - 4. * s2,
            3. * c1 + 1. * s1,
            4. * c2 + 2. * s2,
        ];
        let got_i = i.flatten_all()?.to_vec1::<f32>()?;
        let got_n = n.flatten_all()?.to_vec1::<f32>()?;
        for k in 0..4 {
            assert!((got_i[k] - want_i[k]).abs() < 1e-6, "{got_i:?} {want_i:?}");
            assert!((got_n[k] - want_n[k]).abs() < 1e-6, "{got_n:?} {want_n:?}");
        }
        Ok(())
    }
}
