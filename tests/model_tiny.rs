//! The forward's equivalences on a tiny random LLaMA written here (2 layers, hidden 64, GQA):
//! split layer ranges, injected prefixes (METHOD.md check A at model level), segments
//! (check B), and block attention against naive attention.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use slm_chat::model::{
    from_tensors, Config, Forward, KvCache, LayerKv, Model, RopeScaling, RopeStyle,
};

const D: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FF: usize = 96;
const VOCAB: usize = 50;
const LAYERS: usize = 2;

fn config(style: RopeStyle) -> Config {
    Config {
        arch: "llama".into(),
        name: "tiny".into(),
        n_layer: LAYERS,
        d_model: D,
        n_head: HEADS,
        n_kv_head: KV_HEADS,
        head_dim: HEAD_DIM,
        d_ff: FF,
        vocab_size: VOCAB,
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_style: style,
        rope_scaling: RopeScaling::None,
        context_length: 256,
        attention_bias: false,
    }
}

fn tiny(style: RopeStyle) -> Model {
    from_tensors(config(style), tiny_weights(), false, &Device::Cpu).expect("tiny model builds")
}

/// Random weights in Hugging Face names; scaled so activations stay O(1).
fn tiny_weights() -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f64| {
        let x = Tensor::randn(0f32, 1f32, shape, &dev).expect("randn");
        t.insert(name, (x * scale).expect("scale"));
    };
    put("model.embed_tokens.weight".into(), &[VOCAB, D], 1.0);
    put("lm_head.weight".into(), &[VOCAB, D], 0.2);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[HEADS * HEAD_DIM, D],
            0.3,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[KV_HEADS * HEAD_DIM, D],
            0.3,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[KV_HEADS * HEAD_DIM, D],
            0.2,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[D, HEADS * HEAD_DIM],
            0.2,
        );
        put(format!("{p}.mlp.gate_proj.weight"), &[FF, D], 0.2);
        put(format!("{p}.mlp.up_proj.weight"), &[FF, D], 0.2);
        put(format!("{p}.mlp.down_proj.weight"), &[D, FF], 0.2);
    }
    let mut ones = |name: String| {
        t.insert(name, Tensor::ones(D, DType::F32, &dev).expect("ones"));
    };
    ones("model.norm.weight".into());
    for i in 0..LAYERS {
        ones(format!("model.layers.{i}.input_layernorm.weight"));
        ones(format!("model.layers.{i}.post_attention_layernorm.weight"));
    }
    t
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7 + seed * 13 + 3) % VOCAB as u32)
        .collect()
}

fn positions(start: u32, n: usize) -> Vec<u32> {
    (start..start + n as u32).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("same shape")
        .abs()
        .and_then(|d| d.flatten_all()?.max(0))
        .and_then(|m| m.to_scalar::<f32>())
        .expect("diff")
}

/// Logits of every position of one plain causal forward over `ids`.
fn full_logits(m: &Model, ids: &[u32]) -> Tensor {
    let mut cache = m.new_cache();
    let x = m.embed(ids).expect("embed");
    let pos = positions(0, ids.len());
    let out = m
        .forward(&x, &Forward::all(m, &pos), &mut cache)
        .expect("forward");
    m.logits(&out.hidden).expect("logits")
}

#[test]
fn split_layer_ranges_equal_the_full_forward() {
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        let m = tiny(style);
        let ids = tokens(11, 1);
        let pos = positions(0, ids.len());
        let mut cache = m.new_cache();
        let x = m.embed(&ids).expect("embed");
        let lower = Forward {
            layers: 0..1,
            ..Forward::all(&m, &pos)
        };
        let h = m.forward(&x, &lower, &mut cache).expect("lower").hidden;
        let upper = Forward {
            layers: 1..LAYERS,
            ..Forward::all(&m, &pos)
        };
        let h = m.forward(&h, &upper, &mut cache).expect("upper").hidden;
        let split = m.logits(&h).expect("logits");
        assert!(max_diff(&split, &full_logits(&m, &ids)) < 1e-5);
    }
}

#[test]
fn injected_prefix_equals_the_forward_over_the_concatenation() {
    let m = tiny(RopeStyle::Interleaved);
    let (prefix, context, question) = (tokens(5, 1), tokens(9, 2), tokens(6, 3));
    let all: Vec<u32> = [prefix.clone(), context.clone(), question.clone()].concat();
    let reference = full_logits(&m, &all);

    // Encode prefix + context once, keeping the context's keys (before RoPE) and values.
    let mut enc = m.new_cache();
    m.prefill(&prefix, &mut enc).expect("prefix");
    let x = m.embed(&context).expect("embed");
    let pos = positions(prefix.len() as u32, context.len());
    let f = Forward {
        keep_kv: true,
        ..Forward::all(&m, &pos)
    };
    let kv = m.forward(&x, &f, &mut enc).expect("encode").kv;

    // A fresh run of the prefix, then the context injected at the same positions.
    let mut cache = m.new_cache();
    m.prefill(&prefix, &mut cache).expect("prefix");
    for (layer, layer_kv) in kv.iter().enumerate() {
        m.inject(&mut cache, layer, layer_kv, &pos).expect("inject");
    }
    let start = (prefix.len() + context.len()) as u32;
    let qpos = positions(start, question.len());
    let x = m.embed(&question).expect("embed");
    let out = m
        .forward(&x, &Forward::all(&m, &qpos), &mut cache)
        .expect("question");
    let got = m.logits(&out.hidden).expect("logits");
    let want = reference.i(prefix.len() + context.len()..).expect("rows");
    assert!(max_diff(&got, &want) < 1e-4);
}

#[test]
fn segments_equal_separate_forwards_after_a_shared_prefix() {
    let m = tiny(RopeStyle::Neox);
    let prefix = tokens(4, 5);
    let (a, b) = (tokens(7, 6), tokens(5, 7));
    let mut base = m.new_cache();
    m.prefill(&prefix, &mut base).expect("prefix");
    let p = prefix.len() as u32;

    // Both chunks side by side, each at its own local positions after the prefix.
    let ids: Vec<u32> = [a.clone(), b.clone()].concat();
    let pos: Vec<u32> = [positions(p, a.len()), positions(p, b.len())].concat();
    let seg: Vec<u32> = [vec![0; a.len()], vec![1; b.len()]].concat();
    let mut cache = base.fork().expect("fork");
    let x = m.embed(&ids).expect("embed");
    let f = Forward {
        segments: Some(&seg),
        ..Forward::all(&m, &pos)
    };
    let both = m.forward(&x, &f, &mut cache).expect("batched").hidden;

    for (chunk, rows) in [(&a, 0..a.len()), (&b, a.len()..ids.len())] {
        let mut c = base.fork().expect("fork");
        let x = m.embed(chunk).expect("embed");
        let pos = positions(p, chunk.len());
        let alone = m
            .forward(&x, &Forward::all(&m, &pos), &mut c)
            .expect("alone")
            .hidden;
        assert!(max_diff(&both.i(rows).expect("rows"), &alone) < 1e-4);
    }
}

#[test]
fn block_attention_equals_naive_attention() {
    let weights = tiny_weights();
    let mut m = from_tensors(
        config(RopeStyle::Interleaved),
        weights.clone(),
        false,
        &Device::Cpu,
    )
    .expect("tiny model builds");
    let ids = tokens(23, 9);
    m.set_attention_block(1_000_000);
    let one_block = full_logits(&m, &ids);
    for rows in [1, 3, 8] {
        m.set_attention_block(rows);
        // Single-row blocks take the one-query path (its own summation order): f32 rounding.
        let d = max_diff(&full_logits(&m, &ids), &one_block);
        assert!(d < 1e-4, "block {rows}: {d}");
    }
    // And against attention written out longhand from the same weights.
    let naive = naive_layer0(&weights, &ids);
    let mut cache = m.new_cache();
    let x = m.embed(&ids).expect("embed");
    let pos = positions(0, ids.len());
    let f = Forward {
        layers: 0..1,
        ..Forward::all(&m, &pos)
    };
    let h = m.forward(&x, &f, &mut cache).expect("layer 0").hidden;
    assert!(max_diff(&h, &naive) < 1e-4);
}

/// Layer 0 written out longhand from the weights: full T×T scores, explicit causal mask,
/// adjacent-pair RoPE, heads mapped to KV heads by `h / (HEADS / KV_HEADS)`.
fn naive_layer0(w: &HashMap<String, Tensor>, ids: &[u32]) -> Tensor {
    let n = ids.len();
    let get = |k: &str| w[k].clone();
    let p = "model.layers.0";
    let idx = Tensor::new(ids, &Device::Cpu).expect("ids");
    let x = get("model.embed_tokens.weight")
        .index_select(&idx, 0)
        .expect("embed");
    let rms = |x: &Tensor| {
        let ms = x.sqr()?.mean_keepdim(1)?;
        x.broadcast_div(&(ms + 1e-5)?.sqrt()?)
    };
    let lin = |x: &Tensor, name: &str| x.matmul(&get(name).t()?);
    let h = rms(&x).expect("norm");
    let q = lin(&h, &format!("{p}.self_attn.q_proj.weight")).expect("q");
    let k = lin(&h, &format!("{p}.self_attn.k_proj.weight")).expect("k");
    let v = lin(&h, &format!("{p}.self_attn.v_proj.weight")).expect("v");
    let (q, k, v) = (
        q.to_vec2::<f32>().expect("q"),
        k.to_vec2::<f32>().expect("k"),
        v.to_vec2::<f32>().expect("v"),
    );
    let rot = |row: &[f32], t: usize, head: usize| -> Vec<f32> {
        let mut out = row[head * HEAD_DIM..(head + 1) * HEAD_DIM].to_vec();
        for i in 0..HEAD_DIM / 2 {
            let a = t as f64 * 10_000f64.powf(-2.0 * i as f64 / HEAD_DIM as f64);
            let (c, s) = (a.cos() as f32, a.sin() as f32);
            let (x0, x1) = (out[2 * i], out[2 * i + 1]);
            out[2 * i] = x0 * c - x1 * s;
            out[2 * i + 1] = x0 * s + x1 * c;
        }
        out
    };
    let mut att = vec![0f32; n * HEADS * HEAD_DIM];
    for head in 0..HEADS {
        let kvh = head / (HEADS / KV_HEADS);
        for t in 0..n {
            let qt = rot(&q[t], t, head);
            let scores: Vec<f32> = (0..n)
                .map(|j| {
                    if j > t {
                        return f32::NEG_INFINITY;
                    }
                    let kj = rot(&k[j], j, kvh);
                    qt.iter().zip(&kj).map(|(a, b)| a * b).sum::<f32>() / (HEAD_DIM as f32).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f32 = e.iter().sum();
            for (j, ej) in e.iter().enumerate() {
                for d in 0..HEAD_DIM {
                    att[t * HEADS * HEAD_DIM + head * HEAD_DIM + d] +=
                        ej / z * v[j][kvh * HEAD_DIM + d];
                }
            }
        }
    }
    let att = Tensor::from_vec(att, (n, HEADS * HEAD_DIM), &Device::Cpu).expect("att");
    let x = (&x + lin(&att, &format!("{p}.self_attn.o_proj.weight")).expect("o")).expect("add");
    let h = rms(&x).expect("norm");
    let g = lin(&h, &format!("{p}.mlp.gate_proj.weight")).expect("gate");
    let u = lin(&h, &format!("{p}.mlp.up_proj.weight")).expect("up");
    let m = (candle_nn::ops::silu(&g).expect("silu") * u).expect("mul");
    (&x + lin(&m, &format!("{p}.mlp.down_proj.weight")).expect("down")).expect("add")
}

#[test]
fn forked_caches_do_not_share_storage() {
    let m = tiny(RopeStyle::Interleaved);
    let mut base = m.new_cache();
    m.prefill(&tokens(3, 1), &mut base).expect("prefix");
    // Two live forks appending in turns: if they shared storage, the second's writes would
    // land in the first's entries and change its next step.
    let mut a = base.fork().expect("fork");
    let mut b = base.fork().expect("fork");
    m.prefill(&tokens(4, 2), &mut a).expect("a");
    m.prefill(&tokens(4, 3), &mut b).expect("b");
    let after_b = m.prefill(&tokens(1, 4), &mut a).expect("a again");
    let mut alone = base.fork().expect("fork");
    m.prefill(&tokens(4, 2), &mut alone).expect("a alone");
    let want = m.prefill(&tokens(1, 4), &mut alone).expect("a alone again");
    assert!(max_diff(&after_b, &want) < 1e-6);
    assert_eq!(base.len(), 3);
}

#[test]
fn prefill_equals_one_token_steps_past_the_cache_growth_step() {
    // 300 tokens: the cache grows at 256 entries, both in one prefill and step by step.
    let m = tiny(RopeStyle::Neox);
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 31 + 7) % VOCAB as u32).collect();
    let mut whole = m.new_cache();
    let want = m.prefill(&ids, &mut whole).expect("prefill");
    let mut steps = m.new_cache();
    m.prefill(&ids[..250], &mut steps).expect("first part");
    let mut got = None;
    for &t in &ids[250..] {
        got = Some(m.prefill(&[t], &mut steps).expect("step"));
    }
    let got = got.expect("stepped");
    assert_eq!(steps.len(), 300);
    assert!(max_diff(&got, &want) < 1e-4, "{}", max_diff(&got, &want));
}

#[test]
fn prefill_at_explicit_positions_equals_its_parts_and_sets_the_next_position() {
    // 600 tokens: more than one 512-token piece, with a jump in the positions.
    let m = tiny(RopeStyle::Neox);
    let ids: Vec<u32> = (0..600u32).map(|i| (i * 17 + 3) % VOCAB as u32).collect();
    let positions: Vec<u32> = (0..600u32)
        .map(|i| if i < 300 { 5 + i } else { 400 + i })
        .collect();
    let mut whole = m.new_cache();
    let want = m.prefill_at(&ids, &positions, &mut whole).expect("whole");
    assert_eq!(whole.len(), 600);
    assert_eq!(whole.next_position(), 1000);
    let mut parts = m.new_cache();
    m.prefill_at(&ids[..300], &positions[..300], &mut parts)
        .expect("first");
    let got = m
        .prefill_at(&ids[300..], &positions[300..], &mut parts)
        .expect("second");
    assert!(max_diff(&got, &want) < 1e-4, "{}", max_diff(&got, &want));
    // The positions are used: the same tokens without the jump give another state.
    let plain = m
        .prefill_at(&ids, &(5..605).collect::<Vec<u32>>(), &mut m.new_cache())
        .expect("plain");
    assert!(max_diff(&plain, &want) > 1e-3);
    assert!(m
        .prefill_at(&ids, &positions[..10], &mut m.new_cache())
        .is_err());
}

/// A logit bias weighs an injected entry as attention would weigh copies of it: ln 2 equals
/// the entry twice, -inf equals leaving it out, 0 changes nothing; for the question's
/// prefill (block attention) and a decode step after it (one-query attention), in a fork too.
#[test]
fn logit_bias_weighs_an_entry_like_copies_of_it() {
    let m = tiny(RopeStyle::Neox);
    let (prefix, context, question) = (tokens(5, 1), tokens(9, 2), tokens(6, 3));
    let mut enc = m.new_cache();
    m.prefill(&prefix, &mut enc).expect("prefix");
    let pos = positions(prefix.len() as u32, context.len());
    let f = Forward {
        keep_kv: true,
        ..Forward::all(&m, &pos)
    };
    let x = m.embed(&context).expect("embed");
    let kv = m.forward(&x, &f, &mut enc).expect("encode").kv;
    let p0 = prefix.len();
    // The prefix, then the context entries `keep` (indices into the context) in that order.
    let cache_of = |keep: &[usize]| {
        let mut cache = m.new_cache();
        m.prefill(&prefix, &mut cache).expect("prefix");
        let ids: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(ids.as_slice(), &Device::Cpu).expect("index");
        let at: Vec<u32> = keep.iter().map(|&i| pos[i]).collect();
        for (layer, l) in kv.iter().enumerate() {
            let part = LayerKv {
                k: l.k
                    .contiguous()
                    .and_then(|k| k.index_select(&idx, 0))
                    .expect("k"),
                v: l.v
                    .contiguous()
                    .and_then(|v| v.index_select(&idx, 0))
                    .expect("v"),
            };
            m.inject(&mut cache, layer, &part, &at).expect("inject");
        }
        cache.set_next_position(p0 + context.len());
        cache
    };
    // The question's last logits, then those of one more token.
    let answer = |mut cache: KvCache| {
        let a = m.prefill(&question, &mut cache).expect("question");
        let b = m.prefill(&question[..1], &mut cache).expect("step");
        (a, b)
    };
    let close =
        |(a, b): (Tensor, Tensor), (c, d): (Tensor, Tensor)| max_diff(&a, &c).max(max_diff(&b, &d));
    let all: Vec<usize> = (0..context.len()).collect();
    let plain = answer(cache_of(&all));

    let mut twice = all.clone();
    twice.push(3);
    let mut biased = cache_of(&all);
    biased
        .set_logit_bias(p0 + 3, 1, std::f32::consts::LN_2)
        .expect("bias");
    let biased = answer(biased.fork().expect("fork"));
    let d = close(answer(cache_of(&twice)), biased.clone());
    assert!(d < 1e-4, "ln 2 against a copy: {d}");
    assert!(
        close(plain.clone(), biased) > 1e-3,
        "the bias changes the answer"
    );

    let without: Vec<usize> = all.iter().copied().filter(|&i| i != 3).collect();
    let mut hidden = cache_of(&all);
    hidden
        .set_logit_bias(p0 + 3, 1, f32::NEG_INFINITY)
        .expect("bias");
    let d = close(answer(cache_of(&without)), answer(hidden));
    assert!(d < 1e-4, "-inf against leaving it out: {d}");

    let mut zero = cache_of(&all);
    zero.set_logit_bias(p0, context.len(), 0.0).expect("bias");
    assert!(close(plain, answer(zero)) < 1e-6);

    let mut c = cache_of(&all);
    assert!(c.set_logit_bias(p0, context.len() + 1, -1.0).is_err());
    assert!(c.set_logit_bias(0, 1, f32::NAN).is_err());
    assert!(c.set_logit_bias(0, 1, f32::INFINITY).is_err());

    // Entries only the lower layer holds (M < N) are biased there and nowhere else.
    let mut lower_only = m.new_cache();
    m.prefill(&prefix, &mut lower_only).expect("prefix");
    let f = Forward {
        layers: 0..1,
        ..Forward::all(&m, &pos)
    };
    m.forward(&x, &f, &mut lower_only).expect("lower");
    lower_only
        .set_logit_bias(p0, context.len(), -1.0)
        .expect("bias");
    assert_eq!(lower_only.logit_bias(0).len(), p0 + context.len());
    assert!(lower_only.logit_bias(1).is_empty());
}
