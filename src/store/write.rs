//! Writing a tree batch by batch, so an interrupted build resumes where it stopped.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::f16;
use safetensors::tensor::{Dtype, TensorView};

use super::{
    batch_file, sync_dir, tensor_name, write_atomic, BatchEntry, Manifest, Plan, Progress, Result,
    StoreError, Sum, BM25, LOCK, MANIFEST, PLAN, PROGRESS, TEXT, TOKENS,
};
use crate::tree::EncodedChunk;

/// A tree being written. Holds an exclusive lock on the directory until dropped.
pub struct Build {
    dir: PathBuf,
    plan: Plan,
    plan_sum: String,
    done: Vec<BatchEntry>,
    _lock: File,
}

/// The small files every tree has, with the bytes to write.
pub struct Contents<'a> {
    pub text: &'a str,
    pub token_ids: Vec<u8>,
    pub bm25: Vec<u8>,
}

/// The serialized token ids file for `ids`.
pub fn token_file(ids: &[u32]) -> Result<Vec<u8>> {
    let bytes: &[u8] = bytemuck::cast_slice(ids);
    let view = TensorView::new(Dtype::U32, vec![ids.len()], bytes)
        .map_err(|e| StoreError::corrupt(Path::new("."), e.to_string()))?;
    safetensors::serialize([("tokens", view)], None)
        .map_err(|e| StoreError::corrupt(Path::new("."), e.to_string()))
}

impl Build {
    /// Start building `plan` in `dir`, or resume a build of the same plan that was stopped.
    ///
    /// `contents` must be what `plan`'s sums describe. A finished tree found in `dir` once
    /// the lock is held (another process just built it) is [`StoreError::Finished`], unless
    /// `replace` (the caller found it damaged): then it is cleared and built again.
    pub fn begin(dir: &Path, plan: Plan, contents: &Contents, replace: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        let lock_path = dir.join(LOCK);
        let lock = File::create(&lock_path).map_err(StoreError::io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::Busy(dir.into())),
            Err(std::fs::TryLockError::Error(e)) => return Err(StoreError::io(&lock_path)(e)),
        }
        if !replace && super::read::read_manifest(dir).is_ok() {
            return Err(StoreError::Finished(dir.into()));
        }
        // Half-written files of a killed write are never part of the tree.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let plan_sum = plan.sum();
        let mut build = Self {
            dir: dir.to_path_buf(),
            plan,
            plan_sum,
            done: Vec::new(),
            _lock: lock,
        };
        match build.resumable().filter(|_| !replace) {
            Some(done) => build.done = done,
            None => build.start_fresh(contents)?,
        }
        Ok(build)
    }

    /// Batches already written (a resumed build continues after them).
    pub fn batches_done(&self) -> usize {
        self.done.len()
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The batches of a stopped build of the same plan, if its files are all there.
    fn resumable(&self) -> Option<Vec<BatchEntry>> {
        let text = std::fs::read(self.dir.join(PROGRESS)).ok()?;
        let progress: Progress = serde_json::from_slice(&text).ok()?;
        if progress.plan != self.plan_sum {
            return None;
        }
        let small = [
            (TEXT, &self.plan.text),
            (TOKENS, &self.plan.token_ids),
            (BM25, &self.plan.bm25),
        ];
        for (name, sum) in small {
            let bytes = std::fs::read(self.dir.join(name)).ok()?;
            if Sum::of(&bytes) != *sum {
                return None;
            }
        }
        let intact = progress
            .batches
            .iter()
            .all(|b| std::fs::metadata(self.dir.join(&b.file)).is_ok_and(|m| m.len() == b.bytes));
        intact.then_some(progress.batches)
    }

    fn start_fresh(&mut self, contents: &Contents) -> Result<()> {
        let entries = std::fs::read_dir(&self.dir).map_err(StoreError::io(&self.dir))?;
        for e in entries.flatten() {
            if e.file_name() != LOCK {
                let p = e.path();
                std::fs::remove_file(&p).map_err(StoreError::io(&p))?;
            }
        }
        write_atomic(&self.dir.join(TEXT), contents.text.as_bytes())?;
        write_atomic(&self.dir.join(TOKENS), &contents.token_ids)?;
        write_atomic(&self.dir.join(BM25), &contents.bm25)?;
        let plan = serde_json::to_vec(&self.plan).map_err(|e| StoreError::Io {
            path: self.dir.join(PLAN),
            error: e.into(),
        })?;
        write_atomic(&self.dir.join(PLAN), &plan)?;
        self.save_progress()
    }

    fn save_progress(&self) -> Result<()> {
        let progress = Progress {
            plan: self.plan_sum.clone(),
            batches: self.done.clone(),
        };
        let bytes = serde_json::to_vec(&progress).map_err(|e| StoreError::Io {
            path: self.dir.join(PROGRESS),
            error: e.into(),
        })?;
        write_atomic(&self.dir.join(PROGRESS), &bytes)
    }

    /// Write the next batch: `chunks` are the encodings of its chunks, in order.
    pub fn add_batch(&mut self, chunks: &[EncodedChunk]) -> Result<()> {
        let batch = self.done.len();
        let first = batch * self.plan.config.batch_chunks;
        let (kv_dim, d) = (self.plan.kv_dim, self.plan.d_model);
        let layers = self.plan.config.layers;
        let mut named: Vec<(String, Dtype, Vec<usize>, &[u8])> = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let id = first + i;
            if !c.full.is_empty() {
                named.push((
                    tensor_name(id, "full"),
                    Dtype::F16,
                    vec![layers, 2, c.len, kv_dim],
                    f16_bytes(&c.full),
                ));
            }
            for (w, level) in c.levels.iter().enumerate() {
                let rows = level.len() / (layers * 2 * kv_dim).max(1);
                named.push((
                    tensor_name(id, &format!("l{w}")),
                    Dtype::F16,
                    vec![layers, 2, rows, kv_dim],
                    f16_bytes(level),
                ));
            }
            let nodes = c.paper.len() / d.max(1);
            for (part, v) in [("paper", &c.paper), ("hidden", &c.hidden)] {
                named.push((
                    tensor_name(id, part),
                    Dtype::F32,
                    vec![nodes, d],
                    bytemuck::cast_slice(v),
                ));
            }
        }
        let path = self.dir.join(batch_file(batch));
        let bad = |e: safetensors::SafeTensorError| StoreError::Io {
            path: path.clone(),
            error: std::io::Error::other(e.to_string()),
        };
        let mut tensors = BTreeMap::new();
        let mut views = Vec::with_capacity(named.len());
        for (name, dtype, shape, bytes) in &named {
            tensors.insert(name.clone(), blake3::hash(bytes).to_hex().to_string());
            views.push((
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).map_err(bad)?,
            ));
        }
        let bytes = safetensors::serialize(views, None).map_err(bad)?;
        write_atomic(&path, &bytes)?;
        self.done.push(BatchEntry {
            file: batch_file(batch),
            bytes: bytes.len() as u64,
            tensors,
        });
        self.save_progress()
    }

    /// Seal the tree: write its manifest and drop the progress file. Returns the directory.
    pub fn finish(self) -> Result<PathBuf> {
        if self.done.len() != self.plan.batches() {
            return Err(StoreError::Partial(self.dir.clone()));
        }
        let manifest = Manifest {
            plan: self.plan.clone(),
            batches: self.done.clone(),
            checksum: String::new(),
        }
        .seal();
        let bytes = serde_json::to_vec(&manifest).map_err(|e| StoreError::Io {
            path: self.dir.join(MANIFEST),
            error: e.into(),
        })?;
        write_atomic(&self.dir.join(MANIFEST), &bytes)?;
        for name in [PROGRESS, PLAN] {
            let p = self.dir.join(name);
            std::fs::remove_file(&p).map_err(StoreError::io(&p))?;
        }
        sync_dir(&self.dir)?;
        Ok(self.dir.clone())
    }
}

fn f16_bytes(v: &[f16]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// The plan of a stopped build in `dir` and how many batches it finished.
pub(super) fn read_progress_plan(dir: &Path) -> Option<(Plan, usize)> {
    let progress: Progress =
        serde_json::from_slice(&std::fs::read(dir.join(PROGRESS)).ok()?).ok()?;
    let plan: Plan = serde_json::from_slice(&std::fs::read(dir.join(PLAN)).ok()?).ok()?;
    Some((plan, progress.batches.len()))
}
