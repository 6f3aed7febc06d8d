//! Generation on the real model: stop tokens, the token limit, cancellation, streaming.

use std::sync::atomic::{AtomicBool, Ordering};

use slm_chat::model::{generate, Message, StopReason};

use crate::util::{greedy, llm};

fn chat_prompt(question: &str) -> Vec<u32> {
    let llm = llm();
    let text = llm
        .chat
        .render(&[Message::user(question)], true)
        .expect("template");
    llm.tokenizer.encode(&text, true).expect("encode")
}

#[test]
fn stops_at_the_models_end_of_turn_and_streams_the_same_text() {
    let llm = llm();
    let mut streamed = String::new();
    let g = generate(
        &llm.model,
        &llm.tokenizer,
        &chat_prompt("What is 2+2?"),
        &mut llm.model.new_cache(),
        &greedy(64),
        &AtomicBool::new(false),
        &mut |piece| streamed.push_str(piece),
    )
    .expect("generate");
    // llama.cpp's greedy answer up to its <|im_end|> (../shared/fixtures).
    assert_eq!(g.text, "The answer to this classic math problem is 4.");
    assert_eq!(g.stop, StopReason::Eos);
    assert_eq!(streamed, g.text);
    assert_eq!(g.stats.decode_tokens, g.tokens.len());
}

#[test]
fn the_token_limit_and_cancellation_stop_generation() {
    let llm = llm();
    let prompt = chat_prompt("Tell me a long story about the sea.");
    let run = |max: usize, cancel_after_first: bool| {
        let cancel = AtomicBool::new(false);
        generate(
            &llm.model,
            &llm.tokenizer,
            &prompt,
            &mut llm.model.new_cache(),
            &greedy(max),
            &cancel,
            &mut |_| {
                if cancel_after_first {
                    cancel.store(true, Ordering::Relaxed);
                }
            },
        )
        .expect("generate")
    };
    let none = run(0, false);
    assert_eq!((none.tokens.len(), none.stop), (0, StopReason::MaxTokens));
    let five = run(5, false);
    assert_eq!((five.tokens.len(), five.stop), (5, StopReason::MaxTokens));
    let cancelled = run(50, true);
    assert_eq!(cancelled.stop, StopReason::Cancelled);
    assert!(cancelled.tokens.len() <= 2, "{}", cancelled.tokens.len());
}
