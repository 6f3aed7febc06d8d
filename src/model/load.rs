//! Reading weights: GGUF files (quantized, as llama.cpp writes them) and Hugging Face
//! folders (`config.json` + `*.safetensors`).
//!
//! Both end up as the same [`Model`]; tensors are named by [`Weight`] and each format maps
//! those names to its own.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{Config, HfConfig, RopeScaling, RopeStyle};
use super::quant::{QuantMatrix, Unsupported};
use super::transformer::{Attention, Block, Embedding, Fused, Linear, Mlp, Model, Weights};
use super::{first_line, ModelError, Result};

/// GGUF architectures whose blocks are the LLaMA block.
const GGUF_ARCHS: &[&str] = &["llama", "qwen2"];

/// The tensors of a LLaMA-family checkpoint.
#[derive(Debug, Clone, Copy)]
pub(super) enum Weight {
    Embed,
    OutputNorm,
    Output,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    QBias(usize),
    KBias(usize),
    VBias(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl Weight {
    pub(super) fn gguf(self) -> String {
        use Weight::*;
        match self {
            Embed => "token_embd.weight".into(),
            OutputNorm => "output_norm.weight".into(),
            Output => "output.weight".into(),
            AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
            Q(i) => format!("blk.{i}.attn_q.weight"),
            K(i) => format!("blk.{i}.attn_k.weight"),
            V(i) => format!("blk.{i}.attn_v.weight"),
            QBias(i) => format!("blk.{i}.attn_q.bias"),
            KBias(i) => format!("blk.{i}.attn_k.bias"),
            VBias(i) => format!("blk.{i}.attn_v.bias"),
            O(i) => format!("blk.{i}.attn_output.weight"),
            FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
            Gate(i) => format!("blk.{i}.ffn_gate.weight"),
            Up(i) => format!("blk.{i}.ffn_up.weight"),
            Down(i) => format!("blk.{i}.ffn_down.weight"),
        }
    }

    fn hf(self) -> String {
        use Weight::*;
        match self {
            Embed => "model.embed_tokens.weight".into(),
            OutputNorm => "model.norm.weight".into(),
            Output => "lm_head.weight".into(),
            AttnNorm(i) => format!("model.layers.{i}.input_layernorm.weight"),
            Q(i) => format!("model.layers.{i}.self_attn.q_proj.weight"),
            K(i) => format!("model.layers.{i}.self_attn.k_proj.weight"),
            V(i) => format!("model.layers.{i}.self_attn.v_proj.weight"),
            QBias(i) => format!("model.layers.{i}.self_attn.q_proj.bias"),
            KBias(i) => format!("model.layers.{i}.self_attn.k_proj.bias"),
            VBias(i) => format!("model.layers.{i}.self_attn.v_proj.bias"),
            O(i) => format!("model.layers.{i}.self_attn.o_proj.weight"),
            FfnNorm(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
            Gate(i) => format!("model.layers.{i}.mlp.gate_proj.weight"),
            Up(i) => format!("model.layers.{i}.mlp.up_proj.weight"),
            Down(i) => format!("model.layers.{i}.mlp.down_proj.weight"),
        }
    }
}

/// Where tensors come from, as f32 on the model's device.
pub(super) trait Source {
    fn get(&mut self, w: Weight, shape: &[usize]) -> Result<Tensor>;
    fn has(&self, w: Weight) -> bool;
    /// A projection's weight `(out, in)` in the form the forward multiplies fastest.
    fn get_linear(&mut self, w: Weight, shape: &[usize]) -> Result<Weights> {
        Ok(Weights::Dense(self.get(w, shape)?))
    }
}

/// Build a model from any source: the one place that knows the block's tensor layout.
pub(super) fn build(
    config: Config,
    device: &Device,
    src: &mut dyn Source,
    tied: bool,
) -> Result<Model> {
    let c = &config;
    let (d, q_out, kv_out) = (c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
    let linear = |src: &mut dyn Source, w: Weight, b: Option<Weight>, out: usize, inp: usize| {
        let bias = match b {
            Some(b) if c.attention_bias || src.has(b) => Some(src.get(b, &[out])?),
            _ => None,
        };
        Ok::<_, ModelError>(Linear::new(src.get_linear(w, &[out, inp])?, bias))
    };
    // No capacity hint: `n_layer` comes from the file, and a damaged count must fail on its
    // first missing tensor, not abort on a huge allocation.
    let mut blocks = Vec::new();
    for i in 0..c.n_layer {
        let qkv = vec![
            linear(src, Weight::Q(i), Some(Weight::QBias(i)), q_out, d)?,
            linear(src, Weight::K(i), Some(Weight::KBias(i)), kv_out, d)?,
            linear(src, Weight::V(i), Some(Weight::VBias(i)), kv_out, d)?,
        ];
        let attn = Attention {
            qkv: Fused::new(qkv, vec![q_out, kv_out, kv_out])?,
            o: linear(src, Weight::O(i), None, d, q_out)?,
        };
        let gate_up = vec![
            linear(src, Weight::Gate(i), None, c.d_ff, d)?,
            linear(src, Weight::Up(i), None, c.d_ff, d)?,
        ];
        let mlp = Mlp {
            gate_up: Fused::new(gate_up, vec![c.d_ff, c.d_ff])?,
            down: linear(src, Weight::Down(i), None, d, c.d_ff)?,
        };
        blocks.push(Block {
            attn_norm: src.get(Weight::AttnNorm(i), &[d])?,
            attn,
            ffn_norm: src.get(Weight::FfnNorm(i), &[d])?,
            mlp,
        });
    }
    let embed_w = src.get_linear(Weight::Embed, &[c.vocab_size, d])?;
    let embed = match &embed_w {
        Weights::Quant(m) => Embedding::Quant(m.clone()),
        Weights::Dense(t) => Embedding::Dense(t.clone()),
        // A GPU lookup needs a plain tensor.
        Weights::Candle(_) => Embedding::Dense(src.get(Weight::Embed, &[c.vocab_size, d])?),
    };
    let norm = src.get(Weight::OutputNorm, &[d])?;
    // Tied models reuse the embedding table as the output head (same storage, no copy).
    let tied = tied || !src.has(Weight::Output);
    let head = if tied {
        embed_w
    } else {
        src.get_linear(Weight::Output, &[c.vocab_size, d])?
    };
    // Only a GPU head sits apart from the lookup table.
    let shared = tied && !matches!(head, Weights::Candle(_));
    let head = Linear::new(head, None);
    Ok(Model::assemble(
        config,
        device.clone(),
        embed,
        blocks,
        norm,
        head,
        shared,
    ))
}

fn check_shape(w: Weight, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.dims() != shape {
        return Err(ModelError::Format(format!(
            "tensor '{}' has shape {:?}, expected {:?}",
            w.gguf(),
            t.dims(),
            shape
        )));
    }
    Ok(())
}

struct GgufSource<'a> {
    content: &'a gguf_file::Content,
    reader: &'a mut BufReader<File>,
    device: &'a Device,
}

impl Source for GgufSource<'_> {
    fn get(&mut self, w: Weight, shape: &[usize]) -> Result<Tensor> {
        let name = w.gguf();
        if !self.content.tensor_infos.contains_key(&name) {
            return Err(ModelError::Format(format!("tensor '{name}' is missing")));
        }
        let q = self.content.tensor(self.reader, &name, self.device)?;
        let t = q.dequantize(self.device)?.to_dtype(DType::F32)?;
        check_shape(w, &t, shape)?;
        Ok(t)
    }

    fn has(&self, w: Weight) -> bool {
        self.content.tensor_infos.contains_key(&w.gguf())
    }

    fn get_linear(&mut self, w: Weight, shape: &[usize]) -> Result<Weights> {
        let name = w.gguf();
        let Some(info) = self.content.tensor_infos.get(&name) else {
            return Err(ModelError::Format(format!("tensor '{name}' is missing")));
        };
        if info.shape.dims() != shape {
            return Err(ModelError::Format(format!(
                "tensor '{name}' has shape {:?}, expected {shape:?}",
                info.shape.dims()
            )));
        }
        let q = self.content.tensor(self.reader, &name, &Device::Cpu)?;
        let (content, reader) = (self.content, &mut *self.reader);
        linear_weights(&name, q, shape, self.device, &mut || {
            Ok(content.tensor(reader, &name, self.device)?)
        })
    }
}

/// A projection's weights from quantized blocks `q` (on the CPU): our kernels on the CPU,
/// candle's on a GPU (`on_device` puts the blocks there), f32 for the formats neither takes.
pub(super) fn linear_weights(
    name: &str,
    q: QTensor,
    shape: &[usize],
    device: &Device,
    on_device: &mut dyn FnMut() -> Result<QTensor>,
) -> Result<Weights> {
    if device.is_cpu() {
        let data = q.data()?;
        match QuantMatrix::from_gguf(q.dtype(), shape[0], shape[1], &data) {
            Ok(m) => return Ok(Weights::Quant(std::sync::Arc::new(m))),
            // The rarer formats (Q5_1, Q2_K, Q3_K, f16) are multiplied as f32.
            Err(Unsupported::Format) => {}
            Err(e) => {
                return Err(ModelError::Format(format!(
                    "tensor '{name}' ({:?}, {shape:?}) is damaged: {e}",
                    q.dtype()
                )))
            }
        }
    } else if !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        return Ok(Weights::Candle(
            candle_core::quantized::QMatMul::from_qtensor(on_device()?)?,
        ));
    }
    Ok(Weights::Dense(q.dequantize(device)?.to_dtype(DType::F32)?))
}

struct VarSource<'a> {
    vb: VarBuilder<'a>,
}

impl Source for VarSource<'_> {
    fn get(&mut self, w: Weight, shape: &[usize]) -> Result<Tensor> {
        let name = w.hf();
        if !self.vb.contains_tensor(&name) {
            return Err(ModelError::Format(format!("tensor '{name}' is missing")));
        }
        Ok(self.vb.get(shape, &name)?)
    }

    fn has(&self, w: Weight) -> bool {
        self.vb.contains_tensor(&w.hf())
    }
}

/// An opened GGUF file: its metadata (for the tokenizer and template) and tensor index.
pub(crate) struct GgufFile {
    pub(crate) content: gguf_file::Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| {
            // candle stops at a tensor type it does not know without naming the tensor.
            if let Some((name, ty)) = unknown_tensor_type(path) {
                return ModelError::Format(format!(
                    "tensor '{name}' has type {}, which slm-chat cannot read; use a GGUF with \
                     Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K (or F16/F32) weights",
                    ggml_type_name(ty)
                ));
            }
            ModelError::Format(format!("not a readable GGUF file ({})", first_line(&e)))
        })?;
        // A file cut short parses its header fine and fails deep inside a tensor read;
        // check every tensor's extent up front so the message says what is wrong.
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            let elems = info.shape.elem_count();
            let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > file_len {
                return Err(ModelError::Format(format!(
                    "the file is truncated: tensor '{name}' ({:?}) needs bytes up to {end}, \
                     the file has {file_len}",
                    info.ggml_dtype
                )));
            }
        }
        Ok(Self { content, reader })
    }

    pub(crate) fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub(crate) fn meta_str(&self, key: &str) -> Option<String> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.to_string())
    }

    fn meta_u32(&self, key: &str) -> Result<u32> {
        let v = self
            .meta(key)
            .ok_or_else(|| ModelError::Format(format!("missing metadata key '{key}'")))?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .map_err(|_| ModelError::Format(format!("metadata key '{key}' is not an integer")))
    }

    fn meta_f32(&self, key: &str) -> Option<f32> {
        self.meta(key).and_then(|v| v.to_f32().ok())
    }

    pub(crate) fn config(&self) -> Result<Config> {
        let arch = self.meta_str("general.architecture").ok_or_else(|| {
            ModelError::Format("missing metadata key 'general.architecture'".into())
        })?;
        if !GGUF_ARCHS.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArch(arch));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let d_model = self.meta_u32(&k("embedding_length"))? as usize;
        let n_head = self.meta_u32(&k("attention.head_count"))? as usize;
        let n_kv_head = self
            .meta_u32(&k("attention.head_count_kv"))
            .map(|x| x as usize)
            .unwrap_or(n_head);
        let head_dim = self
            .meta_u32(&k("attention.key_length"))
            .map(|x| x as usize)
            .unwrap_or(d_model / n_head.max(1));
        let vocab_size = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => {
                return Err(ModelError::Format(
                    "tensor 'token_embd.weight' is missing".into(),
                ))
            }
        };
        let rope_scaling = match self.meta_str(&k("rope.scaling.type")).as_deref() {
            Some("linear") => RopeScaling::Linear {
                factor: self.meta_f32(&k("rope.scaling.factor")).unwrap_or(1.0) as f64,
            },
            _ => RopeScaling::None,
        };
        Config {
            name: self
                .meta_str("general.name")
                .unwrap_or_else(|| arch.clone()),
            n_layer: self.meta_u32(&k("block_count"))? as usize,
            d_model,
            n_head,
            n_kv_head,
            head_dim,
            d_ff: self.meta_u32(&k("feed_forward_length"))? as usize,
            vocab_size,
            rms_eps: self
                .meta_f32(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f64,
            rope_theta: self.meta_f32(&k("rope.freq_base")).unwrap_or(10_000.0) as f64,
            // llama.cpp permutes LLaMA's q/k rows for adjacent-pair rotation; qwen2 is NEOX.
            rope_style: if arch == "llama" {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Neox
            },
            rope_scaling,
            context_length: self.meta_u32(&k("context_length")).unwrap_or(4096) as usize,
            attention_bias: arch == "qwen2",
            arch,
        }
        .validate()
    }

    pub(crate) fn model(&mut self, device: &Device) -> Result<Model> {
        let mut config = self.config()?;
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let q = self
                .content
                .tensor(&mut self.reader, "rope_freqs.weight", &Device::Cpu)?;
            let factors = q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?;
            config.rope_scaling = RopeScaling::Factors(factors);
        }
        let mut src = GgufSource {
            content: &self.content,
            reader: &mut self.reader,
            device,
        };
        let mut model = build(config, device, &mut src, false)?;
        model.kv_f16 = true;
        Ok(model)
    }
}

/// A Hugging Face checkpoint folder.
pub(crate) fn hf_model(dir: &Path, device: &Device) -> Result<Model> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|_| ModelError::Format("no config.json in this folder".into()))?;
    let hf: HfConfig =
        serde_json::from_str(&text).map_err(|e| ModelError::Format(format!("config.json: {e}")))?;
    let tied = hf.tie_word_embeddings;
    let config = hf.into_config()?;
    let files = safetensors_files(dir)?;
    let vb = mmap_safetensors(&files, device)?;
    build(config, device, &mut VarSource { vb }, tied)
}

/// Build a model from named tensors in Hugging Face layout (used by tests with tiny
/// random weights, and by any caller that already holds tensors).
pub fn from_tensors(
    config: Config,
    tensors: std::collections::HashMap<String, Tensor>,
    tied: bool,
    device: &Device,
) -> Result<Model> {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    build(config, device, &mut VarSource { vb }, tied)
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Format(
            "no *.safetensors files in this folder".into(),
        ));
    }
    Ok(files)
}

#[allow(unsafe_code)]
fn mmap_safetensors(files: &[PathBuf], device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the files are mapped read-only for the model's lifetime; slm-chat never writes
    // them, and a user changing a checkpoint while it is loaded is outside what we support.
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(files, DType::F32, device)? })
}

/// ggml's name for a tensor type id (the ones slm-chat does not read included).
fn ggml_type_name(ty: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES
        .get(ty as usize)
        .map_or_else(|| format!("#{ty}"), |n| n.to_string())
}

/// The first tensor whose type candle does not know, read from the GGUF header directly
/// (only to name it in the error).
fn unknown_tensor_type(path: &Path) -> Option<(String, u32)> {
    use std::io::Read;
    let mut r = BufReader::new(File::open(path).ok()?);
    fn u32_(r: &mut BufReader<File>) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok().map(|_| u32::from_le_bytes(b))
    }
    fn u64_(r: &mut BufReader<File>) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok().map(|_| u64::from_le_bytes(b))
    }
    fn string(r: &mut BufReader<File>) -> Option<String> {
        let n = u64_(r)?;
        let mut b = Vec::new();
        r.take(n).read_to_end(&mut b).ok()?;
        (b.len() as u64 == n).then(|| String::from_utf8_lossy(&b).into_owned())
    }
    fn skip_value(r: &mut BufReader<File>, ty: u32, depth: u32) -> Option<()> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => return string(r).map(|_| ()),
            9 if depth < 4 => {
                let item = u32_(r)?;
                for _ in 0..u64_(r)? {
                    skip_value(r, item, depth + 1)?;
                }
                return Some(());
            }
            _ => return None,
        };
        std::io::copy(&mut r.take(fixed), &mut std::io::sink()).ok()?;
        Some(())
    }
    if u32_(&mut r)? != u32::from_le_bytes(*b"GGUF") || u32_(&mut r)? < 2 {
        return None;
    }
    let (tensors, kvs) = (u64_(&mut r)?, u64_(&mut r)?);
    for _ in 0..kvs {
        string(&mut r)?;
        let ty = u32_(&mut r)?;
        skip_value(&mut r, ty, 0)?;
    }
    for _ in 0..tensors {
        let name = string(&mut r)?;
        let dims = u32_(&mut r)?;
        for _ in 0..dims {
            u64_(&mut r)?;
        }
        let ty = u32_(&mut r)?;
        u64_(&mut r)?;
        // The type ids candle's reader knows.
        if !matches!(ty, 0..=3 | 6..=15 | 30) {
            return Some((name, ty));
        }
    }
    None
}
