//! Settings, layered: built-in defaults < `config.toml` < `SLM_CHAT_*` environment < flags.
//!
//! The repository's `config.toml` lists every key with its default; a test keeps the two in
//! step. Environment variables name a key as `SLM_CHAT_<SECTION>_<KEY>` in capitals, e.g.
//! `SLM_CHAT_MODEL_PATH` or `SLM_CHAT_GENERATE_MAX_TOKENS`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::document::LoadOptions;
use crate::engine::ingest::IngestSettings;
use crate::engine::{AnswerSettings, ConversationSettings, RagSettings, Settings};
use crate::model::{DeviceChoice, ModelChoice};
use crate::store::StoreSettings;
use crate::tree::search::SearchSettings;
use crate::tree::TreeSettings;

const ENV_PREFIX: &str = "SLM_CHAT_";

/// Every setting slm-chat reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelSettings,
    pub generate: GenerateSettings,
    pub rag: RagSettings,
    pub tree: TreeSettings,
    pub store: StoreSettings,
    pub search: SearchSettings,
    pub answer: AnswerSettings,
    pub conversation: ConversationSettings,
    pub paths: PathSettings,
}

/// `[model]`: which model, on which device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// A GGUF file or Hugging Face folder; empty means the default model.
    pub path: String,
    /// Where to run.
    pub device: DeviceChoice,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: String::new(),
            device: DeviceChoice::Auto,
        }
    }
}

/// `[generate]`: how answers are sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateSettings {
    /// Most tokens in one answer.
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling cut-off, used when temperature > 0.
    pub top_p: f64,
    /// Sampling seed, so answers can be reproduced.
    pub seed: u64,
    /// Divide the logit of each token among the answer's last `repeat_window` by this
    /// (1 = off), as llama.cpp's repeat penalty.
    pub repeat_penalty: f64,
    pub repeat_window: usize,
    /// Never produce the same run of this many tokens twice in one answer (0 = off).
    pub no_repeat_ngram: usize,
    /// End the answer at the end of a sentence that says again an earlier one.
    pub stop_repeated_sentence: bool,
}

impl GenerateSettings {
    /// These settings as the sampler takes them.
    pub fn sampling(&self) -> crate::model::SamplingParams {
        crate::model::SamplingParams {
            temperature: self.temperature as f32,
            top_p: self.top_p as f32,
            seed: self.seed,
            max_tokens: self.max_tokens,
            repeat: crate::model::RepeatControl {
                penalty: self.repeat_penalty as f32,
                window: self.repeat_window,
                no_repeat_ngram: self.no_repeat_ngram,
                stop_repeated_sentence: self.stop_repeated_sentence,
            },
        }
    }
}

impl Default for GenerateSettings {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 0.9,
            seed: 0,
            repeat_penalty: 1.0,
            repeat_window: 64,
            no_repeat_ngram: 4,
            stop_repeated_sentence: true,
        }
    }
}

/// `[paths]`: where things are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PathSettings {
    /// Models and context trees; empty means the platform cache dir (`~/.cache/slm-chat`).
    pub cache_dir: String,
}

/// What can go wrong reading settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("environment variable {name}: {reason}")]
    Env { name: String, reason: String },
    #[error("{}", invalid(name, reason))]
    Invalid { name: String, reason: String },
}

/// Settings a command-line flag also sets, with the flag (the rest are set only in
/// `config.toml` or the environment). The binary's tests check that each flag exists.
pub const FLAGS: &[(&str, &str)] = &[
    ("model.path", "--model"),
    ("model.device", "--device"),
    ("generate.max_tokens", "--max-tokens"),
    ("generate.temperature", "--temperature"),
    ("search.scorer", "--scorer"),
    ("search.fusion", "--fusion"),
    ("search.neighbours", "--neighbours"),
    ("search.window", "--window"),
    ("search.policy", "--policy"),
    ("search.budget", "--budget"),
    ("search.fine_budget", "--fine-budget"),
    ("search.fine_level", "--fine-level"),
    ("search.cut_marks", "--cut-marks"),
    ("search.reread", "--reread"),
    ("search.coarse_bias", "--coarse-bias"),
    ("search.positions", "--positions"),
];

/// A bad setting's message: the key as `config.toml` spells it and every place that sets it.
fn invalid(name: &str, reason: &str) -> String {
    let (section, key) = name.split_once('.').unwrap_or(("", name));
    let env = format!(
        "{ENV_PREFIX}{}",
        name.replace('.', "_").to_ascii_uppercase()
    );
    let places = match FLAGS.iter().find(|(n, _)| *n == name) {
        Some((_, flag)) => format!("config.toml, {env} or {flag}"),
        None => format!("config.toml or {env}"),
    };
    format!("`{key}` in [{section}] {reason} (set in {places})")
}

fn dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "slm-chat")
}

/// The user's config file (it need not exist).
pub fn user_config_path() -> PathBuf {
    dirs()
        .map(|d| d.config_dir().join("config.toml"))
        .unwrap_or_else(|| PathBuf::from("slm-chat-config.toml"))
}

impl Config {
    /// Defaults, then `file` (or the user's config file when it exists), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut value =
            toml::Value::try_from(Config::default()).map_err(|e| ConfigError::File {
                path: PathBuf::new(),
                reason: e.to_string(),
            })?;
        let user = user_config_path();
        let path = file
            .map(Path::to_path_buf)
            .or(user.is_file().then_some(user));
        if let Some(path) = path {
            let err = |reason: String| ConfigError::File {
                path: path.clone(),
                reason,
            };
            let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
            let file_value: toml::Value =
                toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
            merge(&mut value, file_value);
            Config::deserialize(value.clone()).map_err(|e| err(one_line(&e)))?;
        }
        let set = apply_env(&mut value, std::env::vars())?;
        Config::deserialize(value).map_err(|e| ConfigError::Env {
            name: if set.is_empty() {
                format!("{ENV_PREFIX}*")
            } else {
                set.join(", ")
            },
            reason: one_line(&e),
        })
    }

    /// Reject values that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |name: &str, reason: &str| {
            Err(ConfigError::Invalid {
                name: name.into(),
                reason: reason.into(),
            })
        };
        let g = &self.generate;
        if !(g.temperature.is_finite() && g.temperature >= 0.0) {
            return bad("generate.temperature", "must be a number ≥ 0");
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return bad("generate.top_p", "must be in (0, 1]");
        }
        if !(g.repeat_penalty.is_finite() && g.repeat_penalty >= 1.0) {
            return bad("generate.repeat_penalty", "must be a number ≥ 1 (1 = off)");
        }
        if g.no_repeat_ngram == 1 {
            return bad(
                "generate.no_repeat_ngram",
                "must be 0 (off) or at least 2: 1 would forbid any token twice",
            );
        }
        if !self.answer.abstain_threshold.is_finite() {
            return bad("answer.abstain_threshold", "must be a number");
        }
        let w = self.conversation.search_weight;
        if !(w.is_finite() && w >= 0.0) {
            return bad("conversation.search_weight", "must be a number ≥ 0");
        }
        let n = self.search.neighbours;
        if !(n.is_finite() && n >= 0.0) {
            return bad("search.neighbours", "must be a number ≥ 0");
        }
        if !(1..=3).contains(&self.search.window) {
            return bad("search.window", "must be 1, 2 or 3");
        }
        let c = self.search.coarse_bias;
        if !(c.is_finite() && c >= 0.0) {
            return bad("search.coarse_bias", "must be a number ≥ 0");
        }
        if self.rag.chunk_tokens < 16 {
            return bad("rag.chunk_tokens", "must be at least 16");
        }
        if self.rag.max_tokens < self.rag.chunk_tokens {
            return bad("rag.max_tokens", "must be at least rag.chunk_tokens");
        }
        let t = &self.tree;
        if t.height > 6 {
            return bad("tree.height", "must be at most 6");
        }
        if t.chunk_tokens < 8 << t.height {
            return bad(
                "tree.chunk_tokens",
                "must leave at least 8 tokens per node at the deepest level (8 × 2^height)",
            );
        }
        if t.alpha.len() != t.height + 1 || t.alpha.contains(&0) {
            return bad(
                "tree.alpha",
                "needs one ratio ≥ 1 per level, from the chunk (level 0) to level `height`",
            );
        }
        if t.batch_chunks == 0 {
            return bad("tree.batch_chunks", "must be at least 1");
        }
        if !(self.store.disk_budget_gb.is_finite() && self.store.disk_budget_gb >= 0.0) {
            return bad("store.disk_budget_gb", "must be a number ≥ 0");
        }
        Ok(())
    }

    /// The cache root: models and trees.
    pub fn cache_dir(&self) -> PathBuf {
        if !self.paths.cache_dir.is_empty() {
            return PathBuf::from(&self.paths.cache_dir);
        }
        dirs()
            .map(|d| d.cache_dir().to_path_buf())
            .unwrap_or_else(|| std::env::temp_dir().join("slm-chat"))
    }

    /// Where context trees are kept.
    pub fn trees_dir(&self) -> PathBuf {
        self.cache_dir().join("trees")
    }

    /// Where models are cached.
    pub fn models_dir(&self) -> PathBuf {
        self.cache_dir().join("models")
    }

    /// The settings the engine takes; `pdf_worker` is the program that runs
    /// `__pdf-worker` (the slm-chat binary).
    pub fn engine_settings(&self, pdf_worker: PathBuf) -> Settings {
        Settings {
            model: ModelChoice {
                spec: self.model.path.clone(),
                device: self.model.device,
                models_dir: self.models_dir(),
            },
            ingest: IngestSettings {
                tree: self.tree.clone(),
                store: self.store.clone(),
                trees_dir: self.trees_dir(),
                load: LoadOptions::new(pdf_worker),
            },
            search: self.search.clone(),
            rag: self.rag.clone(),
            sampling: self.generate.sampling(),
            answer: self.answer.clone(),
            conversation: self.conversation.clone(),
        }
    }

    /// The settings as TOML, for `config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// A settings error on one line, with the key it is about (`message()` alone drops it).
fn one_line(e: &toml::de::Error) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Apply `SLM_CHAT_SECTION_KEY=value` pairs to the known keys of `value`; returns the names
/// of the variables applied.
fn apply_env(
    value: &mut toml::Value,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut applied = Vec::new();
    let toml::Value::Table(root) = value else {
        return Ok(applied);
    };
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let mut hit = false;
        for (section, table) in root.iter_mut() {
            let Some(key) = rest.strip_prefix(&format!("{section}_")) else {
                continue;
            };
            let toml::Value::Table(table) = table else {
                continue;
            };
            let Some(slot) = table.get_mut(key) else {
                continue;
            };
            *slot = parse_like(slot, &raw).ok_or_else(|| ConfigError::Env {
                name: name.clone(),
                reason: format!("'{raw}' is not a valid {}", slot.type_str()),
            })?;
            hit = true;
        }
        if !hit {
            return Err(ConfigError::Env {
                name,
                reason: "no such setting (see `slm-chat config show`)".into(),
            });
        }
        applied.push(name);
    }
    Ok(applied)
}

fn parse_like(slot: &toml::Value, raw: &str) -> Option<toml::Value> {
    Some(match slot {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(raw.trim().parse().ok()?),
        toml::Value::Float(_) => toml::Value::Float(raw.trim().parse().ok()?),
        toml::Value::Boolean(_) => toml::Value::Boolean(raw.trim().parse().ok()?),
        // Lists are written as in TOML: `SLM_CHAT_TREE_ALPHA="[32, 16, 8, 4]"`.
        toml::Value::Array(_) => toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()?
            .remove("v")?,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::search::Reread;

    #[test]
    fn the_repository_config_lists_every_key_with_its_default() {
        let text = include_str!("../config.toml");
        let parsed: Config = toml::from_str(text).expect("config.toml parses");
        assert_eq!(parsed, Config::default());
        let listed: toml::Value = toml::from_str(text).expect("toml");
        let defaults = toml::Value::try_from(Config::default()).expect("toml");
        assert_eq!(listed, defaults, "config.toml must list every key");
    }

    #[test]
    fn environment_overrides_known_keys_and_rejects_unknown_ones() {
        let mut v = toml::Value::try_from(Config::default()).expect("toml");
        let vars = [
            ("SLM_CHAT_GENERATE_MAX_TOKENS".to_string(), "12".to_string()),
            ("SLM_CHAT_MODEL_DEVICE".to_string(), "cpu".to_string()),
            ("SLM_CHAT_SEARCH_COARSE_BIAS".to_string(), "3".to_string()),
            ("HOME".to_string(), "/x".to_string()),
        ];
        apply_env(&mut v, vars.into_iter()).expect("applies");
        let c = Config::deserialize(v).expect("valid");
        assert_eq!(c.generate.max_tokens, 12);
        assert_eq!(c.search.coarse_bias, 3.0);
        assert_eq!(c.model.device, DeviceChoice::Cpu);

        let mut v = toml::Value::try_from(Config::default()).expect("toml");
        let bad = [(
            "SLM_CHAT_GENERATE_MAX_TOKENS".to_string(),
            "many".to_string(),
        )];
        assert!(apply_env(&mut v, bad.into_iter()).is_err());
        let unknown = [("SLM_CHAT_NOPE".to_string(), "1".to_string())];
        assert!(apply_env(&mut v, unknown.into_iter()).is_err());
    }

    #[test]
    fn a_bad_setting_names_its_key_and_the_flag_only_where_one_exists() {
        let mut c = Config::default();
        c.tree.height = 9;
        let e = c.validate().expect_err("height 9").to_string();
        assert_eq!(
            e,
            "`height` in [tree] must be at most 6 (set in config.toml or SLM_CHAT_TREE_HEIGHT)"
        );
        let mut c = Config::default();
        c.search.window = 5;
        let e = c.validate().expect_err("window 5").to_string();
        assert!(
            e.contains("[search]") && e.ends_with("SLM_CHAT_SEARCH_WINDOW or --window)"),
            "{e}"
        );
        let mut c = Config::default();
        c.store.disk_budget_gb = -1.0;
        let e = c.validate().expect_err("negative budget").to_string();
        assert!(!e.contains("--"), "{e}");
    }

    #[test]
    fn reread_reads_its_names_and_the_old_true_and_false() {
        let read = |text: &str| toml::from_str::<SearchSettings>(text).map(|s| s.reread);
        assert_eq!(read("reread = \"auto\"").ok(), Some(Reread::Auto));
        assert_eq!(read("reread = \"always\"").ok(), Some(Reread::Always));
        assert_eq!(read("reread = \"never\"").ok(), Some(Reread::Never));
        assert_eq!(read("reread = true").ok(), Some(Reread::Always));
        assert_eq!(read("reread = false").ok(), Some(Reread::Never));
        assert_eq!(read("").ok(), Some(Reread::Auto));
        assert!(read("reread = \"sometimes\"").is_err());
        assert!(read("reread = 1").is_err());

        let mut v = toml::Value::try_from(Config::default()).expect("toml");
        let vars = [("SLM_CHAT_SEARCH_REREAD".to_string(), "false".to_string())];
        apply_env(&mut v, vars.into_iter()).expect("applies");
        let c = Config::deserialize(v).expect("valid");
        assert_eq!(c.search.reread, Reread::Never);
    }
}
