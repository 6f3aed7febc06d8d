//! Reading a document once: find its stored tree, or build it chunk batch by chunk batch
//! with the lower model (resuming a stopped build), and open it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::session::{Progress, Stage};
use super::EngineError;
use crate::document::{self, Document, LoadOptions};
use crate::model::Llm;
use crate::store::{
    self, Build, ChunkEntry, Contents, FullKv, NodeEntry, Plan, StoreError, StoreSettings, Sum,
    Tree,
};
use crate::tree::{
    chunk, layout, level_indexes, Chunk, EncodedChunk, Encoder, TreeConfig, TreeSettings,
};

/// What one ingest did.
#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    pub source: PathBuf,
    pub path: PathBuf,
    pub tokens: usize,
    pub chunks: usize,
    /// False when the tree was already stored.
    pub built: bool,
    /// Chunks found finished from a stopped build.
    pub resumed_chunks: usize,
    /// Chunks encoded now.
    pub encoded_chunks: usize,
    /// Chunks copied from another stored tree that has the same tokens.
    pub reused_chunks: usize,
    pub seconds: f64,
    /// Document tokens encoded per second (this run).
    pub tok_s: f64,
    /// Of `seconds`: running the lower model (with downsampling and node vectors), and
    /// writing batches (serializing, checksums, fsync).
    pub encode_secs: f64,
    pub write_secs: f64,
    /// Embedding the passages for dense search (when the scorer uses it and they were not
    /// stored yet; `None` when not run).
    pub dense_secs: Option<f64>,
    pub store_bytes: u64,
    pub full_kv: bool,
    /// Why the stored tree was rebuilt, when it was.
    pub rebuilt: Option<String>,
}

/// How documents are read into trees and where the trees are kept.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub tree: TreeSettings,
    pub store: StoreSettings,
    pub trees_dir: PathBuf,
    /// How documents are loaded (the PDF worker command among them).
    pub load: LoadOptions,
}

/// The settings that decide the stored bytes, as the cache key sees them: the tree's shape
/// and encoding, whether every token's KV is kept, and the sink prefix. How many chunks go
/// through the model at once and the disk budget (which only decides `full_kv`) are left out,
/// so changing them does not read every book again.
fn key_settings(tree: &TreeSettings, full_kv: bool, sink: &[u32]) -> Vec<u8> {
    // Taken apart field by field: a new `[tree]` key must be placed in or out of the key.
    let TreeSettings {
        chunk_tokens,
        height,
        alpha,
        downsample,
        lower_layers,
        vector_layer,
        batch_chunks: _,
    } = tree;
    let shape = (
        chunk_tokens,
        height,
        alpha,
        downsample,
        lower_layers,
        vector_layer,
    );
    serde_json::to_vec(&(shape, full_kv, sink)).unwrap_or_default()
}

/// Where trees of one document are kept, by whether they keep full-resolution KV.
struct Keys {
    trees_dir: PathBuf,
    doc: String,
    model: String,
    tree: TreeSettings,
    sink: Vec<u32>,
}

impl Keys {
    fn new(llm: &Llm, doc: String, settings: &IngestSettings) -> Result<Self, EngineError> {
        Ok(Self {
            trees_dir: settings.trees_dir.clone(),
            doc,
            model: store::hash_model(&llm.path)?,
            tree: settings.tree.clone(),
            sink: super::sink_prefix(llm)?,
        })
    }

    fn dir(&self, full_kv: bool) -> PathBuf {
        let settings = key_settings(&self.tree, full_kv, &self.sink);
        self.trees_dir
            .join(store::key(&self.doc, &self.model, &settings))
    }

    /// Until 2026-12-06 the key hashed all of `[tree]` and `[store]` as configured. A
    /// finished tree stored under such a key (with these settings, or with `full_kv` set to
    /// `always` or `never`, which `auto` also opened) is moved to its key now, so upgrading
    /// reads no book again.
    fn adopt_legacy(&self, store_settings: &StoreSettings) {
        let kinds = [store_settings.full_kv, FullKv::Always, FullKv::Never];
        for full_kv in kinds {
            let old = StoreSettings {
                full_kv,
                ..store_settings.clone()
            };
            let Ok(settings) = serde_json::to_vec(&(&self.tree, &old, &self.sink)) else {
                continue;
            };
            let from = self
                .trees_dir
                .join(store::key(&self.doc, &self.model, &settings));
            let Ok(tree) = Tree::open(&from) else {
                continue;
            };
            let to = self.dir(tree.manifest().plan.config.full_kv);
            drop(tree);
            if !to.exists() {
                if let Err(e) = std::fs::rename(&from, &to) {
                    tracing::warn!("moving {} to {}: {e}", from.display(), to.display());
                }
            }
        }
    }
}

/// Open the stored tree of `file`, building it first when there is none (or it is damaged).
///
/// `say` receives progress; setting `cancel` stops a build after the batch being encoded,
/// keeping what is finished for the next run. With `verify`, a stored tree has every tensor
/// checked now (otherwise each is checked the first time it is read).
pub fn open_or_build(
    llm: &Llm,
    file: &Path,
    settings: &IngestSettings,
    verify: bool,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<(Tree, IngestReport), EngineError> {
    open_or_rebuild(llm, file, settings, verify, None, say, cancel)
}

/// Build the tree of `file` again because `why` (damage found while reading it).
pub fn rebuild(
    llm: &Llm,
    file: &Path,
    settings: &IngestSettings,
    why: &StoreError,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<(Tree, IngestReport), EngineError> {
    open_or_rebuild(
        llm,
        file,
        settings,
        false,
        Some(why.to_string()),
        say,
        cancel,
    )
}

/// Where a build goes: decided before reading the document when a stored tree (stopped or
/// damaged) is there to continue or replace, else from the document's size.
struct Target {
    full_kv: bool,
    dir: PathBuf,
    replace: bool,
}

fn open_or_rebuild(
    llm: &Llm,
    file: &Path,
    settings: &IngestSettings,
    verify: bool,
    damaged: Option<String>,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<(Tree, IngestReport), EngineError> {
    let start = Instant::now();
    let hash = store::hash_file(file)?;
    let keys = Keys::new(llm, hash.clone(), settings)?;
    keys.adopt_legacy(&settings.store);
    let (stored, target) = find_stored(&keys, settings, verify, damaged, say)?;
    let rebuilt = match stored {
        Found::Tree(tree) => {
            let report = report(file, &tree, start, false, 0, 0, None);
            return Ok((*tree, report));
        }
        Found::Damaged(why) => Some(why),
        Found::Nothing => None,
    };
    say(&note(
        Stage::Document,
        format!("reading {}", file.display()),
    ));
    let doc = document::load(file, &settings.load)?;
    // The key names the bytes hashed above: text read from an edited file must not be
    // stored under it.
    if store::hash_file(file)? != hash {
        return Err(EngineError::Changed(file.display().to_string()));
    }
    let source = Source {
        file,
        doc: &doc,
        hash,
    };
    say(&note(Stage::Document, "tokenizing".into()));
    let prepared = prepare(llm, &source, settings, target.as_ref().map(|t| t.full_kv))?;
    let target = target.unwrap_or_else(|| Target {
        full_kv: prepared.plan.config.full_kv,
        dir: keys.dir(prepared.plan.config.full_kv),
        replace: false,
    });
    match build(
        llm, &source, prepared, &target, settings, say, cancel, start,
    ) {
        Ok((tree, mut report)) => {
            report.rebuilt = rebuilt;
            Ok((tree, report))
        }
        // Another slm-chat finished it while this one read the document.
        Err(EngineError::Store(StoreError::Finished(_))) => {
            let tree = Tree::open(&target.dir)?;
            let report = report(file, &tree, start, false, 0, 0, None);
            Ok((tree, report))
        }
        Err(e) => Err(e),
    }
}
/// What the stored trees of a document offer.
enum Found {
    Tree(Box<Tree>),
    /// A tree to build again, and why.
    Damaged(String),
    Nothing,
}

/// Open the stored tree of the document `keys` names, or say where a build should go: a
/// damaged tree (`damaged`, or found so now) is replaced in place, a stopped build resumed.
fn find_stored(
    keys: &Keys,
    settings: &IngestSettings,
    verify: bool,
    damaged: Option<String>,
    say: &mut dyn FnMut(&Progress),
) -> Result<(Found, Option<Target>), EngineError> {
    // With `full_kv = auto`, a tree kept either way serves: one with every token's KV first
    // (it answers sooner).
    let kinds: &[bool] = match settings.store.full_kv {
        FullKv::Always => &[true],
        FullKv::Never => &[false],
        FullKv::Auto => &[true, false],
    };
    let replace = |full_kv, dir| {
        Some(Target {
            full_kv,
            dir,
            replace: true,
        })
    };
    if let Some(why) = damaged {
        let target = kinds
            .iter()
            .map(|&full_kv| (full_kv, keys.dir(full_kv)))
            .find(|(_, dir)| dir.exists());
        let target = target.and_then(|(full_kv, dir)| replace(full_kv, dir));
        return Ok((Found::Damaged(why), target));
    }
    let mut target = None;
    for &full_kv in kinds {
        let dir = keys.dir(full_kv);
        match open_stored(&dir, verify, say) {
            Ok(tree) => return Ok((Found::Tree(Box::new(tree)), None)),
            Err(e) if e.needs_rebuild() => {
                // Cleared and rebuilt under the build lock, never deleted from outside it.
                say(&note(Stage::Open, format!("{e}; building it again")));
                return Ok((Found::Damaged(e.to_string()), replace(full_kv, dir)));
            }
            Err(StoreError::Missing(_)) => {}
            // A stopped build is continued where it stopped.
            Err(StoreError::Partial(_)) => {
                target.get_or_insert(Target {
                    full_kv,
                    dir,
                    replace: false,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((Found::Nothing, target))
}

fn open_stored(
    dir: &Path,
    verify: bool,
    say: &mut dyn FnMut(&Progress),
) -> Result<Tree, StoreError> {
    let tree = Tree::open(dir)?;
    if verify {
        say(&note(Stage::Open, "checking the stored tree".into()));
        tree.verify_all()?;
    }
    Ok(tree)
}

fn note(stage: Stage, message: String) -> Progress {
    Progress {
        stage,
        done: 0,
        total: 0,
        tok_s: 0.0,
        eta_secs: None,
        message,
    }
}

/// The document a build reads: its file, its text, and the hash of the bytes it came from.
struct Source<'a> {
    file: &'a Path,
    doc: &'a Document,
    hash: String,
}

/// A tokenized document cut into chunks, with the plan and the small files of its tree.
struct Prepared {
    ids: Vec<u32>,
    chunks: Vec<Chunk>,
    plan: Plan,
    text: String,
    token_ids: Vec<u8>,
    bm25: Vec<u8>,
}

/// Tokenize and chunk the document and plan its tree; `full_kv` is decided from the
/// document's size (`store.full_kv = auto`) unless a stored build already decided it.
fn prepare(
    llm: &Llm,
    source: &Source,
    settings: &IngestSettings,
    full_kv: Option<bool>,
) -> Result<Prepared, EngineError> {
    let doc = source.doc;
    let t = &settings.tree;
    let mc = llm.model.config();
    let enc = llm.tokenizer.encode_with_offsets(&doc.text)?;
    if enc.ids.is_empty() {
        return Err(EngineError::EmptyDocument);
    }
    let chunks = chunk(doc, &enc, t.chunk_tokens);
    let layers = if t.lower_layers == 0 {
        mc.n_layer
    } else {
        t.lower_layers
    };
    let kv_dim = mc.n_kv_head * mc.head_dim;
    let full_bytes = enc.ids.len() as f64 * (layers * 2 * kv_dim * 2) as f64;
    let store = &settings.store;
    let full_kv = full_kv.unwrap_or(match store.full_kv {
        FullKv::Always => true,
        FullKv::Never => false,
        FullKv::Auto => full_bytes <= store.disk_budget_gb * 1e9,
    });
    let config = TreeConfig {
        chunk_tokens: t.chunk_tokens,
        height: t.height,
        alpha: t.alpha.clone(),
        downsample: t.downsample,
        layers,
        vector_layer: t.vector_layer,
        full_kv,
        batch_chunks: t.batch_chunks,
        sink: super::sink_prefix(llm)?,
    };
    let entries = chunk_entries(doc, &enc.ids, &enc.offsets, &chunks, t.height);
    let spans: Vec<Vec<(usize, usize)>> = entries
        .iter()
        .map(|c| c.nodes.iter().map(|n| n.chars).collect())
        .collect();
    let bm25 = level_indexes(&doc.text, &spans, t.height);
    let bm25 = serde_json::to_vec(&bm25).map_err(|e| StoreError::Io {
        path: PathBuf::from("bm25.json"),
        error: e.into(),
    })?;
    let token_ids = store::token_file(&enc.ids)?;
    let plan = Plan {
        format: store::FORMAT_VERSION,
        source: source
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        title: doc.title.clone(),
        document: source.hash.clone(),
        model: store::hash_model(&llm.path)?,
        config,
        tokens: enc.ids.len(),
        kv_dim,
        d_model: mc.d_model,
        chunks: entries,
        text: Sum::of(doc.text.as_bytes()),
        token_ids: Sum::of(&token_ids),
        bm25: Sum::of(&bm25),
    };
    Ok(Prepared {
        ids: enc.ids,
        chunks,
        plan,
        text: doc.text.clone(),
        token_ids,
        bm25,
    })
}

/// Each chunk's token hash and its nodes' token, character and page spans.
fn chunk_entries(
    doc: &Document,
    ids: &[u32],
    offsets: &[(usize, usize)],
    chunks: &[Chunk],
    height: usize,
) -> Vec<ChunkEntry> {
    chunks
        .iter()
        .map(|c| ChunkEntry {
            ids: store::ids_hash(&ids[c.tokens.clone()]),
            nodes: layout::node_spans(c.tokens.len(), height)
                .into_iter()
                .map(|s| {
                    let (a, b) = (c.tokens.start + s.start, c.tokens.start + s.end);
                    let chars = if a < b {
                        (offsets[a].0, offsets[b - 1].1)
                    } else {
                        let at = offsets.get(a).map_or(doc.text.len(), |o| o.0);
                        (at, at)
                    };
                    NodeEntry {
                        tokens: (a, b),
                        chars,
                        pages: (
                            doc.page_at(chars.0),
                            doc.page_at(chars.1.saturating_sub(1).max(chars.0)),
                        ),
                    }
                })
                .collect(),
        })
        .collect()
}

/// Take the build lock of `target`, waiting (and saying so, with the other build's progress)
/// while another slm-chat holds it. A lock of a process that died is released by the system,
/// so a stale lock is never waited on.
fn begin_build(
    prepared: &Prepared,
    target: &Target,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<Build, EngineError> {
    let contents = Contents {
        text: &prepared.text,
        token_ids: prepared.token_ids.clone(),
        bm25: prepared.bm25.clone(),
    };
    loop {
        match Build::begin(
            &target.dir,
            prepared.plan.clone(),
            &contents,
            target.replace,
        ) {
            Err(StoreError::Busy(_)) => {
                if cancel.load(Ordering::SeqCst) {
                    return Err(EngineError::Cancelled);
                }
                let (done, total) = store::build_progress(&target.dir).unwrap_or((0, 0));
                say(&Progress {
                    stage: Stage::Encode,
                    done,
                    total,
                    tok_s: 0.0,
                    eta_secs: None,
                    message: format!(
                        "another slm-chat is building this tree ({done}/{total} chunks); waiting for it"
                    ),
                });
                std::thread::sleep(LOCK_POLL);
            }
            other => return Ok(other?),
        }
    }
}

/// How often a build waiting for another one's lock looks again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// What encoding a build's batches did.
#[derive(Default)]
struct Encoded {
    tokens: usize,
    chunks: usize,
    reused: usize,
    encode_secs: f64,
    write_secs: f64,
}

#[allow(clippy::too_many_arguments)]
fn build(
    llm: &Llm,
    source: &Source,
    prepared: Prepared,
    target: &Target,
    settings: &IngestSettings,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
    start: Instant,
) -> Result<(Tree, IngestReport), EngineError> {
    // Settings the model cannot run fail before anything is written.
    let encoder = Encoder::new(&llm.model, prepared.plan.config.clone())?;
    let mut build = begin_build(&prepared, target, say, cancel)?;
    let per = settings.tree.batch_chunks;
    let resumed = (build.batches_done() * per).min(prepared.chunks.len());
    let encode_start = Instant::now();
    let done = encode_batches(&encoder, &mut build, &prepared, settings, say, cancel)?;
    let dir = build.finish()?;
    let tree = Tree::open(&dir)?;
    let mut r = report(source.file, &tree, start, true, resumed, done.chunks, None);
    r.tok_s = done.tokens as f64 / encode_start.elapsed().as_secs_f64().max(1e-9);
    r.encode_secs = done.encode_secs;
    r.reused_chunks = done.reused;
    r.write_secs = done.write_secs;
    Ok((tree, r))
}

/// Encode and write the batches a build still lacks.
fn encode_batches(
    encoder: &Encoder,
    build: &mut Build,
    prepared: &Prepared,
    settings: &IngestSettings,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<Encoded, EngineError> {
    let chunks = &prepared.chunks;
    let per = settings.tree.batch_chunks;
    let total = chunks.len();
    let full_kv = prepared.plan.config.full_kv;
    let encode_start = Instant::now();
    let mut done = Encoded::default();
    // Chunks with the same tokens in another tree of this model and encoding (an edited
    // book, a book inside a larger one) are copied from it instead of encoded again: a
    // chunk's encoding depends only on its tokens (batching does not change it, tested).
    let key = build
        .dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut donors = Donors {
        found: store::chunk_donors(&settings.trees_dir, &key, &build.plan().config),
        opened: std::collections::HashMap::new(),
    };
    for (b, batch) in chunks.chunks(per).enumerate().skip(build.batches_done()) {
        if cancel.load(Ordering::SeqCst) {
            return Err(EngineError::Cancelled);
        }
        let t0 = Instant::now();
        let mut encoded: Vec<Option<EncodedChunk>> = batch
            .iter()
            .map(|c| donors.chunk(&build.plan().chunks[c.index].ids, c, full_kv))
            .collect();
        let missing: Vec<usize> = (0..batch.len()).filter(|&i| encoded[i].is_none()).collect();
        done.reused += batch.len() - missing.len();
        if !missing.is_empty() {
            let ids: Vec<&[u32]> = missing
                .iter()
                .map(|&i| &prepared.ids[batch[i].tokens.clone()])
                .collect();
            for (i, e) in missing.iter().zip(encoder.encode(&ids)?) {
                encoded[*i] = Some(e);
            }
            done.tokens += ids.iter().map(|c| c.len()).sum::<usize>();
        }
        let encoded: Vec<EncodedChunk> = encoded.into_iter().flatten().collect();
        let t1 = Instant::now();
        build.add_batch(&encoded)?;
        done.encode_secs += (t1 - t0).as_secs_f64();
        done.write_secs += t1.elapsed().as_secs_f64();
        done.chunks += missing.len();
        let secs = encode_start.elapsed().as_secs_f64();
        let finished = ((b + 1) * per).min(total);
        let tok_s = done.tokens as f64 / secs.max(1e-9);
        let left: usize = chunks[finished..].iter().map(|c| c.tokens.len()).sum();
        let reused = if done.reused > 0 {
            format!(" ({} reused)", done.reused)
        } else {
            String::new()
        };
        say(&Progress {
            stage: Stage::Encode,
            done: finished,
            total,
            tok_s,
            eta_secs: Some(left as f64 / tok_s.max(1e-9)),
            message: format!("encoding chunks {finished}/{total}{reused}"),
        });
    }
    Ok(done)
}

/// Other stored trees that hold some of this build's chunks, opened when first needed.
struct Donors {
    found: std::collections::HashMap<String, (PathBuf, usize)>,
    opened: std::collections::HashMap<PathBuf, Tree>,
}

impl Donors {
    /// The encoding of chunk `c` (token hash `hash`) from a donor; `None` when no donor can
    /// give it (none has it, it is damaged, or it keeps no full KV when this tree needs it).
    fn chunk(&mut self, hash: &str, c: &Chunk, full_kv: bool) -> Option<EncodedChunk> {
        let (donor, j) = self.found.get(hash)?;
        if !self.opened.contains_key(donor) {
            if let Ok(t) = Tree::open(donor) {
                self.opened.insert(donor.clone(), t);
            }
        }
        self.opened
            .get(donor)
            .and_then(|t| t.encoded_chunk(*j, full_kv).ok().flatten())
            .filter(|e| e.len == c.tokens.len())
    }
}

fn report(
    file: &Path,
    tree: &Tree,
    start: Instant,
    built: bool,
    resumed_chunks: usize,
    encoded_chunks: usize,
    rebuilt: Option<String>,
) -> IngestReport {
    let plan = &tree.manifest().plan;
    IngestReport {
        source: file.to_path_buf(),
        path: tree.dir().to_path_buf(),
        tokens: plan.tokens,
        chunks: plan.chunks.len(),
        built,
        resumed_chunks,
        encoded_chunks,
        reused_chunks: 0,
        seconds: start.elapsed().as_secs_f64(),
        tok_s: 0.0,
        encode_secs: 0.0,
        write_secs: 0.0,
        dense_secs: None,
        store_bytes: tree.disk_bytes(),
        full_kv: plan.config.full_kv,
        rebuilt,
    }
}
