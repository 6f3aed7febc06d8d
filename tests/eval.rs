//! `slm-chat eval`: the needle texts are exactly those of ../shared/eval/materialize.py, and
//! the command runs a real dataset through the real binary and model.

use std::process::Command;

use slm_chat::eval::{load_cases, materialize};

use crate::util::{default_model, exe, shared, write_scandal_opening};

/// Every needle case of the dev set and of our passkey set, materialized in Rust, equals
/// the file the reference script writes.
#[test]
fn needles_are_placed_exactly_as_the_reference_script_places_them() {
    let out = tempfile::tempdir().expect("tmp");
    let books = shared().join("corpus/books");
    let sets = [
        shared().join("eval/niah_dev.jsonl"),
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/passkey.jsonl"),
    ];
    for set in &sets {
        let status = Command::new("python3")
            .arg(shared().join("eval/materialize.py"))
            .arg(set)
            .arg("--books")
            .arg(&books)
            .arg("--out")
            .arg(out.path())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("python3 runs materialize.py");
        assert!(status.success());
        for case in load_cases(set).expect("cases") {
            let book =
                std::fs::read_to_string(books.join(format!("{}.txt", case.book))).expect("book");
            let (text, at) = materialize(&case, &book).expect("materialize");
            let want = std::fs::read_to_string(out.path().join(format!("{}.txt", case.id)))
                .expect("reference file");
            assert!(text == want, "{}: differs from materialize.py", case.id);
            let needle = case.needle_sentence.as_deref().unwrap_or_default().trim();
            assert_eq!(&text[at..at + needle.len()], needle, "{}", case.id);
        }
    }
}

/// A two-case dataset through `slm-chat eval` with the tree and with `full`: a table with
/// the sizes and the accuracy, and JSON with every case.
#[test]
fn eval_runs_a_dataset_and_reports_a_table_and_json() {
    let dir = tempfile::tempdir().expect("tmp");
    let set = dir.path().join("tiny.jsonl");
    let cases = [
        r#"{"id": "t-2k-d30", "book": "emma", "context_tokens_approx": 2048, "depth": 0.3, "needle_sentence": "The secret passphrase for the vault is OPAL-RIVER-3141.", "question": "What is the secret passphrase for the vault?", "answer": "OPAL-RIVER-3141"}"#,
        r#"{"id": "t-2k-d70", "book": "emma", "context_tokens_approx": 2048, "depth": 0.7, "needle_sentence": "The secret passphrase for the vault is PINE-AMBER-2718.", "question": "What is the secret passphrase for the vault?", "answer": "PINE-AMBER-2718"}"#,
    ];
    std::fs::write(&set, cases.join("\n")).expect("write");
    let cache = tempfile::tempdir().expect("tmp");
    for method in ["tree", "full"] {
        let out = Command::new(exe())
            .env("SLM_CHAT_PATHS_CACHE_DIR", cache.path())
            .env("SLM_CHAT_GENERATE_MAX_TOKENS", "32")
            .arg("--model")
            .arg(default_model())
            .args(["eval"])
            .arg(&set)
            .arg("--books")
            .arg(shared().join("corpus/books"))
            .args(["--method", method, "--out"])
            .arg(dir.path().join(format!("{method}.json")))
            .args(if method == "tree" {
                &["--read-alone"][..]
            } else {
                &[]
            })
            .output()
            .expect("run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{method}: {stderr}");
        assert!(stdout.contains(&format!("| {method} |")), "{stdout}");
        assert!(
            stdout.contains("| 2K |") && stdout.contains("/2 |"),
            "{stdout}"
        );
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("{method}.json"))).expect("json"),
        )
        .expect("valid JSON");
        let results = json["cases"].as_array().expect("cases");
        assert_eq!(results.len(), 2);
        for r in results {
            assert!(r["error"].is_null(), "{r}");
            assert!(r["first_token_ms"].as_f64().unwrap_or(0.0) > 0.0);
            let answer = r["answer"].as_str().unwrap_or_default().to_lowercase();
            let key = if r["id"] == "t-2k-d30" {
                "opal-river-3141"
            } else {
                "pine-amber-2718"
            };
            assert_eq!(r["correct"].as_bool(), Some(answer.contains(key)), "{r}");
        }
        if method == "tree" {
            assert!(results.iter().all(|r| r["evidence_read"].is_boolean()));
            // The passages it read at full resolution, given alone: the file it answered from
            // holds the needle exactly when the tree read the needle in full.
            assert!(stdout.contains("From the full-resolution passages alone, as text: "));
            let alone = results
                .iter()
                .filter(|r| r["alone_correct"] == true)
                .count();
            assert_eq!(json["alone_correct"].as_u64(), Some(alone as u64), "{json}");
            for (r, case) in results.iter().zip(&cases) {
                assert!(r["alone_correct"].is_boolean(), "{r}");
                let id = r["id"].as_str().expect("id");
                let alone =
                    std::fs::read_to_string(cache.path().join(format!("eval/{id}.alone.txt")))
                        .expect("the passages read alone");
                let needle: serde_json::Value = serde_json::from_str(case).expect("case");
                let needle = needle["needle_sentence"].as_str().expect("needle");
                assert_eq!(
                    alone.contains(needle),
                    r["evidence_read"] == true,
                    "{id}: {alone}"
                );
            }
        } else {
            assert!(results.iter().all(|r| r["alone_correct"].is_null()));
        }
    }
}

/// `--retrieval` searches without answering: per case whether the needle was read and where
/// it ranked among the candidates, and the summary table with recall at 4, 8 and 16.
#[test]
fn eval_retrieval_reports_evidence_and_recall_without_answering() {
    let dir = tempfile::tempdir().expect("tmp");
    let set = dir.path().join("tiny.jsonl");
    std::fs::write(
        &set,
        r#"{"id": "r-2k-d50", "book": "emma", "context_tokens_approx": 2048, "depth": 0.5, "needle_sentence": "The secret passphrase for the vault is OPAL-RIVER-3141.", "question": "What is the secret passphrase for the vault?", "answer": "OPAL-RIVER-3141"}"#,
    )
    .expect("write");
    let cache = tempfile::tempdir().expect("tmp");
    let run = |extra: &[&str]| {
        Command::new(exe())
            .env("SLM_CHAT_PATHS_CACHE_DIR", cache.path())
            .arg("--model")
            .arg(default_model())
            .arg("eval")
            .arg(&set)
            .arg("--books")
            .arg(shared().join("corpus/books"))
            .args(extra)
            .output()
            .expect("run")
    };
    let out = run(&[
        "--retrieval",
        "--policy",
        "ranked",
        "--window",
        "3",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let case = &json["cases"][0];
    // The passphrase shares the question's rarest words: BM25 ranks its leaf first, and the
    // ranked policy reads it.
    assert_eq!(case["evidence_rank"], 1, "{case}");
    assert_eq!(case["evidence_read"], true, "{case}");
    assert_eq!(case["answer"], "", "no answer is generated");
    let all = &json["summary"][0];
    assert_eq!(all["kind"], "all");
    assert_eq!(all["evidence_read"], 1);
    assert_eq!(all["recall_at"]["4"], 1);
    // Refused in one line where there is no tree search to measure.
    let out = run(&["--retrieval", "--method", "rag"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--retrieval"), "{stderr}");
}

/// Answerable and absent cases in one run, from two files, on a real book: both rates side by
/// side, each case's evidence scores, and an absent case scored by whether it abstains.
#[test]
fn eval_reports_absent_cases_beside_answerable_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let books = dir.path().join("books");
    std::fs::create_dir(&books).expect("books dir");
    write_scandal_opening(&books.join("scandal.txt"));
    let answerable = dir.path().join("qa.jsonl");
    std::fs::write(
        &answerable,
        r#"{"id": "q1", "book": "scandal", "question": "Who does Sherlock Holmes always call the woman?", "answer": "Irene Adler", "kind": "direct"}"#,
    )
    .expect("write");
    let absent = dir.path().join("absent.jsonl");
    std::fs::write(
        &absent,
        r#"{"id": "a1", "book": "scandal", "question": "What is the name of the ship Holmes sailed on to Bohemia?", "absent": true}"#,
    )
    .expect("write");
    let cache = tempfile::tempdir().expect("tmp");
    let out = Command::new(exe())
        .env("SLM_CHAT_PATHS_CACHE_DIR", cache.path())
        .env("SLM_CHAT_GENERATE_MAX_TOKENS", "32")
        .arg("--model")
        .arg(default_model())
        .arg("eval")
        .args([&answerable, &absent])
        .arg("--books")
        .arg(&books)
        .arg("--json")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let kinds: Vec<&str> = json["summary"]
        .as_array()
        .expect("summary")
        .iter()
        .filter_map(|s| s["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["answerable", "absent", "direct"], "{json}");
    for case in json["cases"].as_array().expect("cases") {
        let answer = case["answer"].as_str().expect("answer");
        let says_absent = slm_chat::eval::abstains(answer);
        assert_eq!(case["abstained"], says_absent, "{case}");
        if case["absent"] == true {
            assert_eq!(
                case["correct"], says_absent,
                "absent: correct iff it abstains"
            );
        }
        let e = &case["evidence"];
        for key in ["coverage", "best_passage", "first_token", "score"] {
            assert!(e[key].is_number(), "{key} in {case}");
        }
        if case["abstained_by_evidence"] == true {
            assert!(
                answer.starts_with(slm_chat::engine::trust::NOT_FOUND),
                "{case}"
            );
        }
    }
}

/// A conversation case is asked three ways in one run: its turns in order (the last
/// following the model's own earlier answers), its last question alone, and spelt out.
#[test]
fn eval_asks_a_conversation_with_and_without_its_turns() {
    let dir = tempfile::tempdir().expect("tmp");
    let books = dir.path().join("books");
    std::fs::create_dir(&books).expect("books dir");
    write_scandal_opening(&books.join("scandal.txt"));
    let conv = dir.path().join("conv.jsonl");
    std::fs::write(
        &conv,
        r#"{"id": "c1", "book": "scandal", "turns": [{"question": "Who does Sherlock Holmes always call the woman?", "answer": "Irene Adler", "aliases": ["Adler"]}, {"question": "Did he feel love for her?"}], "answer": "not", "aliases": [], "standalone": "Did Holmes feel love for Irene Adler?", "evidence_quote": "It was not that he felt any emotion akin to love for Irene Adler."}"#,
    )
    .expect("write");
    let cache = tempfile::tempdir().expect("tmp");
    let out = Command::new(exe())
        .env("SLM_CHAT_PATHS_CACHE_DIR", cache.path())
        .env("SLM_CHAT_GENERATE_MAX_TOKENS", "24")
        .arg("--model")
        .arg(default_model())
        .arg("eval")
        .arg(&conv)
        .arg("--books")
        .arg(&books)
        .arg("--json")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let cases = json["cases"].as_array().expect("cases");
    let ids: Vec<&str> = cases.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids, ["c1", "c1/alone", "c1/standalone"], "{json}");
    assert_eq!(cases[0]["kind"], "conversation");
    assert_eq!(cases[0]["history_turns"], 1, "{}", cases[0]);
    let earlier = &cases[0]["earlier"][0];
    assert_eq!(
        earlier["question"],
        "Who does Sherlock Holmes always call the woman?"
    );
    assert!(earlier["correct"].is_boolean(), "{earlier}");
    for (case, variant) in cases[1..].iter().zip(["alone", "standalone"]) {
        assert_eq!(case["variant"], variant, "{case}");
        assert!(case.get("history_turns").is_none(), "{case}");
        assert!(case["evidence_read"].is_boolean(), "{case}");
    }
    assert!(earlier.get("followed").is_none(), "{earlier}");
    // With --gold-turns the last question follows the dataset's answer to the first.
    let gold = Command::new(exe())
        .env("SLM_CHAT_PATHS_CACHE_DIR", cache.path())
        .env("SLM_CHAT_GENERATE_MAX_TOKENS", "24")
        .arg("--model")
        .arg(default_model())
        .arg("eval")
        .arg(&conv)
        .arg("--books")
        .arg(&books)
        .args(["--json", "--gold-turns"])
        .output()
        .expect("run");
    assert!(
        gold.status.success(),
        "{}",
        String::from_utf8_lossy(&gold.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&gold.stdout).expect("valid JSON");
    assert_eq!(
        g["cases"][0]["earlier"][0]["followed"], "Irene Adler",
        "{g}"
    );
    let summary = json["summary"].as_array().expect("summary");
    let groups: Vec<(&str, u64)> = summary
        .iter()
        .filter_map(|s| Some((s["kind"].as_str()?, s["cases"].as_u64()?)))
        .collect();
    assert_eq!(
        groups,
        [
            ("all", 1),
            ("conversation", 1),
            ("turn asked alone", 1),
            ("turn asked standalone", 1)
        ]
    );
}

/// The conversation dev set loads: each case's question is its last turn's, with the
/// standalone form and an earlier turn that carries its expected answer.
#[test]
fn the_conversation_dev_set_loads() {
    let cases = load_cases(&shared().join("eval/conv_dev.jsonl")).expect("conv_dev loads");
    assert_eq!(cases.len(), 30);
    for c in &cases {
        assert!(c.turns.len() >= 2, "{}", c.id);
        assert_eq!(c.question, c.turns[c.turns.len() - 1].question, "{}", c.id);
        assert!(
            c.standalone.is_some() && c.turns[0].answer.is_some(),
            "{}",
            c.id
        );
        assert!(
            c.evidence_quote.is_some() && !c.answer.is_empty(),
            "{}",
            c.id
        );
    }
}
