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
    pub(crate) fn new(
        inv_freq: &[f64],
        style: RopeStyle,
        positions: &[u32],
        device: &Device,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                // f64 angles: positions reach 10^5 and f32 would lose the phase.
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let shape = (positions.len(), half);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
            style,
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

/// Tables for `config` at `positions`.
pub(crate) fn tables(config: &Config, positions: &[u32], device: &Device) -> Result<RopeTables> {
    RopeTables::new(&config.inv_freq(), config.rope_style, positions, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_rotates_adjacent_pairs_and_neox_rotates_halves() -> Result<()> {
        let dev = Device::Cpu;
        // One head, one token at position 1, head_dim 4, inverse frequencies 1 and 0.5.
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &dev)?;
        let (c1, s1, c2, s2) = (1f32.cos(), 1f32.sin(), 0.5f32.cos(), 0.5f32.sin());
        let i = RopeTables::new(&[1.0, 0.5], RopeStyle::Interleaved, &[1], &dev)?.apply(&x)?;
        let want_i = [
            1. * c1 - 2. * s1,
            1. * s1 + 2. * c1,
            3. * c2 - 4. * s2,
            3. * s2 + 4. * c2,
        ];
        let n = RopeTables::new(&[1.0, 0.5], RopeStyle::Neox, &[1], &dev)?.apply(&x)?;
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
