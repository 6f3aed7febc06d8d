//! The language model: weights, tokenizer, chat template, an open forward, generation.
//!
//! Knows nothing of documents, trees or the UI. The forward ([`Model::forward`]) runs a layer
//! range at explicit positions over whatever a [`KvCache`] holds, which is what the context
//! tree (layers `[0, M)` over chunks) and the answer (all layers over the question, with
//! injected KV) are built from.

mod attention;
mod chat;
mod config;
mod embed;
mod fetch;
mod generate;
mod kv;
mod load;
mod quant;
mod rope;
pub mod synthetic;
mod tokenizer;
mod transformer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

pub use chat::{ChatTemplate, Message};
pub use config::{Config, RopeScaling, RopeStyle};
pub use embed::{embedder_present, ensure_embedder, Embedder, EMBEDDER_DIR, MAX_PIECES};
pub use fetch::{
    catalogue_model, default_model, ensure_default_model, ensure_model, resolve_model, sha256_file,
    CatalogueModel, CATALOGUE,
};
pub use generate::{
    argmax, decode, fixed, generate, log_softmax_at, prefill, Generation, GenerationStats,
    Prefilled, RepeatControl, Sampler, SamplingParams, StopReason,
};
pub use kv::KvCache;
pub use load::from_tensors;
pub use tokenizer::{Encoded, Tokenizer};
pub use transformer::{Forward, ForwardOutput, LayerKv, Model};

/// What went wrong in the model layer, in words for the user.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model '{path}': {reason}")]
    Load { path: PathBuf, reason: String },
    #[error(
        "unsupported architecture '{0}' (slm-chat runs LLaMA-family models: llama, mistral, qwen2)"
    )]
    UnsupportedArch(String),
    #[error("{0}")]
    Format(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Input(String),
    #[error("default model: {0}")]
    Fetch(String),
    #[error("device: {0}")]
    Device(String),
    // No `#[from]`: a source would be printed again after the message, and candle's carries
    // a backtrace; the user gets one line.
    #[error("{0}")]
    Io(String),
    #[error("tensor operation failed: {0}")]
    Candle(String),
}

impl From<std::io::Error> for ModelError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(first_line(&e))
    }
}

/// The first line of an error: candle appends a backtrace when RUST_BACKTRACE is set, and
/// the user gets one line.
pub(crate) fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when this build has it and a GPU answers, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!("'{other}' is not a device (auto, cpu, cuda)")),
        }
    }
}

/// The device for `choice`.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        DeviceChoice::Cuda if !candle_core::utils::cuda_is_available() => Err(ModelError::Device(
            "this build has no CUDA support; rebuild with `cargo build --release --features cuda`, or use --device cpu".into(),
        )),
        DeviceChoice::Cuda => {
            // candle's error carries a backtrace when RUST_BACKTRACE is set: one line of it.
            Device::new_cuda(0).map_err(|e| ModelError::Device(format!("no CUDA GPU answered: {}", first_line(&e))))
        }
    }
}

/// Which model to run and where: a catalogue name or a path (empty: the default model), the
/// device, and the folder catalogue models are downloaded to.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    pub spec: String,
    pub device: DeviceChoice,
    pub models_dir: PathBuf,
}

impl ModelChoice {
    /// Resolve (fetching a catalogue model if missing; `say` gets one line per step) and load.
    pub fn load(&self, say: &mut dyn FnMut(&str)) -> Result<Llm> {
        let path = resolve_model(&self.spec, &self.models_dir, say)?;
        load(&path, &select_device(self.device)?)
    }
}

/// A short name for a device, for status lines.
pub fn device_name(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}

/// A model with everything needed to chat with it.
#[derive(Debug)]
pub struct Llm {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    pub path: PathBuf,
    pub load_secs: f64,
}

/// Load a GGUF file or a Hugging Face folder (config.json + *.safetensors + tokenizer.json).
pub fn load(path: &Path, device: &Device) -> Result<Llm> {
    let start = Instant::now();
    let wrap = |e: ModelError| match e {
        ModelError::Load { .. } | ModelError::UnsupportedArch(_) | ModelError::Device(_) => e,
        other => ModelError::Load {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    };
    let (model, tokenizer, template) = if path.is_dir() {
        load_hf(path, device).map_err(wrap)?
    } else if path.is_file() {
        load_gguf(path, device).map_err(wrap)?
    } else {
        return Err(wrap(ModelError::Format("no such file or folder".into())));
    };
    let chat =
        ChatTemplate::new(template, tokenizer.bos_token(), tokenizer.eos_token()).map_err(wrap)?;
    Ok(Llm {
        model,
        tokenizer,
        chat,
        path: path.to_path_buf(),
        load_secs: start.elapsed().as_secs_f64(),
    })
}

fn load_gguf(path: &Path, device: &Device) -> Result<(Model, Tokenizer, Option<String>)> {
    let mut g = load::GgufFile::open(path)?;
    let model = g.model(device)?;
    let tokenizer = Tokenizer::from_gguf(&g)?;
    let template = g.meta_str("tokenizer.chat_template");
    Ok((model, tokenizer, template))
}

fn load_hf(dir: &Path, device: &Device) -> Result<(Model, Tokenizer, Option<String>)> {
    if !dir.join("tokenizer.json").is_file() {
        return Err(ModelError::Format(
            "no tokenizer.json in this folder; copy it from the model's repository".into(),
        ));
    }
    let model = load::hf_model(dir, device)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let template = tokenizer::read_tokenizer_config(dir).and_then(|c| {
        match c.get("chat_template")? {
            serde_json::Value::String(s) => Some(s.clone()),
            // A list of named templates: take the default one.
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        }
    });
    Ok((model, tokenizer, template))
}
