//! The context tree on the real default model: what the encoder keeps equals a plain forward,
//! and the stored tree survives kill -9 (resume, byte-identical) and damage (rebuilt).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::IndexOp;
use slm_chat::model::Forward;
use slm_chat::tree::Downsample;
use slm_chat::tree::{layout, Encoder, TreeConfig};

use crate::util::{default_model, exe, llm, shared};

fn book(chars: usize) -> String {
    let text = std::fs::read_to_string(shared().join("corpus/books/pride_and_prejudice.txt"))
        .expect("book");
    let mut end = chars.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn tokens(n: usize, skip: usize) -> Vec<u32> {
    let ids = llm()
        .tokenizer
        .encode(&book(30_000), false)
        .expect("encode");
    ids[skip..skip + n].to_vec()
}

fn config(downsample: Downsample, sink: Vec<u32>) -> TreeConfig {
    TreeConfig {
        chunk_tokens: 96,
        height: 2,
        alpha: vec![8, 4, 2],
        downsample,
        layers: llm().model.config().n_layer,
        vector_layer: 5,
        full_kv: true,
        batch_chunks: 2,
        sink,
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// One chunk through the encoder equals a plain forward over sink + chunk: keys (before
/// RoPE), values, the layer-0 vector at each node's end, and the levels derived from them.
#[test]
fn encoded_chunks_equal_a_plain_forward_after_the_sink() {
    let m = &llm().model;
    let sink = slm_chat::engine::sink_prefix(llm()).expect("sink");
    let a = tokens(96, 0);
    let b = tokens(90, 200);
    let cfg = config(Downsample::Strided, sink.clone());
    let enc = Encoder::new(m, cfg.clone()).expect("encoder");
    let both = enc.encode(&[&a, &b]).expect("encode");
    let alone = enc.encode(&[&b]).expect("encode");

    let all = [sink.clone(), b.clone()].concat();
    let pos: Vec<u32> = (0..all.len() as u32).collect();
    let mut cache = m.new_cache();
    let f = Forward {
        keep_kv: true,
        keep_hidden: &[0],
        ..Forward::all(m, &pos)
    };
    let out = m
        .forward(&m.embed(&all).expect("embed"), &f, &mut cache)
        .expect("forward");
    let p = sink.len();
    let kv_dim = m.config().n_kv_head * m.config().head_dim;
    let mut want = Vec::new();
    for l in &out.kv {
        for t in [&l.k, &l.v] {
            let rows = t.i(p..).expect("rows").flatten_all().expect("flat");
            want.extend(rows.to_vec1::<f32>().expect("vec"));
        }
    }
    let full: Vec<f32> = both[1].full.iter().map(|x| x.to_f32()).collect();
    // Stored in f16: the difference is the rounding (|x| < 64 here, so < 0.03) plus the
    // batched pass's last-bit differences.
    let d = max_abs(&full, &want);
    assert!(d < 0.05, "chunk 2 in a batch vs plain forward: {d}");
    assert_eq!(
        both[1].full, alone[0].full,
        "batching must not change a chunk"
    );

    // Strided levels are exactly rows of the full KV.
    let spans = layout::node_spans(b.len(), 2);
    for w in 0..=2 {
        let rows = layout::level_rows(&spans, w, cfg.alpha[w]);
        let n_rows = rows.last().map_or(0, |r| r.end);
        let first = layout::node_number(w, 0);
        for (node, r) in spans[first..first + (1 << w)].iter().zip(&rows) {
            for (j, row) in r.clone().enumerate() {
                let tok = node.start + j * cfg.alpha[w];
                for layer in [0, 17, 29] {
                    for kv in 0..2 {
                        let got = &alone[0].levels[w][((layer * 2 + kv) * n_rows + row) * kv_dim..]
                            [..kv_dim];
                        let src =
                            &alone[0].full[((layer * 2 + kv) * b.len() + tok) * kv_dim..][..kv_dim];
                        assert_eq!(got, src, "level {w} row {row} layer {layer}");
                    }
                }
            }
        }
    }

    // The paper's vector: layer-0 output at each node's last token.
    let h0 = out.hidden_at[0]
        .1
        .i(p..)
        .expect("rows")
        .to_vec2::<f32>()
        .expect("vec");
    let d_model = m.config().d_model;
    for (n, s) in spans.iter().enumerate() {
        let got = &alone[0].paper[n * d_model..(n + 1) * d_model];
        let d = max_abs(got, &h0[s.end - 1]);
        assert!(d < 1e-3, "node {n}: paper vector differs by {d}");
    }
}

/// Mean levels are the average of each group of α tokens of the node.
#[test]
fn mean_levels_average_each_group() {
    let m = &llm().model;
    let sink = slm_chat::engine::sink_prefix(llm()).expect("sink");
    let c = tokens(77, 50);
    let cfg = config(Downsample::Mean, sink);
    let out = Encoder::new(m, cfg.clone())
        .expect("encoder")
        .encode(&[&c])
        .expect("encode")
        .remove(0);
    let kv_dim = m.config().n_kv_head * m.config().head_dim;
    let spans = layout::node_spans(c.len(), 2);
    let w = 1;
    let alpha = cfg.alpha[w];
    let rows = layout::level_rows(&spans, w, alpha);
    let n_rows = rows.last().map_or(0, |r| r.end);
    let node = &spans[layout::node_number(w, 1)];
    let last = rows[1].end - 1;
    let group = node.start + (last - rows[1].start) * alpha..node.end;
    assert!(group.len() < alpha, "the last group is partial: {group:?}");
    for layer in [0, 29] {
        let mut want = vec![0f32; kv_dim];
        for t in group.clone() {
            let src = &out.full[((layer * 2) * c.len() + t) * kv_dim..][..kv_dim];
            want.iter_mut().zip(src).for_each(|(a, x)| *a += x.to_f32());
        }
        want.iter_mut().for_each(|a| *a /= group.len() as f32);
        let got: Vec<f32> = out.levels[w][((layer * 2) * n_rows + last) * kv_dim..][..kv_dim]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert!(max_abs(&got, &want) < 0.05, "layer {layer}");
    }
}

/// A small book and settings that make many small batches, so a build can be killed midway.
struct Book {
    _dir: tempfile::TempDir,
    file: PathBuf,
}

fn small_book() -> Book {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("pride.txt");
    std::fs::write(&file, book(9_000)).expect("write");
    Book { _dir: dir, file }
}

fn slm(cache: &Path) -> Command {
    let mut c = Command::new(exe());
    c.env("SLM_CHAT_PATHS_CACHE_DIR", cache)
        .env("SLM_CHAT_TREE_CHUNK_TOKENS", "128")
        .env("SLM_CHAT_TREE_HEIGHT", "2")
        .env("SLM_CHAT_TREE_ALPHA", "[8, 4, 2]")
        .env("SLM_CHAT_TREE_BATCH_CHUNKS", "1")
        .env("SLM_CHAT_STORE_FULL_KV", "always")
        .arg("--model")
        .arg(default_model());
    c
}

fn ingest(cache: &Path, file: &Path) -> (String, String) {
    let out = slm(cache).arg("ingest").arg(file).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ingest failed: {stderr}");
    (stdout, stderr)
}

/// `slm-chat ingest --json FILE` with `store.full_kv = full_kv`: its report.
fn ingest_json(cache: &Path, file: &Path, full_kv: &str) -> serde_json::Value {
    let out = slm(cache)
        .env("SLM_CHAT_STORE_FULL_KV", full_kv)
        .args(["ingest", "--json"])
        .arg(file)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The one tree directory under `cache`.
fn tree_dir(cache: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cache.join("trees"))
        .expect("trees")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.remove(0)
}

/// Every file of a tree (but the lock) with its bytes, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name() != ".lock")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect();
    out.sort();
    out
}

fn assert_same_tree(a: &Path, b: &Path) {
    let (fa, fb) = (files(a), files(b));
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fa), names(&fb));
    for ((name, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(x == y, "{name} differs");
    }
}

/// kill -9 in the middle of an ingest, run it again: it continues from the last finished
/// batch, and the result is byte for byte the tree of an uninterrupted build.
#[test]
fn a_killed_ingest_resumes_and_ends_byte_identical() {
    let book = small_book();
    let whole = tempfile::tempdir().expect("tmp");
    let (out, _) = ingest(whole.path(), &book.file);
    assert!(out.contains("built in"), "{out}");
    let reference = tree_dir(whole.path());
    let batches = files(&reference)
        .iter()
        .filter(|(n, _)| n.starts_with("batch-"))
        .count();
    assert!(batches >= 10, "the test needs many batches, got {batches}");

    let killed = tempfile::tempdir().expect("tmp");
    let mut child = slm(killed.path())
        .arg("ingest")
        .arg(&book.file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    let done_batches = |dir: &Path| -> usize {
        std::fs::read_dir(dir)
            .map(|es| {
                es.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("batch-"))
                    .count()
            })
            .unwrap_or(0)
    };
    loop {
        let dirs: Vec<PathBuf> = std::fs::read_dir(killed.path().join("trees"))
            .map(|es| es.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if dirs.first().is_some_and(|d| done_batches(d) >= 3) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no batch was written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let partial = tree_dir(killed.path());
    assert!(
        !partial.join("manifest.json").exists(),
        "killed before the end"
    );
    let listed = slm(killed.path())
        .args(["cache", "ls"])
        .output()
        .expect("ls");
    assert!(String::from_utf8_lossy(&listed.stdout).contains("partial"));

    let (out, _) = ingest(killed.path(), &book.file);
    assert!(out.contains("resumed after"), "{out}");
    assert_same_tree(&partial, &reference);
}

/// A flipped byte, a truncated tensor file or an older format: detected, said in one line,
/// rebuilt — and the rebuilt tree is the one a clean build makes.
#[test]
fn damaged_trees_are_detected_and_rebuilt() {
    let book = small_book();
    let cache = tempfile::tempdir().expect("tmp");
    ingest(cache.path(), &book.file);
    let dir = tree_dir(cache.path());
    let clean = tempfile::tempdir().expect("tmp");
    for (name, bytes) in files(&dir) {
        std::fs::write(clean.path().join(name), bytes).expect("copy");
    }
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 4] = [
        ("flipped byte in a tensor", |d| {
            let p = d.join("batch-00003.safetensors");
            let mut b = std::fs::read(&p).expect("read");
            let at = b.len() - 100;
            b[at] ^= 0x40;
            std::fs::write(&p, b).expect("write");
        }),
        ("truncated tensor file", |d| {
            let p = d.join("batch-00001.safetensors");
            let b = std::fs::read(&p).expect("read");
            std::fs::write(&p, &b[..b.len() / 2]).expect("write");
        }),
        ("older format", |d| {
            let p = d.join("manifest.json");
            let t = std::fs::read_to_string(&p).expect("read");
            std::fs::write(&p, t.replacen("\"format\":1", "\"format\":0", 1)).expect("write");
        }),
        ("flipped byte in the text", |d| {
            let p = d.join("text.txt");
            let mut b = std::fs::read(&p).expect("read");
            b[10] ^= 0x01;
            std::fs::write(&p, b).expect("write");
        }),
    ];
    for (what, damage) in damages {
        damage(&dir);
        let (out, err) = ingest(cache.path(), &book.file);
        assert!(out.contains("built in"), "{what}: {out}");
        let notes: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("damaged") || l.contains("format"))
            .collect();
        assert!(
            !notes.is_empty() && notes.iter().all(|l| l.starts_with("slm-chat: ")),
            "{what}: {err}"
        );
        assert_same_tree(&dir, clean.path());
    }
}

/// `cache path`, `cache ls` and `cache rm` on a real stored tree.
#[test]
fn cache_lists_and_removes_trees() {
    let book = small_book();
    let cache = tempfile::tempdir().expect("tmp");
    let run = |args: &[&str]| {
        let out = slm(cache.path()).args(args).output().expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["cache", "ls"]);
    assert_eq!((code, out.contains("no stored trees")), (Some(0), true));
    ingest(cache.path(), &book.file);
    let (_, path, _) = run(&["cache", "path"]);
    assert_eq!(path.trim(), cache.path().join("trees").to_string_lossy());
    let (_, out, _) = run(&["cache", "ls"]);
    assert!(
        out.contains("complete") && out.contains("pride.txt"),
        "{out}"
    );
    let (code, _, err) = run(&["cache", "rm", "nosuchkey"]);
    assert_eq!(code, Some(2));
    assert!(
        err.starts_with("slm-chat: no stored tree matches nosuchkey"),
        "{err}"
    );
    let file = book.file.to_string_lossy().into_owned();
    let (code, out, _) = run(&["cache", "rm", &file]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("removed "), "{out}");
    let (_, out, _) = run(&["cache", "ls"]);
    assert!(out.contains("no stored trees"), "{out}");
}

/// A book that shares its start with a stored one (an edited copy, a longer version) reuses
/// those chunks' encodings, and the tree is byte for byte the one a clean build makes — also
/// when the new tree keeps less (no full KV) than the one it borrows from.
#[test]
fn shared_chunks_are_reused_and_the_tree_is_unchanged() {
    let book = small_book();
    let text = std::fs::read_to_string(&book.file).expect("read");
    let longer = book.file.with_file_name("pride-longer.txt");
    std::fs::write(
        &longer,
        format!("{text}\nThe vault's passphrase is OPAL-RIVER-3141.\n"),
    )
    .expect("write");
    let json = |cache: &Path, file: &Path| ingest_json(cache, file, "always");
    let shared = tempfile::tempdir().expect("tmp");
    json(shared.path(), &book.file);
    let second = json(shared.path(), &longer);
    let reused = second["reused_chunks"].as_u64().unwrap_or(0);
    let chunks = second["chunks"].as_u64().unwrap_or(0);
    assert!(reused > 0 && reused < chunks, "reused {reused} of {chunks}");
    let clean = tempfile::tempdir().expect("tmp");
    let fresh = json(clean.path(), &longer);
    assert_eq!(fresh["reused_chunks"].as_u64(), Some(0));
    let a = PathBuf::from(second["path"].as_str().expect("path"));
    let b = PathBuf::from(fresh["path"].as_str().expect("path"));
    assert_same_tree(&a, &b);

    // A tree kept without full KV borrows from trees kept with it (same encoding) ...
    let levels_only = ingest_json(shared.path(), &longer, "never");
    assert_eq!(levels_only["reused_chunks"], second["chunks"]);
    let clean_levels = ingest_json(clean.path(), &longer, "never");
    assert_same_tree(
        Path::new(levels_only["path"].as_str().expect("path")),
        Path::new(clean_levels["path"].as_str().expect("path")),
    );
    // ... but a tree that keeps full KV cannot borrow it from one that has none, and a
    // levels-only tree beside a full one does not stand in the full one's way.
    let lean = tempfile::tempdir().expect("tmp");
    ingest_json(lean.path(), &book.file, "never");
    assert_eq!(
        json(lean.path(), &book.file)["reused_chunks"].as_u64(),
        Some(0)
    );
    assert_eq!(
        json(lean.path(), &longer)["reused_chunks"],
        second["reused_chunks"]
    );
}

/// With `store.full_kv = auto` (the default) a document already stored under `never` or
/// `always` opens from that tree instead of being read again; with `always` asked for
/// explicitly, a levels-only tree does not stand in for the full one.
#[test]
fn auto_opens_a_tree_kept_with_or_without_full_kv() {
    let book = small_book();
    let json = |cache: &Path, full_kv: &str| ingest_json(cache, &book.file, full_kv);
    for kept in ["never", "always"] {
        let cache = tempfile::tempdir().expect("tmp");
        let first = json(cache.path(), kept);
        assert_eq!(first["built"], true);
        let auto = json(cache.path(), "auto");
        assert_eq!(auto["built"], false, "{kept}: {auto}");
        assert_eq!(auto["path"], first["path"], "{kept}");
        assert_eq!(auto["full_kv"], first["full_kv"], "{kept}");
    }
    let cache = tempfile::tempdir().expect("tmp");
    json(cache.path(), "never");
    let full = json(cache.path(), "always");
    assert_eq!(full["built"], true);
    assert_eq!(full["full_kv"], true);
}
