//! Dense search on the real embedder (all-MiniLM-L6-v2, fetched like the default model):
//! what it ranks, the dense vectors stored beside a real tree, and the fallback to BM25 when
//! it cannot be had.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use slm_chat::config::Config;
use slm_chat::engine::dense::{dense_index, session};
use slm_chat::engine::ingest::open_or_build;
use slm_chat::model::{ensure_embedder, Embedder};
use slm_chat::tree::layout::node_number;
use slm_chat::tree::search::SearchSettings;
use slm_chat::tree::search::{Policy, Scorer};

use crate::util::{default_model, exe, llm, shared};

/// The embedder's folder in the user's cache, fetched through the same code a first run uses.
fn embedder_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let config = Config::load(None).expect("settings load");
        ensure_embedder(&config.models_dir(), &mut |m| eprintln!("{m}"))
            .expect("the embedder is available (run .ci/run or `slm-chat models --fetch`)")
    })
    .clone()
}

fn embedder() -> Arc<Embedder> {
    static E: OnceLock<Arc<Embedder>> = OnceLock::new();
    E.get_or_init(|| {
        Arc::new(Embedder::load(&embedder_dir(), &candle_core::Device::Cpu).expect("loads"))
    })
    .clone()
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn the_embedder_puts_a_paraphrase_near_and_an_unrelated_sentence_far() {
    let e = embedder();
    let texts = [
        "A man is playing a guitar on the stage.",
        "Someone performs music on an instrument.",
        "Interest rates rose sharply at the central bank.",
    ];
    let v = e.embed(&texts).expect("embed");
    let d = e.dim();
    assert_eq!(v.len(), 3 * d);
    let row = |i: usize| &v[i * d..(i + 1) * d];
    for i in 0..3 {
        assert!((cos(row(i), row(i)) - 1.0).abs() < 1e-4, "unit length");
    }
    let (near, far) = (cos(row(0), row(1)), cos(row(0), row(2)));
    assert!(
        near > 0.4 && far < 0.2 && near > far + 0.3,
        "{near} vs {far}"
    );
    // Batched or one by one, remembered or not: the same vectors.
    let one = e.embed(&texts[1..2]).expect("embed");
    assert!(one.iter().zip(row(1)).all(|(a, b)| (a - b).abs() < 1e-4));
    let memo = e.embed_memo(&texts).expect("embed");
    assert!(memo.iter().zip(&v).all(|(a, b)| (a - b).abs() < 1e-4));
}

/// A real tree gets its dense vectors once (stored, then read back equal); `dense` search
/// ranks first the leaf whose own embedding is nearest the question's.
#[test]
fn dense_vectors_are_stored_with_the_tree_and_rank_its_leaves() {
    let text = std::fs::read_to_string(shared().join("corpus/books/emma.txt")).expect("book");
    let start = text.find("Emma Woodhouse, handsome").unwrap_or(0);
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("emma.txt");
    std::fs::write(&file, &text[start..start + 6000]).expect("write");
    let cache = tempfile::tempdir().expect("tmp");
    let mut config = Config::default();
    config.paths.cache_dir = cache.path().to_string_lossy().into_owned();
    config.model.path = default_model().to_string_lossy().into_owned();
    let (tree, _) = open_or_build(
        llm(),
        &file,
        &config.engine_settings(crate::util::exe()).ingest,
        false,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect("ingest");
    let e = embedder();
    let first = dense_index(&tree, &e, &mut |_| {}).expect("embedded");
    assert!(tree.dir().join("dense.safetensors").is_file());
    let again = dense_index(&tree, &e, &mut |_| panic!("embedded again")).expect("read");
    assert!(first
        .vectors
        .iter()
        .zip(&again.vectors)
        .all(|(a, b)| (a - b).abs() < 1e-3));
    // The question's nearest leaf, computed here from the leaves' own text.
    let plan = tree.manifest().plan.clone();
    let h = plan.config.height;
    let question = "How old was Emma's governess's husband, and whom did Miss Taylor marry?";
    let q = e.embed(&[question]).expect("embed");
    let d = e.dim();
    let leaves: Vec<(usize, usize)> = plan
        .chunks
        .iter()
        .flat_map(|c| (0..1 << h).map(move |i| c.nodes[node_number(h, i)].chars))
        .collect();
    let texts: Vec<&str> = leaves.iter().map(|&(a, b)| &tree.text()[a..b]).collect();
    let v = e.embed(&texts).expect("embed");
    let best = (0..leaves.len())
        .max_by(|&a, &b| cos(&v[a * d..][..d], &q).total_cmp(&cos(&v[b * d..][..d], &q)))
        .expect("leaves");
    let mut s = session(llm(), tree, Some(&e), &mut |_| {}).expect("session");
    assert!(s.has_dense());
    let settings = SearchSettings {
        scorer: Scorer::Dense,
        neighbours: 0.0,
        policy: Policy::Ranked,
        ..SearchSettings::default()
    };
    let r = s.retrieve(question, &[], &settings, 64).expect("search");
    assert_eq!(r.scorer, Scorer::Dense);
    assert_eq!(r.candidates[0], leaves[best]);
    // The best candidate is read at full resolution.
    let read: Vec<_> = r.selected.iter().filter(|n| n.alpha == 1).collect();
    assert!(read.iter().any(|n| {
        plan.chunks[n.chunk].nodes[node_number(n.level, n.index)].chars == leaves[best]
    }));
}

/// `slm-chat ask --scorer SCORER FILE QUESTION` over a one-line document `text`, with the
/// cache in `cache` and no python3 on the PATH (so nothing can be fetched): exit success and
/// stderr.
fn ask_without_python(cache: &Path, text: &str, scorer: &str, question: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("note.txt");
    std::fs::write(&file, text).expect("write");
    let empty_path = tempfile::tempdir().expect("tmp");
    let out = Command::new(exe())
        .env("SLM_CHAT_PATHS_CACHE_DIR", cache)
        .env("PATH", empty_path.path())
        .arg("--model")
        .arg(default_model())
        .args(["ask", "--scorer", scorer, "--max-tokens", "8"])
        .arg(&file)
        .arg(question)
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Without the embedder (no python3 to fetch it with), `hybrid` says once that dense search
/// is off and answers with BM25 alone.
#[test]
fn without_the_embedder_search_falls_back_to_bm25_in_one_line() {
    let cache = tempfile::tempdir().expect("tmp");
    let (ok, stderr) = ask_without_python(
        cache.path(),
        "The lighthouse keeper was called Tobias Wren. He kept a grey cat named Pepper.\n",
        "hybrid",
        "What was the lighthouse keeper called?",
    );
    assert!(ok, "{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("dense search is off, ranking with BM25 alone"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(said[0].contains("python3"), "{stderr}");
    assert!(!stderr.contains("panicked"));
    assert!(!Path::new(&cache.path().join("models/all-MiniLM-L6-v2")).exists());
}

/// `rag` ranks its passages with the same scorers: `dense` finds a passage that shares no
/// word with the question, which BM25 cannot.
#[test]
fn rag_ranks_passages_with_the_dense_scorer() {
    use slm_chat::engine::{ask, AskSettings, EngineError, Method};
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("town.txt");
    std::fs::write(
        &file,
        "The old lighthouse stood on the northern cliff above the harbour. Its lamp was lit \
         every evening at dusk by the keeper.\n\n\
         At the bakery on Mill Lane the ovens were fired before dawn. Loaves and rolls were \
         sold warm to the fishermen.\n\n\
         Every Saturday a violinist gave a concert in the town hall. Her sonatas and waltzes \
         filled the room until late at night.\n",
    )
    .expect("write");
    let doc = crate::util::load(&file).expect("document");
    let mut config = Config::default();
    config.rag.chunk_tokens = 32;
    config.rag.max_tokens = 200;
    config.search.scorer = Scorer::Dense;
    let settings = AskSettings::new(Method::Rag, &config.rag, &config.search, Some(embedder()));
    let question = "Who played the violin?";
    let a = ask(
        llm(),
        &doc,
        question,
        &settings,
        &crate::util::greedy(8),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .expect("answer");
    // Every passage is ranked (dense leaves none out), the one about the violinist first.
    assert_eq!(a.sources.len(), 3, "{:?}", a.sources);
    let (from, to) = a.sources[0].chars;
    assert!(doc.text[from..to].contains("violinist"), "{:?}", a.sources);
    config.search.scorer = Scorer::Bm25;
    let bm25 = ask(
        llm(),
        &doc,
        question,
        &AskSettings::new(Method::Rag, &config.rag, &config.search, None),
        &crate::util::greedy(8),
        &AtomicBool::new(false),
        &mut |_| {},
    );
    assert!(matches!(bm25, Err(EngineError::NothingMatches)), "{bm25:?}");
}

/// A damaged embedder is found by its checksum and fetched again; where that cannot be done
/// (no python3 here), the answer still comes, ranked by BM25, after one line for each.
#[test]
fn a_damaged_embedder_is_named_and_search_falls_back() {
    let cache = tempfile::tempdir().expect("tmp");
    let copy = cache
        .path()
        .join("models")
        .join(slm_chat::model::EMBEDDER_DIR);
    std::fs::create_dir_all(&copy).expect("dir");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(embedder_dir().join(f), copy.join(f)).expect("copy");
    }
    std::fs::write(copy.join("tokenizer.json"), b"{}").expect("damage");
    let (ok, stderr) = ask_without_python(
        cache.path(),
        "The ferry to the island leaves at seven every morning.\n",
        "dense",
        "When does the ferry leave?",
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("tokenizer.json is damaged"))
            .count(),
        1,
        "{stderr}"
    );
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("dense search is off"))
            .count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}
