//! Shared helpers: the real default model (fetched once per test run) and paths to ../shared.

use std::path::PathBuf;
use std::sync::OnceLock;

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
