//! Text ↔ token ids, from `tokenizer.json` or built from GGUF metadata.
//!
//! Document text is encoded with special-token parsing off, so a book that happens to
//! contain `<|im_end|>` cannot end a turn; prompts rendered from the chat template are
//! encoded with it on.

use std::path::Path;

use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use super::load::GgufFile;
use super::{ModelError, Result};

/// GGUF `tokenizer.ggml.pre` values candle's converter already sets up correctly.
const CANDLE_KNOWS_PRE: &[&str] = &["qwen2", "llama3", "smaug-bpe", "lfm2"];

/// Token texts that end an assistant turn in the common chat formats.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
];

/// Token ids with the byte range of the source text each one covers.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Per token, `(start, end)` bytes of the source text.
    pub offsets: Vec<(usize, usize)>,
}

/// A tokenizer plus what the model needs to know about its special tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// Parses special tokens in the input (for rendered chat prompts).
    special: tokenizers::Tokenizer,
    /// Treats every input character as text (for documents and user text).
    plain: tokenizers::Tokenizer,
    stop: Vec<u32>,
    bos: Option<String>,
    eos: Option<String>,
}

fn tk_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    fn new(special: tokenizers::Tokenizer, bos: Option<String>, eos: Option<String>) -> Self {
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);
        let mut stop: Vec<u32> = eos
            .iter()
            .map(String::as_str)
            .chain(END_OF_TURN.iter().copied())
            .filter_map(|t| special.token_to_id(t))
            .collect();
        stop.sort_unstable();
        stop.dedup();
        Self {
            special,
            plain,
            stop,
            bos,
            eos,
        }
    }

    pub(crate) fn from_gguf(g: &GgufFile) -> Result<Self> {
        let mut tk = tokenizers::Tokenizer::from_gguf(&g.content).map_err(|e| {
            ModelError::Tokenizer(format!("cannot build it from GGUF metadata: {e}"))
        })?;
        let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or_default();
        if !CANDLE_KNOWS_PRE.contains(&pre.as_str()) {
            // candle falls back to ByteLevel with a prefix space, which llama.cpp never adds
            // for BPE vocabularies ("Hello" would become "ĠHello"). SmolLM also splits every
            // digit on its own, as its tokenizer.json does.
            let byte_level = ByteLevel::new(false, true, true);
            if pre == "smollm" {
                tk.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    byte_level.into(),
                ])));
            } else {
                tk.with_pre_tokenizer(Some(byte_level));
            }
            tk.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        }
        let token = |key: &str| -> Option<String> {
            let id = g.meta(key)?.to_u32().ok()?;
            tk.id_to_token(id)
        };
        let (bos, eos) = (
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
        );
        Ok(Self::new(tk, bos, eos))
    }

    /// `tokenizer.json`, with BOS/EOS names from `tokenizer_config.json` when present.
    pub(crate) fn from_dir(dir: &Path) -> Result<Self> {
        let tk = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(tk_err)?;
        let cfg = read_tokenizer_config(dir);
        let name = |key: &str| -> Option<String> {
            let v = cfg.as_ref()?.get(key)?;
            v.as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))
                .map(str::to_string)
        };
        Ok(Self::new(tk, name("bos_token"), name("eos_token")))
    }

    /// Token ids of `text`; `parse_special` lets `<|im_start|>` and friends be single tokens.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tk = if parse_special {
            &self.special
        } else {
            &self.plain
        };
        let enc = tk.encode_fast(text, false).map_err(tk_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of plain `text`, each with the byte range of `text` it came from.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Encoded> {
        let enc = self.plain.encode(text, false).map_err(tk_err)?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.special.decode(ids, false).map_err(tk_err)
    }

    /// Tokens that end generation (the model's EOS and end-of-turn markers).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    /// The model's beginning-of-sequence token text, for chat templates.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    /// The model's end-of-sequence token text, for chat templates.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }
}

pub(crate) fn read_tokenizer_config(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    serde_json::from_str(&text).ok()
}
