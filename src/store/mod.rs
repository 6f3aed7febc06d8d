//! Built context trees on disk: cache keys, the format, atomic and resumable writes, and
//! memory-mapped reading that checks what it reads.
//!
//! One directory per (document bytes, model file, tree config), under `<cache>/trees/`:
//!
//! - `text.txt`: the document text the nodes point into; `tokens.safetensors`: its token ids;
//!   `bm25.json`: BM25 statistics of every level's node texts.
//! - `batch-NNNNN.safetensors`: per chunk `cI.full` `(layers, 2, len, kv_dim)` f16 (keys before
//!   RoPE, then values; only when full KV is kept), `cI.lW` per level (the downsampled rows),
//!   `cI.paper` and `cI.hidden` `(nodes, d_model)` f32 node vectors.
//! - `progress.json` while building (finished batches and their checksums), replaced by
//!   `manifest.json` when the tree is complete: format version, config, chunk and node tables,
//!   a BLAKE3 checksum of every file and tensor, and a checksum of the manifest itself.
//!
//! Every file is written to a temporary name, fsynced and renamed, so a kill at any point
//! leaves either the old state or the new one. Reading checks the manifest, file sizes, the
//! small files and the node vectors when the tree is opened, and each KV tensor the first
//! time it is read, so a flipped byte is never used as if it were fine.

mod dense;
mod read;
mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tree::TreeConfig;

pub use dense::{read_dense, write_dense};
pub use read::Tree;
pub use write::{token_file, Build, Contents};

/// Whether the full-resolution KV of every token is kept on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FullKv {
    /// Keep it when it fits `disk_budget_gb`.
    Auto,
    Always,
    /// Keep only the downsampled levels: questions read their passages again as text
    /// (`search.reread` auto or always, contiguous positions, M = N), ~0.5 s more to the
    /// first token on this CPU; otherwise the chosen chunks are encoded again, once per chunk
    /// per session.
    Never,
}

/// `[store]`: what the stored tree keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    pub full_kv: FullKv,
    /// Most gigabytes one document's full-resolution KV may take with `full_kv = auto`.
    pub disk_budget_gb: f64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            // Stored leaves answer as well as passages read again and 4x sooner; a document
            // whose leaves would take more than `disk_budget_gb` reads them again instead.
            full_kv: FullKv::Auto,
            disk_budget_gb: 8.0,
        }
    }
}

/// Bumped whenever the layout or the meaning of a stored tensor changes.
pub const FORMAT_VERSION: u32 = 1;

pub(crate) const MANIFEST: &str = "manifest.json";
pub(crate) const PROGRESS: &str = "progress.json";
pub(crate) const PLAN: &str = "plan.json";
pub(crate) const TEXT: &str = "text.txt";
pub(crate) const TOKENS: &str = "tokens.safetensors";
pub(crate) const BM25: &str = "bm25.json";
pub(crate) const LOCK: &str = ".lock";

/// What can go wrong with a stored tree.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no tree is stored at {0}")]
    Missing(PathBuf),
    #[error("the tree at {0} was not finished")]
    Partial(PathBuf),
    #[error("the stored tree at {dir} is damaged ({what})")]
    Corrupt { dir: PathBuf, what: String },
    #[error(
        "the stored tree at {dir} has format {found}, this slm-chat reads format {FORMAT_VERSION}"
    )]
    Outdated { dir: PathBuf, found: u32 },
    #[error("another slm-chat is building the tree at {0}; wait for it to finish")]
    Busy(PathBuf),
    #[error("the tree at {0} was finished by another slm-chat")]
    Finished(PathBuf),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        /// Not a `source`: the message already says it, and error chains would repeat it.
        error: std::io::Error,
    },
}

impl StoreError {
    /// Whether the tree should be deleted and built again.
    pub fn needs_rebuild(&self) -> bool {
        matches!(self, Self::Corrupt { .. } | Self::Outdated { .. })
    }

    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |error| Self::Io {
            path: path.to_path_buf(),
            error,
        }
    }

    pub(crate) fn corrupt(dir: &Path, what: impl Into<String>) -> Self {
        Self::Corrupt {
            dir: dir.to_path_buf(),
            what: what.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A file's checksum and length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sum {
    pub blake3: String,
    pub bytes: u64,
}

impl Sum {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            blake3: blake3::hash(bytes).to_hex().to_string(),
            bytes: bytes.len() as u64,
        }
    }
}

/// One node: its document token range, byte range of the text and pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub tokens: (usize, usize),
    pub chars: (usize, usize),
    pub pages: (u32, u32),
}

/// One chunk: its own range and its nodes in level-by-level order (node 0 is the chunk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub nodes: Vec<NodeEntry>,
    /// BLAKE3 of the chunk's token ids (little-endian u32): a chunk with the same tokens in
    /// another tree built with the same model and settings has the same encoding.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ids: String,
}

impl ChunkEntry {
    pub fn tokens(&self) -> (usize, usize) {
        self.nodes[0].tokens
    }

    pub fn len(&self) -> usize {
        self.nodes[0].tokens.1 - self.nodes[0].tokens.0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn pages(&self) -> (u32, u32) {
        self.nodes[0].pages
    }
}

/// Everything known about a tree before its chunks are encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: u32,
    /// The file name the document was read from.
    pub source: String,
    pub title: String,
    /// BLAKE3 of the document's bytes and of the model's files.
    pub document: String,
    pub model: String,
    pub config: TreeConfig,
    pub tokens: usize,
    pub kv_dim: usize,
    pub d_model: usize,
    pub chunks: Vec<ChunkEntry>,
    pub text: Sum,
    pub token_ids: Sum,
    pub bm25: Sum,
}

/// The directory name under `<cache>/trees/` for a document, a model and the settings that
/// decide the tree (serialized by the caller), so a cached tree is found without reading the
/// document's text.
pub fn key(document: &str, model: &str, settings: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&FORMAT_VERSION.to_le_bytes());
    h.update(settings);
    format!(
        "{}-{}-{}",
        &document[..16.min(document.len())],
        &model[..12.min(model.len())],
        &h.finalize().to_hex()[..12]
    )
}

impl Plan {
    /// Chunks written per batch file.
    pub fn batches(&self) -> usize {
        self.chunks.len().div_ceil(self.config.batch_chunks)
    }

    /// What a resumed build must match: everything but the file name (the same bytes under
    /// another name resume).
    fn sum(&self) -> String {
        let unnamed = Plan {
            source: String::new(),
            ..self.clone()
        };
        blake3::hash(&serde_json::to_vec(&unnamed).unwrap_or_default())
            .to_hex()
            .to_string()
    }
}

/// One written batch file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEntry {
    pub file: String,
    pub bytes: u64,
    /// Tensor name → BLAKE3 of its bytes.
    pub tensors: BTreeMap<String, String>,
}

/// A finished tree's description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub plan: Plan,
    pub batches: Vec<BatchEntry>,
    /// BLAKE3 of this manifest serialized with an empty `checksum`.
    pub checksum: String,
}

impl Manifest {
    fn seal(mut self) -> Self {
        self.checksum.clear();
        self.checksum = blake3::hash(&serde_json::to_vec(&self).unwrap_or_default())
            .to_hex()
            .to_string();
        self
    }

    fn is_sealed(&self) -> bool {
        self.clone().seal().checksum == self.checksum
    }
}

/// A build in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Progress {
    plan: String,
    batches: Vec<BatchEntry>,
}

/// Names of one chunk's tensors.
pub(crate) fn tensor_name(chunk: usize, part: &str) -> String {
    format!("c{chunk}.{part}")
}

pub(crate) fn batch_file(batch: usize) -> String {
    format!("batch-{batch:05}.safetensors")
}

/// BLAKE3 of a file's bytes (hashed in parallel: model files are large).
pub fn hash_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path).map_err(StoreError::io(path))?;
    Ok(h.finalize().to_hex().to_string())
}

/// BLAKE3 of a model: the file, or every file of a Hugging Face folder (sorted by name).
pub fn hash_model(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return hash_file(path);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(StoreError::io(path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in files {
        h.update(hash_file(&f)?.as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Write `bytes` to `path` so that a crash leaves either the old file or the new one
/// (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(StoreError::io(dir))?;
    tmp.write_all(bytes).map_err(StoreError::io(path))?;
    tmp.as_file().sync_all().map_err(StoreError::io(path))?;
    tmp.persist(path)
        .map_err(|e| StoreError::io(path)(e.error))?;
    sync_dir(dir)
}

/// Make a rename in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(dir))
}

/// A stored tree as `cache ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub key: String,
    pub path: PathBuf,
    pub source: String,
    pub title: String,
    pub tokens: usize,
    pub chunks: usize,
    pub bytes: u64,
    /// "complete", "partial (N of M batches)" or "damaged: …".
    pub state: String,
}

/// BLAKE3 of token ids as stored in [`ChunkEntry::ids`].
pub fn ids_hash(ids: &[u32]) -> String {
    blake3::hash(bytemuck::cast_slice(ids)).to_hex().to_string()
}

/// Chunks written and chunks planned of the build under way (or stopped) in `dir`.
pub fn build_progress(dir: &Path) -> Option<(usize, usize)> {
    let (plan, batches) = write::read_progress_plan(dir)?;
    let total = plan.chunks.len();
    Some(((batches * plan.config.batch_chunks).min(total), total))
}

/// Finished trees under `trees_dir` of the same model as `key` whose chunks were encoded
/// as `config` encodes them, and for each chunk token hash, where its encoding is:
/// `(tree dir, chunk)`.
///
/// Only the encoding has to match, not the whole key: a tree kept without full KV borrows
/// from one kept with it (the levels and vectors are the same), and batching does not change
/// a chunk (tested). A tree that needs full KV never borrows from one without.
pub fn chunk_donors(
    trees_dir: &Path,
    key: &str,
    config: &TreeConfig,
) -> std::collections::HashMap<String, (PathBuf, usize)> {
    let mut out = std::collections::HashMap::new();
    let model = key.split('-').nth(1);
    let encoding = |c: &TreeConfig| TreeConfig {
        full_kv: false,
        batch_chunks: 0,
        ..c.clone()
    };
    let Ok(entries) = std::fs::read_dir(trees_dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == key || model.is_none() || name.split('-').nth(1) != model {
            continue;
        }
        let Ok(m) = read::read_manifest(&e.path()) else {
            continue;
        };
        let theirs = &m.plan.config;
        if encoding(theirs) != encoding(config) || (config.full_kv && !theirs.full_kv) {
            continue;
        }
        // Trees written before chunks carried their hash: hash their stored tokens.
        let tokens = if m.plan.chunks.iter().any(|c| c.ids.is_empty()) {
            read::read_stored_tokens(&e.path(), &m).ok()
        } else {
            None
        };
        for (i, c) in m.plan.chunks.iter().enumerate() {
            let hash = match (&tokens, c.ids.is_empty()) {
                (_, false) => c.ids.clone(),
                (Some(t), true) => {
                    let (a, b) = c.tokens();
                    match t.get(a..b) {
                        Some(ids) => ids_hash(ids),
                        None => continue,
                    }
                }
                (None, true) => continue,
            };
            out.entry(hash).or_insert((e.path(), i));
        }
    }
    out
}

/// Every tree under `trees_dir`, by key.
pub fn list(trees_dir: &Path) -> Result<Vec<Listing>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(trees_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io(trees_dir)(e)),
    };
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        let key = e.file_name().to_string_lossy().into_owned();
        let bytes = dir_bytes(&path);
        let listing = |source: String, title: String, tokens, chunks, state: String| Listing {
            key: key.clone(),
            path: path.clone(),
            source,
            title,
            tokens,
            chunks,
            bytes,
            state,
        };
        out.push(match read::read_manifest(&path) {
            Ok(m) => listing(
                m.plan.source,
                m.plan.title,
                m.plan.tokens,
                m.plan.chunks.len(),
                "complete".into(),
            ),
            Err(StoreError::Missing(_) | StoreError::Partial(_)) => {
                match write::read_progress_plan(&path) {
                    Some((plan, done)) => {
                        let state = format!("partial ({done} of {} batches)", plan.batches());
                        listing(
                            plan.source,
                            plan.title,
                            plan.tokens,
                            plan.chunks.len(),
                            state,
                        )
                    }
                    None => listing(String::new(), String::new(), 0, 0, "empty".into()),
                }
            }
            Err(err) => listing(
                String::new(),
                String::new(),
                0,
                0,
                format!("damaged: {err}"),
            ),
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Bytes of the files in `dir` (not recursive).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|es| {
            es.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Delete a stored tree.
pub fn remove(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).map_err(StoreError::io(dir))
}
