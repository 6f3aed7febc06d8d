//! Reading a document once: find its stored tree, or build it chunk batch by chunk batch
//! with the lower model (resuming a stopped build), and open it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::session::{Progress, Stage};
use super::EngineError;
use crate::config::Config;
use crate::document::{self, Document, LoadOptions};
use crate::model::Llm;
use crate::store::FullKv;
use crate::store::{self, Build, ChunkEntry, Contents, NodeEntry, Plan, StoreError, Sum, Tree};
use crate::tree::{chunk, layout, level_indexes, Encoder, TreeConfig};

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

/// The settings that decide a tree's contents, as its cache key sees them.
fn key_settings(config: &Config, sink: &[u32]) -> Vec<u8> {
    serde_json::to_vec(&(&config.tree, &config.store, sink)).unwrap_or_default()
}

/// Where the tree of the document whose bytes hash to `doc` is kept.
fn dir_for(llm: &Llm, doc: &str, config: &Config) -> Result<PathBuf, EngineError> {
    let model = store::hash_model(&llm.path)?;
    let sink = super::sink_prefix(llm)?;
    Ok(config
        .trees_dir()
        .join(store::key(doc, &model, &key_settings(config, &sink))))
}

/// Open the stored tree of `file`, building it first when there is none (or it is damaged).
///
/// `say` receives progress; setting `cancel` stops a build after the batch being encoded,
/// keeping what is finished for the next run. With `verify`, a stored tree has every tensor
/// checked now (otherwise each is checked the first time it is read).
pub fn open_or_build(
    llm: &Llm,
    file: &Path,
    config: &Config,
    verify: bool,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<(Tree, IngestReport), EngineError> {
    open_or_rebuild(llm, file, config, verify, None, say, cancel)
}

/// Build the tree of `file` again because `why` (damage found while reading it).
pub fn rebuild(
    llm: &Llm,
    file: &Path,
    config: &Config,
    why: &StoreError,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<(Tree, IngestReport), EngineError> {
    open_or_rebuild(llm, file, config, false, Some(why.to_string()), say, cancel)
}

fn open_or_rebuild(
    llm: &Llm,
    file: &Path,
    config: &Config,
    verify: bool,
    damaged: Option<String>,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<(Tree, IngestReport), EngineError> {
    let start = Instant::now();
    let hash = store::hash_file(file)?;
    let dir = dir_for(llm, &hash, config)?;
    let mut rebuilt = damaged;
    let opened = match &rebuilt {
        Some(why) => Err(StoreError::corrupt(&dir, why.clone())),
        None => Tree::open(&dir),
    };
    let opened = opened.and_then(|t| {
        if verify {
            say(&note(Stage::Open, "checking the stored tree".into()));
            t.verify_all()?;
        }
        Ok(t)
    });
    match opened {
        Ok(tree) => {
            let report = report(file, &tree, start, false, 0, 0, None);
            return Ok((tree, report));
        }
        Err(e) if e.needs_rebuild() => {
            // Cleared and rebuilt under the build lock, never deleted from outside it.
            say(&note(Stage::Open, format!("{e}; building it again")));
            rebuilt.get_or_insert(e.to_string());
        }
        Err(StoreError::Missing(_)) => {
            if let Some(tree) = kept_otherwise(llm, &hash, config) {
                let report = report(file, &tree, start, false, 0, 0, None);
                return Ok((tree, report));
            }
        }
        Err(StoreError::Partial(_)) => {}
        Err(e) => return Err(e.into()),
    }
    say(&note(
        Stage::Document,
        format!("reading {}", file.display()),
    ));
    let exe = std::env::current_exe().map_err(|e| StoreError::Io {
        path: PathBuf::from("slm-chat"),
        error: e,
    })?;
    let doc = document::load(file, &LoadOptions::new(exe))?;
    // The key names the bytes hashed above: text read from an edited file must not be
    // stored under it.
    if store::hash_file(file)? != hash {
        return Err(EngineError::Changed(file.display().to_string()));
    }
    let replace = rebuilt.is_some();
    let source = Source {
        file,
        doc: &doc,
        hash,
    };
    match build(llm, &source, &dir, config, replace, say, cancel, start) {
        Ok((tree, mut report)) => {
            report.rebuilt = rebuilt;
            Ok((tree, report))
        }
        // Another slm-chat finished it while this one read the document.
        Err(EngineError::Store(StoreError::Finished(_))) => {
            let tree = Tree::open(&dir)?;
            let report = report(file, &tree, start, false, 0, 0, None);
            Ok((tree, report))
        }
        Err(e) => Err(e),
    }
}

/// With `store.full_kv = auto`, a finished tree of the same document kept with or without
/// full-resolution KV (`always` or `never`) serves as well as one `auto` would build: a
/// book read before the default changed opens instead of being read again.
fn kept_otherwise(llm: &Llm, hash: &str, config: &Config) -> Option<Tree> {
    if config.store.full_kv != FullKv::Auto {
        return None;
    }
    [FullKv::Always, FullKv::Never]
        .into_iter()
        .find_map(|kept| {
            let mut other = config.clone();
            other.store.full_kv = kept;
            Tree::open(&dir_for(llm, hash, &other).ok()?).ok()
        })
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

#[allow(clippy::too_many_arguments)]
fn build(
    llm: &Llm,
    source: &Source,
    dir: &Path,
    config: &Config,
    replace: bool,
    say: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
    start: Instant,
) -> Result<(Tree, IngestReport), EngineError> {
    let (file, doc) = (source.file, source.doc);
    let t = &config.tree;
    let mc = llm.model.config();
    say(&note(Stage::Document, "tokenizing".into()));
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
    let full_kv = match config.store.full_kv {
        FullKv::Always => true,
        FullKv::Never => false,
        FullKv::Auto => full_bytes <= config.store.disk_budget_gb * 1e9,
    };
    let cfg = TreeConfig {
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
    let entries: Vec<ChunkEntry> = chunks
        .iter()
        .map(|c| ChunkEntry {
            ids: store::ids_hash(&enc.ids[c.tokens.clone()]),
            nodes: layout::node_spans(c.tokens.len(), t.height)
                .into_iter()
                .map(|s| {
                    let (a, b) = (c.tokens.start + s.start, c.tokens.start + s.end);
                    let chars = if a < b {
                        (enc.offsets[a].0, enc.offsets[b - 1].1)
                    } else {
                        let at = enc.offsets.get(a).map_or(doc.text.len(), |o| o.0);
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
        .collect();
    let spans: Vec<Vec<(usize, usize)>> = entries
        .iter()
        .map(|c| c.nodes.iter().map(|n| n.chars).collect())
        .collect();
    let bm25 = level_indexes(&doc.text, &spans, t.height);
    let contents = Contents {
        text: &doc.text,
        token_ids: store::token_file(&enc.ids)?,
        bm25: serde_json::to_vec(&bm25).map_err(|e| StoreError::Io {
            path: dir.join("bm25.json"),
            error: e.into(),
        })?,
    };
    let plan = Plan {
        format: store::FORMAT_VERSION,
        source: file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        title: doc.title.clone(),
        document: source.hash.clone(),
        model: store::hash_model(&llm.path)?,
        config: cfg.clone(),
        tokens: enc.ids.len(),
        kv_dim,
        d_model: mc.d_model,
        chunks: entries,
        text: Sum::of(doc.text.as_bytes()),
        token_ids: Sum::of(&contents.token_ids),
        bm25: Sum::of(&contents.bm25),
    };
    // Settings the model cannot run fail before anything is written.
    let encoder = Encoder::new(&llm.model, cfg)?;
    let mut build = Build::begin(dir, plan, &contents, replace)?;
    let per = t.batch_chunks;
    let total = chunks.len();
    let resumed = (build.batches_done() * per).min(total);
    let encode_start = Instant::now();
    let mut encoded_tokens = 0usize;
    let mut encoded_chunks = 0usize;
    let (mut encode_secs, mut write_secs) = (0.0, 0.0);
    // Chunks with the same tokens in another tree of this model and encoding (an edited
    // book, a book inside a larger one) are copied from it instead of encoded again: a
    // chunk's encoding depends only on its tokens (batching does not change it, tested).
    let key = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let donors = store::chunk_donors(&config.trees_dir(), &key, &build.plan().config);
    let mut opened: std::collections::HashMap<PathBuf, Tree> = std::collections::HashMap::new();
    let mut reused_chunks = 0usize;
    for (b, batch) in chunks.chunks(per).enumerate().skip(build.batches_done()) {
        if cancel.load(Ordering::SeqCst) {
            return Err(EngineError::Cancelled);
        }
        let t0 = Instant::now();
        let mut encoded: Vec<Option<crate::tree::EncodedChunk>> = Vec::with_capacity(batch.len());
        for c in batch {
            let hash = &build.plan().chunks[c.index].ids;
            let found = match donors.get(hash) {
                Some((donor, j)) => {
                    if !opened.contains_key(donor) {
                        if let Ok(t) = Tree::open(donor) {
                            opened.insert(donor.clone(), t);
                        }
                    }
                    // A donor that cannot give the chunk (damaged, no full KV) is skipped.
                    opened
                        .get(donor)
                        .and_then(|t| t.encoded_chunk(*j, full_kv).ok().flatten())
                        .filter(|e| e.len == c.tokens.len())
                }
                None => None,
            };
            encoded.push(found);
        }
        let missing: Vec<usize> = (0..batch.len()).filter(|&i| encoded[i].is_none()).collect();
        reused_chunks += batch.len() - missing.len();
        if !missing.is_empty() {
            let ids: Vec<&[u32]> = missing
                .iter()
                .map(|&i| &enc.ids[batch[i].tokens.clone()])
                .collect();
            for (i, e) in missing.iter().zip(encoder.encode(&ids)?) {
                encoded[*i] = Some(e);
            }
            encoded_tokens += ids.iter().map(|c| c.len()).sum::<usize>();
        }
        let encoded: Vec<crate::tree::EncodedChunk> = encoded.into_iter().flatten().collect();
        let t1 = Instant::now();
        build.add_batch(&encoded)?;
        encode_secs += (t1 - t0).as_secs_f64();
        write_secs += t1.elapsed().as_secs_f64();
        encoded_chunks += missing.len();
        let secs = encode_start.elapsed().as_secs_f64();
        let done = ((b + 1) * per).min(total);
        let tok_s = encoded_tokens as f64 / secs.max(1e-9);
        let left: usize = chunks[done..].iter().map(|c| c.tokens.len()).sum();
        let reused = if reused_chunks > 0 {
            format!(" ({reused_chunks} reused)")
        } else {
            String::new()
        };
        say(&Progress {
            stage: Stage::Encode,
            done,
            total,
            tok_s,
            eta_secs: Some(left as f64 / tok_s.max(1e-9)),
            message: format!("encoding chunks {done}/{total}{reused}"),
        });
    }
    let dir = build.finish()?;
    let tree = Tree::open(&dir)?;
    let mut r = report(file, &tree, start, true, resumed, encoded_chunks, None);
    r.tok_s = encoded_tokens as f64 / encode_start.elapsed().as_secs_f64().max(1e-9);
    r.encode_secs = encode_secs;
    r.reused_chunks = reused_chunks;
    r.write_secs = write_secs;
    Ok((tree, r))
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
