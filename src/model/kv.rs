//! The key/value cache: per layer, the rotated keys and the values every new token may attend to.
//!
//! The cache holds whatever precedes the tokens being run: the model's own earlier tokens,
//! and KV injected from elsewhere (context-tree nodes), already rotated at the positions
//! assigned to them. It is kept outside the weights so the same model serves many caches.

use candle_core::{DType, Device, Tensor};

use super::Result;

/// Growth step, in entries: preallocating avoids re-copying the whole cache on every token.
const GROW: usize = 256;

#[derive(Debug)]
struct LayerKv {
    /// `(n_kv_head, capacity, head_dim)`, rotated keys.
    k: Tensor,
    /// `(n_kv_head, capacity, head_dim)`.
    v: Tensor,
}

/// Rotated keys and values, per layer, with one shared length.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    lens: Vec<usize>,
    /// Position of the next token minus `len()`: non-zero when injected entries share
    /// positions (the paper's chunk-level ids).
    shift: i64,
    /// Per layer, added to the attention logit of entry `i` for every query; entries past
    /// its end add nothing. Empty for a cache the model filled itself.
    bias: Vec<Vec<f32>>,
    n_kv_head: usize,
    head_dim: usize,
    device: Device,
}

impl KvCache {
    pub(crate) fn new(n_layer: usize, n_kv_head: usize, head_dim: usize, device: &Device) -> Self {
        Self {
            layers: (0..n_layer).map(|_| None).collect(),
            lens: vec![0; n_layer],
            shift: 0,
            bias: vec![Vec::new(); n_layer],
            n_kv_head,
            head_dim,
            device: device.clone(),
        }
    }

    /// Layers this cache has room for.
    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }

    /// Make room for `total` entries per layer now, so a generation that will reach that
    /// length never regrows (and copies) the cache mid-answer.
    pub fn reserve(&mut self, total: usize) -> Result<()> {
        for layer in 0..self.layers.len() {
            self.grow(layer, total)?;
        }
        Ok(())
    }

    /// Entries held by layer `layer`.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    /// Entries held by layer 0 (all layers agree unless a layer range was run on its own).
    pub fn len(&self) -> usize {
        self.lens.first().copied().unwrap_or(0)
    }

    /// The position the next token run through this cache takes.
    pub fn next_position(&self) -> usize {
        (self.len() as i64 + self.shift).max(0) as usize
    }

    /// Make the next token take position `pos` (later tokens follow it).
    pub fn set_next_position(&mut self, pos: usize) {
        self.shift = pos as i64 - self.len() as i64;
    }

    /// No entries yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the cache holds in entries (not capacity).
    pub fn bytes(&self) -> usize {
        self.lens.iter().sum::<usize>() * 2 * self.n_kv_head * self.head_dim * 4
    }

    /// A deep copy of every layer's entries.
    ///
    /// Appending writes into preallocated storage in place, so sharing storage between two
    /// caches would let one overwrite the other; a fork never shares.
    pub fn fork(&self) -> Result<Self> {
        self.fork_first(usize::MAX)
    }

    /// A deep copy of at most the first `n` entries of every layer (a prompt's shared
    /// beginning, kept while what followed it changes).
    pub fn fork_first(&self, n: usize) -> Result<Self> {
        let mut out = Self::new(
            self.layers.len(),
            self.n_kv_head,
            self.head_dim,
            &self.device,
        );
        out.shift = self.shift;
        out.bias = self
            .bias
            .iter()
            .map(|b| b[..b.len().min(n)].to_vec())
            .collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let keep = self.lens[i].min(n);
            if let (Some(l), true) = (layer, keep > 0) {
                out.append(i, &l.k.narrow(1, 0, keep)?, &l.v.narrow(1, 0, keep)?)?;
            }
        }
        Ok(out)
    }

    /// Add `bias` to the attention logit of entries `[from, from + n)` for every query that
    /// attends to them, in every layer that holds them now (layers run on their own, as
    /// with M < N, may hold fewer): `ln 2` weighs an entry as two copies of it, `-inf` hides
    /// it. Injected KV the model was not trained on is weighed down this way.
    pub fn set_logit_bias(&mut self, from: usize, n: usize, bias: f32) -> Result<()> {
        // +inf would make a softmax row inf - inf = NaN.
        if from + n > self.len() || !(bias.is_finite() || bias == f32::NEG_INFINITY) {
            return Err(super::ModelError::Input(format!(
                "logit bias {bias} for entries {from}..{} of a cache of {}",
                from + n,
                self.len()
            )));
        }
        for (b, &len) in self.bias.iter_mut().zip(&self.lens) {
            if len >= from + n {
                if b.len() < from + n {
                    b.resize(from + n, 0.0);
                }
                b[from..from + n].fill(bias);
            }
        }
        Ok(())
    }

    /// The logit bias of layer `layer`'s first entries (shorter than the layer when the rest
    /// add none).
    pub fn logit_bias(&self, layer: usize) -> &[f32] {
        &self.bias[layer]
    }

    /// Append rotated keys and values `(n_kv_head, n, head_dim)` to layer `layer`.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dim(1)?;
        let len = self.lens[layer];
        let need = len + n;
        self.grow(layer, need)?;
        if let Some(l) = &self.layers[layer] {
            l.k.slice_set(&k.contiguous()?, 1, len)?;
            l.v.slice_set(&v.contiguous()?, 1, len)?;
        }
        self.lens[layer] = need;
        Ok(())
    }

    /// Ensure layer `layer` can hold `need` entries (doubling, in steps of `GROW`).
    fn grow(&mut self, layer: usize, need: usize) -> Result<()> {
        let len = self.lens[layer];
        let capacity = self.layers[layer]
            .as_ref()
            .map(|l| l.k.dim(1))
            .transpose()?
            .unwrap_or(0);
        if need > capacity {
            let new_cap = (need.max(capacity * 2)).div_ceil(GROW) * GROW;
            let shape = (self.n_kv_head, new_cap, self.head_dim);
            let nk = Tensor::zeros(shape, DType::F32, &self.device)?;
            let nv = Tensor::zeros(shape, DType::F32, &self.device)?;
            if let Some(old) = &self.layers[layer] {
                if len > 0 {
                    nk.slice_set(&old.k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                    nv.slice_set(&old.v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
            }
            self.layers[layer] = Some(LayerKv { k: nk, v: nv });
        }
        Ok(())
    }

    /// Keys and values `[start, start+n)` of layer `layer`, as views `(n_kv_head, n, head_dim)`.
    pub(crate) fn range(
        &self,
        layer: usize,
        start: usize,
        n: usize,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if n == 0 {
            return Ok(None);
        }
        match &self.layers[layer] {
            Some(l) => Ok(Some((l.k.narrow(1, start, n)?, l.v.narrow(1, start, n)?))),
            None => Ok(None),
        }
    }
}
