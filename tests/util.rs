//! Shared helpers: the real default model (fetched once per test run), paths to ../shared,
//! running the real binary, temp files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use slm_chat::document::{self, Document, DocumentError, LoadOptions};

use slm_chat::config::Config;

/// `../shared` beside the repository.
pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// The default model's GGUF, fetched through the same code path a first run uses.
pub fn default_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let config = Config::load(None).expect("settings load");
        slm_chat::model::ensure_default_model(&config.models_dir(), &mut |m| eprintln!("{m}"))
            .expect("the default model is available (run .ci/run or `slm-chat models --fetch`)")
    })
    .clone()
}

/// The real default model, loaded once per test binary on the CPU.
pub fn llm() -> &'static slm_chat::model::Llm {
    static LLM: OnceLock<slm_chat::model::Llm> = OnceLock::new();
    LLM.get_or_init(|| {
        slm_chat::model::load(&default_model(), &candle_core::Device::Cpu).expect("model loads")
    })
}

/// Qwen2.5-Coder-0.5B (qwen2: biases, NEOX rope, Q5_0/Q8_0/Q4_K/Q6_K blocks), from the
/// catalogue through the same code path `--model qwen2.5-coder-0.5b` uses.
/// A copy of the default model of the caller's own (the shared one's counters see every
/// test running at the same time).
pub fn own_llm() -> slm_chat::model::Llm {
    slm_chat::model::load(&default_model(), &candle_core::Device::Cpu).expect("default model")
}

pub fn qwen_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let config = Config::load(None).expect("settings load");
        let m = slm_chat::model::catalogue_model("qwen2.5-coder-0.5b").expect("in the catalogue");
        slm_chat::model::ensure_model(m, &config.models_dir(), &mut |m| eprintln!("{m}")).expect(
            "Qwen2.5-Coder-0.5B is available (run .ci/run or `slm-chat models --fetch qwen2.5-coder-0.5b`)",
        )
    })
    .clone()
}

/// The real Qwen2.5-Coder-0.5B, loaded once per test binary on the CPU.
pub fn qwen() -> &'static slm_chat::model::Llm {
    static LLM: OnceLock<slm_chat::model::Llm> = OnceLock::new();
    LLM.get_or_init(|| {
        slm_chat::model::load(&qwen_model(), &candle_core::Device::Cpu).expect("model loads")
    })
}

/// Greedy decoding of at most `max_tokens`: the same answer every run.
pub fn greedy(max_tokens: usize) -> slm_chat::model::SamplingParams {
    slm_chat::model::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        max_tokens,
        repeat: slm_chat::model::RepeatControl::OFF,
    }
}

/// `../shared/corpus/<rel>`, beside the crate (the same layout in /work/main and here).
pub fn corpus(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/corpus")
        .join(rel)
}

/// The real binary, which also serves as the PDF worker.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slm-chat"))
}

/// Loads through the library with the real binary as the worker.
pub fn load(path: &Path) -> Result<Document, DocumentError> {
    document::load(path, &LoadOptions::new(exe()))
}

/// What `slm-chat extract [--json] FILE` did.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn extract(path: &Path, json: bool) -> Run {
    let mut command = Command::new(exe());
    command.arg("extract").arg(path);
    if json {
        command.arg("--json");
    }
    let output = command.output().expect("run slm-chat");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub fn extract_json(path: &Path) -> serde_json::Value {
    let run = extract(path, true);
    assert_eq!(run.code, 0, "{}: {}", path.display(), run.stderr);
    serde_json::from_str(&run.stdout).expect("valid JSON")
}

/// Asserts a failed run printed exactly `slm-chat: <path>: <message>` and exited with `code`.
pub fn assert_clean_error(run: &Run, path: &Path, message: &str, code: i32) {
    assert_eq!(
        run.stderr,
        format!("slm-chat: {}: {message}\n", path.display())
    );
    assert_eq!(run.code, code, "exit code for {message}");
    assert!(run.stdout.is_empty());
}

/// A temp dir holding one file with `bytes`.
pub fn temp_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    (dir, path)
}

/// The opening of the bundled sample, "A Scandal in Bohemia" (~1,400 tokens, a tree of a
/// few chunks, quick to build), written to `path`. It holds the answer to "Who does Sherlock
/// Holmes always call the woman?".
pub fn write_scandal_opening(path: &Path) {
    let sample =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sherlock_holmes_adventures_1-3.txt");
    let text = std::fs::read_to_string(sample).expect("sample");
    let cut = (6000..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    std::fs::write(path, &text[..cut]).expect("write the opening");
}
