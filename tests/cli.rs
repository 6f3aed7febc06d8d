//! The real binary end to end: `ask` on the bundled sample with the real model, `bench`,
//! and bad model input, each failure one clear line with a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{default_model, exe, temp_file, write_scandal_opening};

fn sample() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/sherlock_holmes_adventures_1-3.txt")
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], model: &Path) -> Out {
    let model = model.to_str().expect("utf-8 path");
    run_env(&[&["--model", model], args].concat(), &[])
}

/// The binary with `args` and extra environment variables.
fn run_env(args: &[&str], env: &[(&str, &str)]) -> Out {
    let o = Command::new(exe())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run slm-chat");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A failure prints exactly one `slm-chat: …` line containing `needle` and exits non-zero.
fn assert_one_line_error(out: &Out, needle: &str) {
    assert_ne!(out.code, 0, "should fail: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, got: {:?}", out.stderr);
    assert!(lines[0].starts_with("slm-chat: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "'{}' lacks '{needle}'", lines[0]);
    assert!(!out.stderr.contains("panicked"));
}

#[test]
fn truncate_answers_from_a_short_document_with_the_real_model() {
    let out = run(&["ask", "--json", "--max-tokens", "24"], &default_model());
    // clap wants FILE and QUESTION; make sure usage errors are one clear message too.
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("Usage"));

    // The opening of the sample: the whole sample would need a full 8K prefill per test
    // run; the opening holds the answer and keeps the test quick.
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("story.txt");
    write_scandal_opening(&file);
    let q = "Who does Sherlock Holmes always call the woman?";
    let args = [
        "ask",
        file.to_str().expect("utf-8 path"),
        q,
        "--json",
        "--max-tokens",
        "24",
        "--method",
        "truncate",
    ];
    let out = run(&args, &default_model());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    let answer = v["answer"].as_str().unwrap_or("");
    assert!(answer.contains("Irene Adler"), "{answer}");
    let (doc, kept) = (v["document_tokens"].as_u64(), v["kept_tokens"].as_u64());
    assert_eq!(kept, doc, "a short document is seen whole");
    assert!(v["timings"]["decode_tok_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(v["memory"]["kv_bytes"].as_u64().unwrap_or(0) > 0);
}

#[test]
fn rag_answers_from_the_best_passages_and_names_their_pages() {
    let file = sample();
    let q = "How much did the Red-Headed League pay per week?";
    let out = run(
        &[
            "ask",
            file.to_str().expect("utf-8"),
            q,
            "--method",
            "rag",
            "--json",
            "--max-tokens",
            "24",
        ],
        &default_model(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    let answer = v["answer"].as_str().unwrap_or("").to_lowercase();
    assert!(
        answer.contains("4 pounds") || answer.contains("four pounds"),
        "{answer}"
    );
    let sources = v["sources"].as_array().expect("sources");
    assert!(!sources.is_empty());
    let kept = v["kept_tokens"].as_u64().expect("kept_tokens");
    assert!(kept > 0 && kept <= 1536, "within the rag budget: {kept}");
    for s in sources {
        assert!(s["first_page"].as_u64().unwrap_or(0) >= 1);
        assert!(s["score"].as_f64().unwrap_or(0.0) > 0.0);
    }
}

/// The README's first command, as a newcomer runs it: the sample read into a tree (in a
/// fresh cache), then the answer from the parts read in full, with their pages and figures.
#[test]
fn the_readme_question_is_answered_from_the_tree() {
    let cache = tempfile::tempdir().expect("tmp");
    let cache_dir = cache.path().to_str().expect("utf-8");
    let model = default_model();
    let file = sample();
    let out = run_env(
        &[
            "--model",
            model.to_str().expect("utf-8"),
            "ask",
            file.to_str().expect("utf-8"),
            "How much did the Red-Headed League pay per week?",
            "--json",
            "--max-tokens",
            "32",
        ],
        &[("SLM_CHAT_PATHS_CACHE_DIR", cache_dir)],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("read 34933 tokens into"),
        "{}",
        out.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    let answer = v["answer"].as_str().unwrap_or("").to_lowercase();
    assert!(answer.contains("4 pounds"), "{answer}");
    assert_eq!(v["method"], "tree");
    let nodes = v["nodes"].as_array().expect("nodes");
    let full: Vec<&serde_json::Value> = nodes.iter().filter(|n| n["alpha"] == 1).collect();
    assert!(
        !full.is_empty() && full.len() < nodes.len(),
        "fine and coarse nodes"
    );
    assert!(full.iter().any(|n| n["preview"]
        .as_str()
        .is_some_and(|p| p.contains("Hopkins") || p.contains("pounds"))));
    for n in nodes {
        assert!(n["pages"][0].as_u64().unwrap_or(0) >= 1, "{n}");
    }
    let m = &v["memory"];
    let injected = m["injected_bytes"].as_u64().expect("injected_bytes");
    let full_kv = m["full_attention_kv_bytes"]
        .as_u64()
        .expect("full attention");
    assert!(injected * 3 <= full_kv, "{injected} vs {full_kv}");
    assert!(v["timings"]["first_token_ms"].as_f64().unwrap_or(0.0) > 0.0);

    // The answer is backed: a passage read in full holds its key words, and is marked.
    assert_eq!(v["abstained"], false, "{v}");
    assert!(v["evidence"]["score"].is_number(), "{}", v["evidence"]);
    let key_words = v["support"]["key_words"].as_array().expect("key words");
    assert!(!key_words.is_empty(), "{}", v["support"]);
    assert!(
        full.iter().any(|n| n["supports"] == true),
        "a passage read in full supports the answer: {}",
        v["support"]
    );
    assert!(nodes
        .iter()
        .filter(|n| n["alpha"] != 1)
        .all(|n| n["supports"].is_null()));

    // A question the book has nothing on, with abstaining off: the model answers from
    // memory, and the check says no passage read holds the answer.
    let memory = run_env(
        &[
            "--model",
            model.to_str().expect("utf-8"),
            "ask",
            file.to_str().expect("utf-8"),
            "What is the capital of France?",
            "--json",
            "--max-tokens",
            "32",
        ],
        &[
            ("SLM_CHAT_PATHS_CACHE_DIR", cache_dir),
            ("SLM_CHAT_ANSWER_ABSTAIN", "false"),
        ],
    );
    assert_eq!(memory.code, 0, "{}", memory.stderr);
    let m: serde_json::Value = serde_json::from_str(&memory.stdout).expect("one JSON object");
    let answer = m["answer"].as_str().unwrap_or("");
    assert!(answer.contains("Paris"), "answered from memory: {answer}");
    assert_eq!(
        m["support"]["passages"]
            .as_array()
            .map(|p| p.iter().any(|s| s == true)),
        Some(false),
        "{}",
        m["support"]
    );
    assert!(m["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .all(|n| n["supports"] != true));
}

#[test]
fn new_commands_refuse_bad_input_in_one_line() {
    let model = default_model();
    let out = run(&["ingest", "/no/such/book.txt"], &model);
    assert_one_line_error(&out, "/no/such/book.txt");
    let file = sample();
    let out = run(&["ask", file.to_str().expect("utf-8"), "   "], &model);
    assert_one_line_error(&out, "the question is empty");
    let (_dir, bad) = temp_file("bad.jsonl", b"{\"id\": 1}\n");
    let out = run(
        &["eval", bad.to_str().expect("utf-8"), "--books", "/tmp"],
        &model,
    );
    assert_one_line_error(&out, "bad.jsonl:1:");
    let out = run(
        &[
            "eval",
            bad.to_str().expect("utf-8"),
            "--books",
            "/tmp",
            "--method",
            "rag",
            "--read-alone",
        ],
        &model,
    );
    assert_one_line_error(&out, "--read-alone reads the tree's passages");
    let out = run(&["cache", "rm"], &model);
    assert_one_line_error(&out, "--all");
}

#[test]
fn full_refuses_a_document_longer_than_the_window() {
    let file = sample();
    let out = run(
        &[
            "ask",
            file.to_str().expect("utf-8"),
            "Who?",
            "--method",
            "full",
        ],
        &default_model(),
    );
    assert_one_line_error(&out, "use --method truncate or rag");
}

#[test]
fn bench_reports_positive_figures() {
    let out = run(
        &["bench", "--json", "--reps", "1", "--prefill", "64"],
        &default_model(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON report");
    let figures = v["figures"].as_array().expect("figures");
    assert_eq!(figures.len(), 3, "prefill, encode, decode");
    for f in figures {
        assert!(f["median_tok_s"].as_f64().unwrap_or(0.0) > 0.0, "{f}");
    }
}

#[test]
fn a_missing_model_file_is_one_clear_line() {
    let out = run(&["bench"], Path::new("/nonexistent/model.gguf"));
    assert_one_line_error(&out, "no such file");
}

#[test]
fn a_truncated_gguf_is_one_clear_line() {
    let bytes = std::fs::read(default_model()).expect("model");
    let (_dir, path) = temp_file("cut.gguf", &bytes[..bytes.len() / 3]);
    let out = run(&["bench"], &path);
    assert_one_line_error(&out, "truncated");
    // It names the first tensor cut short, and its type.
    assert!(out.stderr.contains("tensor 'blk."), "{}", out.stderr);
    assert!(out.stderr.contains("(Q4_1)"), "{}", out.stderr);
    assert_eq!(out.code, 2);
}

#[test]
fn a_file_that_is_not_gguf_is_one_clear_line() {
    let (_dir, path) = temp_file("junk.gguf", b"this is not a model at all");
    let out = run(&["bench"], &path);
    assert_one_line_error(&out, "not a readable GGUF file");
}

/// A GGUF v3 header with only `general.architecture` set.
fn gguf_with_arch(arch: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    let key = "general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    b.extend_from_slice(&(arch.len() as u64).to_le_bytes());
    b.extend_from_slice(arch.as_bytes());
    b
}

/// A llama GGUF header with one tensor `blk.0.attn_q.weight` of type id `ty` (and 64 bytes
/// of data).
fn gguf_with_tensor(ty: u32) -> Vec<u8> {
    let mut b = gguf_with_arch("llama");
    b[8..16].copy_from_slice(&1u64.to_le_bytes()); // one tensor
    let name = "blk.0.attn_q.weight";
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + 64, 0);
    b
}

#[test]
fn an_unsupported_tensor_type_names_the_tensor_and_the_type() {
    // 20 is IQ4_NL, which neither candle nor slm-chat reads.
    let (_dir, path) = temp_file("iq4.gguf", &gguf_with_tensor(20));
    let out = run(&["bench"], &path);
    assert_one_line_error(&out, "tensor 'blk.0.attn_q.weight' has type IQ4_NL");
    assert_eq!(out.code, 2);
}

#[test]
fn an_unknown_catalogue_name_lists_the_known_ones() {
    let out = run(&["bench"], Path::new("qwen9-giant"));
    assert_one_line_error(&out, "unknown model 'qwen9-giant'");
    assert!(out
        .stderr
        .contains("smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b"));
    assert_eq!(out.code, 2);
    let out = run_env(&["models", "--fetch", "qwen9-giant"], &[]);
    assert_one_line_error(&out, "the catalogue has smollm2-135m");
    assert_eq!(out.code, 2);
}

/// Qwen2.5-Coder-0.5B end to end through the binary: read into a tree, answered from it.
/// The page of the sample that holds the answer keeps the test short (the whole sample takes
/// minutes to read with a model 4× the default's size).
#[test]
fn qwen_0_5b_answers_the_readme_question_from_the_tree() {
    let cache = tempfile::tempdir().expect("tmp");
    let model = crate::util::qwen_model();
    let text = std::fs::read_to_string(sample()).expect("sample");
    let page: Vec<&str> = text.lines().skip(1239).take(81).collect();
    assert!(page.join("\n").contains("4 pounds a week"));
    let (_dir, file) = temp_file("red-headed-league.txt", page.join("\n").as_bytes());
    let out = run_env(
        &[
            "--model",
            model.to_str().expect("utf-8"),
            "ask",
            file.to_str().expect("utf-8"),
            "How much did the Red-Headed League pay per week?",
            "--json",
            "--max-tokens",
            "32",
        ],
        &[(
            "SLM_CHAT_PATHS_CACHE_DIR",
            cache.path().to_str().expect("utf-8"),
        )],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    let answer = v["answer"].as_str().unwrap_or("").to_lowercase();
    assert!(
        answer.contains("4 pounds") || answer.contains("£4"),
        "{answer}"
    );
    assert!(!answer.contains("<|im_end|>"), "{answer}");
    assert_eq!(v["method"], "tree");
}

#[test]
fn an_unsupported_architecture_is_one_clear_line() {
    let (_dir, path) = temp_file("gemma.gguf", &gguf_with_arch("gemma3"));
    let out = run(&["bench"], &path);
    assert_one_line_error(&out, "unsupported architecture 'gemma3'");
}

#[test]
fn a_hugging_face_folder_without_tokenizer_is_one_clear_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type":"llama","hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
           "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":50}"#,
    )
    .expect("write");
    let out = run(&["bench"], dir.path());
    assert_one_line_error(&out, "no tokenizer.json");
}

#[test]
fn first_run_fetches_the_default_model_into_an_empty_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().to_str().expect("utf-8");
    let out = run_env(
        &["models", "--fetch"],
        &[("SLM_CHAT_PATHS_CACHE_DIR", cache)],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("downloading the default model"),
        "{}",
        out.stderr
    );
    let path = dir
        .path()
        .join("models")
        .join(slm_chat::model::default_model().file);
    let sha = slm_chat::model::sha256_file(&path).expect("installed");
    assert_eq!(sha, slm_chat::model::default_model().sha256);
    // The sentence embedder for dense search comes with it, checked by its own checksums.
    assert!(
        out.stderr.contains("downloading the sentence embedder"),
        "{}",
        out.stderr
    );
    assert!(slm_chat::model::embedder_present(
        &dir.path().join("models")
    ));
    // No temporary files are left beside them.
    let mut entries: Vec<String> = std::fs::read_dir(dir.path().join("models"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            slm_chat::model::default_model().file,
            slm_chat::model::EMBEDDER_DIR
        ]
    );
}

#[test]
fn config_path_answers_even_when_the_config_is_broken_and_bad_settings_are_named() {
    let (_dir, bad) = temp_file("config.toml", b"[generate]\ntemperature = \"hot\"\n");
    let bad = bad.to_str().expect("utf-8");
    assert_eq!(run_env(&["--config", bad, "config", "path"], &[]).code, 0);
    let out = run_env(&["--config", bad, "config", "show"], &[]);
    assert_one_line_error(&out, "config.toml");
    let out = run_env(&["config", "show"], &[("SLM_CHAT_GENERATE_TOP_P", "1.5")]);
    assert_one_line_error(&out, "`top_p` in [generate]");
    let out = run_env(
        &["config", "show"],
        &[("SLM_CHAT_SEARCH_COARSE_BIAS", "-1")],
    );
    assert_one_line_error(&out, "`coarse_bias` in [search]");
    let out = run_env(&["ask", "x.txt", "q", "--coarse-bias=-0.5"], &[]);
    assert_one_line_error(&out, "SLM_CHAT_SEARCH_COARSE_BIAS or --coarse-bias)");
}

#[test]
fn a_prefill_longer_than_the_window_is_refused() {
    let out = run(&["bench", "--prefill", "20000"], &default_model());
    assert_one_line_error(&out, "8192-token window");
}

/// Output that cannot be written (a full disk: `/dev/full`) is an error with a non-zero
/// exit, not a truncated answer that exits 0; a closed pipe still ends quietly with 0.
#[test]
fn write_errors_of_ask_and_extract_are_reported() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full");
    let Ok(full) = full else {
        eprintln!("no /dev/full on this machine: skipped");
        return;
    };
    let to_full = |args: &[&str]| {
        let o = Command::new(exe())
            .args(args)
            .stdout(full.try_clone().expect("dup"))
            .output()
            .expect("run slm-chat");
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::new(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    };
    let sample = sample();
    let sample = sample.to_str().expect("utf-8");
    // `extract` says what it noticed about the document on stderr too; the error is last.
    let out = to_full(&["extract", sample]);
    assert_ne!(out.code, 0, "{}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("No space left on device"), "{}", out.stderr);
    let model = default_model();
    let model = model.to_str().expect("utf-8");
    // A short document: `truncate` reads all of it with full attention.
    let (_dir, short) = temp_file(
        "note.txt",
        b"Holmes lives at 221B Baker Street in London.\n",
    );
    let short = short.to_str().expect("utf-8");
    let args = [
        "--model",
        model,
        "ask",
        short,
        "Who is Holmes?",
        "--method",
        "truncate",
        "--max-tokens",
        "4",
    ];
    let out = to_full(&[&args[..], &["--json"]].concat());
    assert_one_line_error(&out, "No space left on device");
    let out = to_full(&args);
    assert!(out.code != 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("No space left on device"),
        "{}",
        out.stderr
    );

    // `| head -c 10`: the reader goes away; that is not an error.
    let mut child = Command::new(exe())
        .args(["extract", sample])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run slm-chat");
    drop(child.stdout.take());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// `ask --history FILE` is a conversation for scripts: each answer is added to FILE as one
/// JSON line, the next question follows the turns there, and a broken FILE is refused in
/// one line without being touched.
#[test]
fn ask_history_carries_a_conversation_and_adds_each_turn() {
    let dir = tempfile::tempdir().expect("tmp");
    let book = dir.path().join("scandal.txt");
    write_scandal_opening(&book);
    let history = dir.path().join("talk.jsonl");
    let cache = dir.path().join("cache");
    let env = [("SLM_CHAT_PATHS_CACHE_DIR", cache.to_str().expect("utf-8"))];
    let model = default_model();
    let ask = |question: &str| {
        run_env(
            &[
                "--model",
                model.to_str().expect("utf-8"),
                "ask",
                book.to_str().expect("utf-8"),
                question,
                "--history",
                history.to_str().expect("utf-8"),
                "--json",
                "--max-tokens",
                "24",
            ],
            &env,
        )
    };
    let first = ask("Who does Sherlock Holmes always call the woman?");
    assert_eq!(first.code, 0, "{}", first.stderr);
    let one: serde_json::Value = serde_json::from_str(&first.stdout).expect("JSON");
    assert!(
        one.get("history_turns").is_none(),
        "a new conversation: {one}"
    );
    let saved = std::fs::read_to_string(&history).expect("history written");
    assert_eq!(saved.lines().count(), 1, "{saved}");
    let turn: serde_json::Value = serde_json::from_str(saved.trim()).expect("a JSON line");
    assert_eq!(turn["answer"], one["answer"]);

    let second = ask("What did he feel for her?");
    assert_eq!(second.code, 0, "{}", second.stderr);
    let two: serde_json::Value = serde_json::from_str(&second.stdout).expect("JSON");
    assert_eq!(two["history_turns"], 1, "{two}");
    // The earlier turn is in the prompt: more prompt than the question alone needs.
    assert!(
        two["prompt_tokens"].as_u64() > one["prompt_tokens"].as_u64(),
        "{} vs {}",
        two["prompt_tokens"],
        one["prompt_tokens"]
    );
    let saved = std::fs::read_to_string(&history).expect("history");
    let questions: Vec<String> = saved
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            v["question"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(
        questions,
        [
            "Who does Sherlock Holmes always call the woman?",
            "What did he feel for her?"
        ]
    );

    let broken = b"{\"question\": \"Who?\", \"answer\": \"Holmes.\"}\nnot json\n";
    std::fs::write(&history, broken).expect("write");
    let out = ask("And then?");
    assert_one_line_error(&out, "talk.jsonl:2: not a turn of a conversation");
    assert_eq!(std::fs::read(&history).expect("history"), broken);
}

/// `bench --synthetic` measures a model shape on random weights: no model file, no
/// tokenizer, the kernels of the real checkpoint's formats.
#[test]
fn bench_runs_a_synthetic_model_without_a_file() {
    let out = run_env(
        &[
            "--model",
            "/no/such/model.gguf",
            "bench",
            "--synthetic",
            "smollm2-135m",
            "--reps",
            "1",
            "--prefill",
            "64",
            "--json",
        ],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    assert!(
        v["model"]
            .as_str()
            .is_some_and(|m| m.contains("synthetic smollm2-135m")),
        "{v}"
    );
    let names: Vec<&str> = v["figures"]
        .as_array()
        .expect("figures")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["prefill-64", "encode-512x4", "decode-after-512"]);
    // Q4_1 projections and a Q8_0 embedding, as the default GGUF: its weights to the byte
    // (what `bench` reports for SmolLM2-135M-Instruct.Q4_1.gguf).
    assert_eq!(v["weight_bytes"], 111_617_280u64, "{v}");
    let out = run_env(&["bench", "--synthetic", "gpt-9"], &[]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("smollm2-135m"), "{}", out.stderr);
}

/// `models --synthetic` writes a GGUF the whole app runs on (what the GPU check ingests and
/// answers from), and `bench --parity` compares a device's logits with the CPU's (here the
/// CPU with itself: every position agrees, no difference).
#[test]
fn a_synthetic_gguf_is_ingested_and_answered_and_parity_compares_devices() {
    let dir = tempfile::tempdir().expect("tmp");
    let gguf = dir.path().join("synthetic.gguf");
    let gguf = gguf.to_str().expect("utf-8");
    let out = run_env(
        &["models", "--synthetic", "smollm2-135m", "--out", gguf],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("synthetic smollm2-135m"),
        "{}",
        out.stdout
    );

    // One token per byte: 1,500 bytes (its first mention of Irene Adler) keep the tree quick.
    let doc = dir.path().join("scandal.txt");
    write_scandal_opening(&doc);
    let text = std::fs::read_to_string(&doc).expect("doc");
    let text = text[..1500].trim_end();
    std::fs::write(&doc, text).expect("doc");
    let bytes = text.len();
    let cache = dir.path().join("cache");
    let env = [
        ("SLM_CHAT_PATHS_CACHE_DIR", cache.to_str().expect("utf-8")),
        ("SLM_CHAT_ANSWER_ABSTAIN", "false"),
        ("SLM_CHAT_SEARCH_SCORER", "bm25"),
    ];
    let doc = doc.to_str().expect("utf-8");
    let ask = [
        "ask",
        "--json",
        "--model",
        gguf,
        "--device",
        "cpu",
        "--max-tokens",
        "4",
        doc,
        "Who is Irene Adler?",
    ];
    let out = run_env(&ask, &env);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    // The byte-level tokenizer: one token per byte of the document.
    assert_eq!(v["document_tokens"], bytes, "{v}");
    let ids = v["answer_tokens"].as_array().expect("answer_tokens");
    assert!((1..=4).contains(&ids.len()), "{v}");
    assert!(!v["nodes"].as_array().expect("nodes").is_empty(), "{v}");

    let parity = ["bench", "--model", gguf, "--parity", "cpu", "--json"];
    let out = run_env(&parity, &env);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let p: serde_json::Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    assert_eq!(p["positions"], 512, "{p}");
    assert_eq!(p["argmax_agree"], 512, "{p}");
    assert_eq!(p["max_abs_delta"], 0.0, "{p}");
    assert_eq!(p["passed"], true, "{p}");

    let nowhere = dir.path().join("no/such/folder/x.gguf");
    let nowhere = nowhere.to_str().expect("utf-8");
    let out = run_env(
        &["models", "--synthetic", "smollm2-135m", "--out", nowhere],
        &[],
    );
    assert_one_line_error(&out, "cannot write");
}
