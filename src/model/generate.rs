//! Token generation: sampling, stop tokens, streaming text, cancellation, timings.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use super::kv::KvCache;
use super::tokenizer::Tokenizer;
use super::transformer::Model;
use super::Result;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: usize,
    /// What keeps an answer from repeating itself.
    pub repeat: RepeatControl,
}

/// Greedy decoding of a small model falls into repeating itself; these are the remedies the
/// local runtimes give (llama.cpp's repeat penalty, Hugging Face's no-repeat n-grams), all
/// over the answer's own tokens: the question's and the document's words stay free to copy.
#[derive(Debug, Clone, PartialEq)]
pub struct RepeatControl {
    /// Divide a positive logit (multiply a negative one) of each token among the answer's
    /// last `window` tokens by this; 1 = off.
    pub penalty: f32,
    pub window: usize,
    /// Never produce the same run of this many tokens twice in one answer; 0 = off.
    pub no_repeat_ngram: usize,
    /// End the answer at the end of a sentence that says again an earlier one.
    pub stop_repeated_sentence: bool,
}

impl RepeatControl {
    /// Nothing but the loop guard.
    pub const OFF: Self = Self {
        penalty: 1.0,
        window: 64,
        no_repeat_ngram: 0,
        stop_repeated_sentence: false,
    };

    /// Push down (or rule out) the tokens that would repeat what `answer` already says.
    /// A run found in `source` (the question) may repeat: a name said twice must not come
    /// out misspelt the second time.
    fn apply(&self, logits: &mut [f32], answer: &[u32], source: &HashSet<&[u32]>) {
        if self.penalty != 1.0 {
            let mut seen: Vec<u32> = answer[answer.len().saturating_sub(self.window)..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / self.penalty
                    } else {
                        *l * self.penalty
                    };
                }
            }
        }
        let n = self.no_repeat_ngram;
        if n > 0 && answer.len() >= n {
            let prefix = &answer[answer.len() + 1 - n..];
            for w in answer.windows(n) {
                if &w[..n - 1] == prefix && !source.contains(w) {
                    if let Some(l) = logits.get_mut(w[n - 1] as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced one of its stop tokens.
    Eos,
    MaxTokens,
    /// The next position would pass the model's native window.
    ContextFull,
    Cancelled,
    /// The document holds no answer: a fixed sentence says so instead of the model.
    Abstained,
    /// The answer fell into a loop (the same run of tokens four times in a row): greedy
    /// decoding of a small model does this, and nothing new would follow.
    Repetition,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Eos => "end of answer",
            Self::MaxTokens => "token limit reached",
            Self::ContextFull => "context window full",
            Self::Cancelled => "stopped",
            Self::Repetition => "stopped a loop",
            Self::Abstained => "not found in the document",
        })
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    /// From the start of the call to the first generated token.
    pub first_token_secs: f64,
    pub decode_tokens: usize,
    pub decode_secs: f64,
}

impl GenerationStats {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, stop token excluded.
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub stats: GenerationStats,
}

/// Picks tokens from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The next token from logits `(vocab,)`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        self.sample_after(logits, &[], &HashSet::new())
    }

    /// The next token of an answer that has produced `answer` so far, from a prompt whose
    /// runs of `no_repeat_ngram` tokens are `source`.
    pub fn sample_after(
        &mut self,
        logits: &Tensor,
        answer: &[u32],
        source: &HashSet<&[u32]>,
    ) -> Result<u32> {
        let mut logits = logits.to_vec1::<f32>()?;
        self.params.repeat.apply(&mut logits, answer, source);
        if self.params.temperature <= 0.0 {
            return Ok(argmax(&logits));
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        // Only the head of the distribution can be in the nucleus: sort the 256 most likely
        // tokens, not the whole vocabulary, unless they do not reach `top_p`.
        let head = probs.len().min(256);
        if head < probs.len() {
            probs.select_nth_unstable_by(head - 1, |a, b| b.1.total_cmp(&a.1));
            let head_mass: f32 = probs[..head].iter().map(|p| p.1).sum();
            if head_mass / total >= self.params.top_p {
                probs.truncate(head);
            }
        }
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0.0;
        let mut cut = probs.len();
        for (i, p) in probs.iter().enumerate() {
            kept += p.1 / total;
            if kept >= self.params.top_p {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut.max(1));
        let dist = WeightedIndex::new(probs.iter().map(|p| p.1))
            .map_err(|e| super::ModelError::Input(format!("cannot sample: {e}")))?;
        Ok(probs[dist.sample(&mut self.rng)].0)
    }
}

/// Whether `tokens` ends with the same run of 2–32 tokens four times in a row.
fn looping(tokens: &[u32]) -> bool {
    const TIMES: usize = 4;
    (2..=32).any(|n| {
        tokens.len() >= n * TIMES && {
            let tail = &tokens[tokens.len() - n * TIMES..];
            tail.chunks_exact(n).all(|c| c == &tail[..n])
        }
    })
}

/// Index of the largest logit (the first one on ties, as llama.cpp does).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A prompt run through the model, its first answer token not yet chosen.
pub struct Prefilled {
    /// Logits `(vocab,)` of the answer's first token.
    pub logits: Tensor,
    stats: GenerationStats,
    start: Instant,
}

/// Run `prompt` after what `cache` holds, making room for the answer.
pub fn prefill(
    model: &Model,
    prompt: &[u32],
    cache: &mut KvCache,
    params: &SamplingParams,
) -> Result<Prefilled> {
    let start = Instant::now();
    let window = model.config().context_length;
    let prompted = cache.next_position() + prompt.len();
    let answer_room = params.max_tokens.min(window.saturating_sub(prompted));
    cache.reserve(cache.len() + prompt.len() + answer_room)?;
    let logits = model.prefill(prompt, cache)?;
    Ok(Prefilled {
        logits,
        stats: GenerationStats {
            prompt_tokens: prompt.len(),
            prefill_secs: start.elapsed().as_secs_f64(),
            ..Default::default()
        },
        start,
    })
}

/// Run `prompt` after what `cache` holds, then generate until a stop token, the token
/// limit, the end of the model's window, or `cancel`. `on_text` receives the answer as it
/// grows, in whole UTF-8 pieces.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    cache: &mut KvCache,
    params: &SamplingParams,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let p = prefill(model, prompt, cache, params)?;
    decode(model, tokenizer, p, prompt, cache, params, cancel, on_text)
}

/// Generate the answer of a prefilled prompt (see [`generate`]); `source` is what the answer
/// may quote again and again (the question), free of the no-repeat rule.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    model: &Model,
    tokenizer: &Tokenizer,
    prefilled: Prefilled,
    source: &[u32],
    cache: &mut KvCache,
    params: &SamplingParams,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let Prefilled {
        mut logits,
        mut stats,
        start,
    } = prefilled;
    let window = model.config().context_length;
    let mut sampler = Sampler::new(params.clone());
    let runs: HashSet<&[u32]> = match params.repeat.no_repeat_ngram {
        0 => HashSet::new(),
        n => source.windows(n).collect(),
    };
    let mut sentences = Sentences::default();
    let mut tokens = Vec::new();
    let mut emitted = 0;
    let mut text = String::new();
    let decode_start = Instant::now();
    let stop = loop {
        if cancel.load(Ordering::Relaxed) {
            break StopReason::Cancelled;
        }
        if tokens.len() >= params.max_tokens {
            break StopReason::MaxTokens;
        }
        let next = sampler.sample_after(&logits, &tokens, &runs)?;
        if tokens.is_empty() {
            stats.first_token_secs = start.elapsed().as_secs_f64();
        }
        if tokenizer.stop_tokens().contains(&next) {
            break StopReason::Eos;
        }
        tokens.push(next);
        text = tokenizer.decode(&tokens)?;
        // A token can end inside a multi-byte character; wait for the rest of it.
        if !text.ends_with('\u{FFFD}') {
            if let Some(new) = text.get(emitted..).filter(|t| !t.is_empty()) {
                on_text(new);
                emitted = text.len();
            }
        }
        if tokens.len() >= params.max_tokens {
            break StopReason::MaxTokens;
        }
        if looping(&tokens)
            || (params.repeat.stop_repeated_sentence && sentences.ends_in_repeat(&text))
        {
            break StopReason::Repetition;
        }
        if cache.next_position() >= window {
            break StopReason::ContextFull;
        }
        logits = model.prefill(&[next], cache)?;
    };
    if let Some(rest) = text.get(emitted..).filter(|t| !t.is_empty()) {
        on_text(rest);
    }
    stats.decode_tokens = tokens.len();
    stats.decode_secs = decode_start.elapsed().as_secs_f64();
    Ok(Generation {
        tokens,
        text,
        stop,
        stats,
    })
}

/// Answer a prefilled prompt with `text` instead of the model's words.
pub fn fixed(prefilled: Prefilled, text: &str, on_text: &mut dyn FnMut(&str)) -> Generation {
    let mut stats = prefilled.stats;
    stats.first_token_secs = prefilled.start.elapsed().as_secs_f64();
    on_text(text);
    Generation {
        tokens: Vec::new(),
        text: text.to_string(),
        stop: StopReason::Abstained,
        stats,
    }
}

/// The sentences an answer has finished so far, to notice one said twice.
#[derive(Default)]
struct Sentences {
    seen: Vec<String>,
    /// Where the sentence being written starts in the answer.
    from: usize,
}

impl Sentences {
    /// Whether `text` (the whole answer so far) just finished a sentence said before.
    /// Sentences under four words do not count ("Mr." ends no sentence of its own).
    fn ends_in_repeat(&mut self, text: &str) -> bool {
        if !text.ends_with(['.', '!', '?', '\n']) || self.from > text.len() {
            return false;
        }
        let words: Vec<String> = text[self.from..]
            .split_whitespace()
            .map(|w| w.to_lowercase())
            .collect();
        if words.len() < 4 {
            return false;
        }
        self.from = text.len();
        let sentence = words.join(" ");
        if self.seen.contains(&sentence) {
            return true;
        }
        self.seen.push(sentence);
        false
    }
}

/// `log softmax(logits)[token]`.
pub fn log_softmax_at(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - max - sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_run_repeated_four_times_is_a_loop() {
        let l = [7, 8, 9];
        let looped: Vec<u32> = [&[1, 2][..], &l, &l, &l, &l].concat();
        assert!(looping(&looped));
        assert!(!looping(&looped[..looped.len() - 1]));
        assert!(
            !looping(&[5, 5, 5, 5, 5, 5]),
            "one token repeated is not a loop here"
        );
        assert!(!looping(&[1, 2, 3, 4, 5, 6, 7, 8, 9]));
    }

    #[test]
    fn repeat_control_pushes_down_and_rules_out_repeats() {
        let penalty = RepeatControl {
            penalty: 2.0,
            ..RepeatControl::OFF
        };
        let none = HashSet::new();
        let mut l = [4.0, -1.0, 3.0, 1.0];
        penalty.apply(&mut l, &[0, 1], &none);
        assert_eq!(l, [2.0, -2.0, 3.0, 1.0], "only the answer's own tokens");
        let ngram = RepeatControl {
            no_repeat_ngram: 3,
            ..RepeatControl::OFF
        };
        // "5 6 7 … 5 6" must not go on with 7.
        let mut l = [0.0; 8];
        ngram.apply(&mut l, &[5, 6, 7, 1, 5, 6], &none);
        assert_eq!(l[7], f32::NEG_INFINITY);
        assert!(l[..7].iter().all(|&x| x == 0.0));
        // Unless the question or the passages say "5 6 7": a name may be said twice.
        let quoted: HashSet<&[u32]> = [&[5u32, 6, 7][..]].into_iter().collect();
        let mut l = [0.0; 8];
        ngram.apply(&mut l, &[5, 6, 7, 1, 5, 6], &quoted);
        assert_eq!(l[7], 0.0);
        let mut off = [1.0, 2.0];
        RepeatControl::OFF.apply(&mut off, &[0, 1, 0, 1], &none);
        assert_eq!(off, [1.0, 2.0]);
    }

    #[test]
    fn a_sentence_said_twice_ends_the_answer() {
        let mut s = Sentences::default();
        let a = "Mr. Wilson was paid four pounds a week.";
        assert!(!s.ends_in_repeat("Mr."), "too short to be a sentence");
        assert!(!s.ends_in_repeat(a));
        let b = format!("{a} That is a lot of money.");
        assert!(!s.ends_in_repeat(&b));
        assert!(s.ends_in_repeat(&format!("{b} Mr. Wilson was paid four pounds a WEEK.")));
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() -> Result<()> {
        // Probabilities ≈ 0.46, 0.42, 0.06, 0.06: a nucleus of 0.5 holds tokens 0 and 1 only,
        // although without it tokens 2 and 3 would come up about 24 times in 200 draws.
        let logits = Tensor::new(&[2.0f32, 1.9, 0.0, 0.0], &Device::Cpu)?;
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
            max_tokens: 1,
            repeat: RepeatControl::OFF,
        });
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect::<Result<_>>()?;
        assert!(draws.iter().all(|&t| t < 2), "{draws:?}");
        assert!(draws.contains(&0) && draws.contains(&1));
        Ok(())
    }

    #[test]
    fn sampling_is_reproducible_for_a_seed() -> Result<()> {
        let logits = Tensor::new(&[1f32, 1.1, 0.9, 1.0], &Device::Cpu)?;
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 3,
            max_tokens: 1,
            repeat: RepeatControl::OFF,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..16).map(|_| s.sample(&logits)).collect::<Result<_>>()?
        };
        let mut s = Sampler::new(params);
        let b: Vec<u32> = (0..16).map(|_| s.sample(&logits)).collect::<Result<_>>()?;
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature 1 should vary: {a:?}"
        );
        Ok(())
    }
}
