//! METHOD.md checks A and B at model level on the real default model: KV encoded elsewhere
//! and injected gives the logits of a plain forward over the concatenated text.

use candle_core::{IndexOp, Tensor};
use slm_chat::model::{Forward, Message};

use crate::util::{llm, shared};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("diff")
}

fn book_tokens(n: usize, skip: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(shared().join("corpus/books/pride_and_prejudice.txt"))
        .expect("book");
    let ids = llm()
        .tokenizer
        .encode(&text[..20_000], false)
        .expect("encode");
    ids[skip..skip + n].to_vec()
}

/// Check A: one chunk encoded after the prompt prefix (the sink), injected at the same
/// contiguous positions, then the question: equal to one plain forward.
#[test]
fn injected_context_equals_the_plain_forward_on_the_real_model() {
    let llm = llm();
    let m = &llm.model;
    let prefix_text = llm
        .chat
        .render(&[Message::user("Read this:\n\n")], false)
        .expect("template");
    let prefix = llm.tokenizer.encode(&prefix_text, true).expect("prefix");
    let context = book_tokens(300, 0);
    let question = llm
        .tokenizer
        .encode(
            "\n\nWho is Mr. Bingley?<|im_end|>\n<|im_start|>assistant\n",
            true,
        )
        .expect("question");
    let all = [prefix.clone(), context.clone(), question.clone()].concat();
    let mut plain = m.new_cache();
    let x = m.embed(&all).expect("embed");
    let pos: Vec<u32> = (0..all.len() as u32).collect();
    let out = m
        .forward(&x, &Forward::all(m, &pos), &mut plain)
        .expect("plain");
    let want = m
        .logits(&out.hidden.i(prefix.len() + context.len()..).expect("rows"))
        .expect("logits");

    let mut enc = m.new_cache();
    m.prefill(&prefix, &mut enc).expect("sink");
    let cpos: Vec<u32> = (prefix.len() as u32..(prefix.len() + context.len()) as u32).collect();
    let f = Forward {
        keep_kv: true,
        ..Forward::all(m, &cpos)
    };
    let kv = m
        .forward(&m.embed(&context).expect("embed"), &f, &mut enc)
        .expect("encode")
        .kv;

    let mut cache = m.new_cache();
    m.prefill(&prefix, &mut cache).expect("prefix");
    for (layer, layer_kv) in kv.iter().enumerate() {
        m.inject(&mut cache, layer, layer_kv, &cpos)
            .expect("inject");
    }
    let start = (prefix.len() + context.len()) as u32;
    let qpos: Vec<u32> = (start..start + question.len() as u32).collect();
    let x = m.embed(&question).expect("embed");
    let got = m
        .logits(
            &m.forward(&x, &Forward::all(m, &qpos), &mut cache)
                .expect("question")
                .hidden,
        )
        .expect("logits");
    let d = max_diff(&got, &want);
    eprintln!("check A on the real model: max |Δ logit| = {d:.2e}");
    // Same weights, same 8-bit activation rounding per row, same f16 K/V: measured exactly
    // equal (0.0); the bound leaves room for summation order over other block shapes.
    assert!(d < 1e-3, "{d}");
}

/// Check B: two chunks encoded side by side with segments equal each encoded alone.
#[test]
fn chunks_encoded_side_by_side_equal_chunks_encoded_alone() {
    let llm = llm();
    let m = &llm.model;
    let prefix = llm
        .tokenizer
        .encode("<|im_start|>user\n", true)
        .expect("prefix");
    let (a, b) = (book_tokens(200, 0), book_tokens(150, 1000));
    let mut base = m.new_cache();
    m.prefill(&prefix, &mut base).expect("sink");
    let p = prefix.len() as u32;
    let ids = [a.clone(), b.clone()].concat();
    let pos: Vec<u32> = (p..p + a.len() as u32)
        .chain(p..p + b.len() as u32)
        .collect();
    let seg: Vec<u32> = [vec![0; a.len()], vec![1; b.len()]].concat();
    let f = Forward {
        segments: Some(&seg),
        ..Forward::all(m, &pos)
    };
    let both = m
        .forward(
            &m.embed(&ids).expect("embed"),
            &f,
            &mut base.fork().expect("fork"),
        )
        .expect("side by side")
        .hidden;
    for (chunk, rows) in [(&a, 0..a.len()), (&b, a.len()..ids.len())] {
        let cpos: Vec<u32> = (p..p + chunk.len() as u32).collect();
        let alone = m
            .forward(
                &m.embed(chunk).expect("embed"),
                &Forward::all(m, &cpos),
                &mut base.fork().expect("fork"),
            )
            .expect("alone")
            .hidden;
        let d = max_diff(&both.i(rows).expect("rows"), &alone);
        assert!(d < 1e-2, "hidden states differ by {d}");
    }
}
