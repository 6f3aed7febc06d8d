//! Opening a stored tree: memory-mapped, checked before anything is used.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use half::f16;
use memmap2::Mmap;

use super::{
    tensor_name, BatchEntry, Manifest, Result, StoreError, Sum, BM25, FORMAT_VERSION, MANIFEST,
    PROGRESS, TEXT, TOKENS,
};
use crate::tree::{Bm25, EncodedChunk};

/// Where a tensor's bytes lie.
#[derive(Debug, Clone)]
struct Slot {
    file: usize,
    start: usize,
    end: usize,
    blake3: String,
}

/// A finished tree, open for reading. KV tensors stay on disk (mapped) until used.
#[derive(Debug)]
pub struct Tree {
    dir: PathBuf,
    manifest: Manifest,
    text: String,
    tokens: Vec<u32>,
    /// One index per level over its nodes' texts (node order within the level, chunk by chunk).
    bm25: Vec<Bm25>,
    /// `(chunks × nodes, d_model)` each.
    paper: Vec<f32>,
    hidden: Vec<f32>,
    maps: Vec<Mmap>,
    slots: HashMap<String, Slot>,
    /// Tensors whose checksum has been checked since the tree was opened.
    verified: Mutex<HashSet<String>>,
}

/// The sealed manifest of the tree in `dir`.
pub(super) fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(if dir.join(PROGRESS).exists() {
                StoreError::Partial(dir.into())
            } else {
                StoreError::Missing(dir.into())
            })
        }
        Err(e) => return Err(StoreError::io(&path)(e)),
    };
    // Read the version first, so an older format is reported as such and not as damage.
    #[derive(serde::Deserialize)]
    struct Version {
        plan: PlanVersion,
    }
    #[derive(serde::Deserialize)]
    struct PlanVersion {
        format: u32,
    }
    let version: Version = serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::corrupt(dir, format!("{MANIFEST}: {e}")))?;
    if version.plan.format != FORMAT_VERSION {
        return Err(StoreError::Outdated {
            dir: dir.into(),
            found: version.plan.format,
        });
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::corrupt(dir, format!("{MANIFEST}: {e}")))?;
    if !manifest.is_sealed() {
        return Err(StoreError::corrupt(dir, format!("{MANIFEST} checksum")));
    }
    Ok(manifest)
}

/// A file the manifest lists and the disk lacks is damage, not an I/O error.
fn gone(dir: &Path, path: &Path, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StoreError::corrupt(dir, format!("{} is missing", path.display()))
    } else {
        StoreError::io(path)(e)
    }
}

/// Map batch file `i` (`b` in the manifest), checking its size and that it holds exactly the
/// tensors listed; each tensor's place goes into `slots`.
fn map_batch(
    dir: &Path,
    i: usize,
    b: &BatchEntry,
    slots: &mut HashMap<String, Slot>,
) -> Result<Mmap> {
    let path = dir.join(&b.file);
    let file = std::fs::File::open(&path).map_err(|e| gone(dir, &path, e))?;
    let len = file.metadata().map_err(StoreError::io(&path))?.len();
    if len != b.bytes {
        return Err(StoreError::corrupt(
            dir,
            format!("{} is {len} bytes, expected {}", b.file, b.bytes),
        ));
    }
    // SAFETY: the store's files are only ever replaced by rename, never modified in
    // place, so the mapped bytes do not change under us; every tensor read from the
    // map is checked against its BLAKE3 sum before use.
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(&file) }.map_err(StoreError::io(&path))?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| StoreError::corrupt(dir, format!("{}: {e}", b.file)))?;
    let base = map.as_ptr() as usize;
    let mut in_file = 0;
    for (name, view) in st.tensors() {
        in_file += 1;
        let Some(sum) = b.tensors.get(&name) else {
            return Err(StoreError::corrupt(
                dir,
                format!("{}: stray tensor {name}", b.file),
            ));
        };
        let start = view.data().as_ptr() as usize - base;
        slots.insert(
            name,
            Slot {
                file: i,
                start,
                end: start + view.data().len(),
                blake3: sum.clone(),
            },
        );
    }
    if in_file != b.tensors.len() {
        return Err(StoreError::corrupt(
            dir,
            format!("{}: missing tensors", b.file),
        ));
    }
    Ok(map)
}

impl Tree {
    /// Open the finished tree in `dir`, checking the manifest, every file's size, the small
    /// files and the node vectors.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let plan = &manifest.plan;
        let read_checked = |name: &str, sum: &Sum| -> Result<Vec<u8>> {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| gone(dir, &path, e))?;
            if Sum::of(&bytes) != *sum {
                return Err(StoreError::corrupt(dir, format!("{name} checksum")));
            }
            Ok(bytes)
        };
        let text = String::from_utf8(read_checked(TEXT, &plan.text)?)
            .map_err(|_| StoreError::corrupt(dir, format!("{TEXT} is not UTF-8")))?;
        let tokens = read_tokens(dir, &read_checked(TOKENS, &plan.token_ids)?)?;
        let bm25: Vec<Bm25> = serde_json::from_slice(&read_checked(BM25, &plan.bm25)?)
            .map_err(|e| StoreError::corrupt(dir, format!("{BM25}: {e}")))?;
        let mut maps = Vec::with_capacity(manifest.batches.len());
        let mut slots = HashMap::new();
        for (i, b) in manifest.batches.iter().enumerate() {
            maps.push(map_batch(dir, i, b, &mut slots)?);
        }
        let mut tree = Self {
            dir: dir.to_path_buf(),
            manifest,
            text,
            tokens,
            bm25,
            paper: Vec::new(),
            hidden: Vec::new(),
            maps,
            slots,
            verified: Mutex::new(HashSet::new()),
        };
        let chunks = tree.manifest.plan.chunks.len();
        let mut paper = Vec::new();
        let mut hidden = Vec::new();
        for c in 0..chunks {
            paper.extend_from_slice(tree.f32s(&tensor_name(c, "paper"))?);
            hidden.extend_from_slice(tree.f32s(&tensor_name(c, "hidden"))?);
        }
        tree.paper = paper;
        tree.hidden = hidden;
        Ok(tree)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The document's token ids.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// BM25 over the nodes of `level`.
    pub fn bm25(&self, level: usize) -> Option<&Bm25> {
        self.bm25.get(level)
    }

    /// The paper's vector of every node, `(chunks × nodes, d_model)`.
    pub fn paper_vectors(&self) -> &[f32] {
        &self.paper
    }

    /// The mean hidden state of every node, `(chunks × nodes, d_model)`.
    pub fn hidden_vectors(&self) -> &[f32] {
        &self.hidden
    }

    /// Level `level` of chunk `chunk`: `(layers, 2, rows, kv_dim)`.
    pub fn level(&self, chunk: usize, level: usize) -> Result<&[f16]> {
        self.f16s(&tensor_name(chunk, &format!("l{level}")))
    }

    /// Full-resolution KV of chunk `chunk`, `(layers, 2, len, kv_dim)`, when the tree keeps it.
    pub fn full(&self, chunk: usize) -> Result<Option<&[f16]>> {
        let name = tensor_name(chunk, "full");
        if !self.slots.contains_key(&name) {
            return Ok(None);
        }
        self.f16s(&name).map(Some)
    }

    /// Chunk `chunk` as the encoder made it (for a new tree with the same chunk): its full
    /// KV when this tree keeps it and `full` is asked for, its levels and node vectors.
    pub fn encoded_chunk(&self, chunk: usize, full: bool) -> Result<Option<EncodedChunk>> {
        let plan = &self.manifest.plan;
        let c = &plan.chunks[chunk];
        let full = if full {
            match self.full(chunk)? {
                Some(f) => f.to_vec(),
                None => return Ok(None),
            }
        } else {
            Vec::new()
        };
        let levels = (0..=plan.config.height)
            .map(|w| self.level(chunk, w).map(<[f16]>::to_vec))
            .collect::<Result<Vec<_>>>()?;
        let per = c.nodes.len() * plan.d_model;
        let at = chunk * per;
        Ok(Some(EncodedChunk {
            len: c.len(),
            full,
            levels,
            paper: self.paper[at..at + per].to_vec(),
            hidden: self.hidden[at..at + per].to_vec(),
        }))
    }

    /// Bytes of the tree's files on disk.
    pub fn disk_bytes(&self) -> u64 {
        super::dir_bytes(&self.dir)
    }

    /// Bytes of the batch files mapped into memory (the OS pages in only what is read).
    pub fn mapped_bytes(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }

    /// Check every tensor's checksum now (ingest does this for a tree it finds built).
    pub fn verify_all(&self) -> Result<()> {
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for n in names {
            self.bytes(&n)?;
        }
        Ok(())
    }

    fn bytes(&self, name: &str) -> Result<&[u8]> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| StoreError::corrupt(&self.dir, format!("missing tensor {name}")))?;
        let bytes = &self.maps[slot.file][slot.start..slot.end];
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if !verified.contains(name) {
            if blake3::hash(bytes).to_hex().as_str() != slot.blake3 {
                return Err(StoreError::corrupt(
                    &self.dir,
                    format!("tensor {name} checksum"),
                ));
            }
            verified.insert(name.to_string());
        }
        Ok(bytes)
    }

    fn f16s(&self, name: &str) -> Result<&[f16]> {
        bytemuck::try_cast_slice(self.bytes(name)?)
            .map_err(|e| StoreError::corrupt(&self.dir, format!("tensor {name}: {e}")))
    }

    fn f32s(&self, name: &str) -> Result<&[f32]> {
        bytemuck::try_cast_slice(self.bytes(name)?)
            .map_err(|e| StoreError::corrupt(&self.dir, format!("tensor {name}: {e}")))
    }
}

/// The token ids stored with a finished tree, checked against its manifest.
pub(super) fn read_stored_tokens(dir: &Path, manifest: &Manifest) -> Result<Vec<u32>> {
    let path = dir.join(TOKENS);
    let bytes = std::fs::read(&path).map_err(StoreError::io(&path))?;
    if Sum::of(&bytes) != manifest.plan.token_ids {
        return Err(StoreError::corrupt(dir, format!("{TOKENS} checksum")));
    }
    read_tokens(dir, &bytes)
}

fn read_tokens(dir: &Path, bytes: &[u8]) -> Result<Vec<u32>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| StoreError::corrupt(dir, format!("{TOKENS}: {e}")))?;
    let view = st
        .tensor("tokens")
        .map_err(|e| StoreError::corrupt(dir, format!("{TOKENS}: {e}")))?;
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}
