use slm_chat::model::{argmax, load};
fn main() {
    slm_chat::sys::pin_thread_count();
    let path = std::env::args().nth(1).unwrap();
    let llm = load(std::path::Path::new(&path), &candle_core::Device::Cpu).unwrap();
    let toks = llm
        .tokenizer
        .encode(slm_chat::bench::SAMPLE_TEXT, false)
        .unwrap();
    let mut cache = llm.model.new_cache();
    let n: usize = std::env::args().nth(2).map_or(512, |s| s.parse().unwrap());
    let mut logits = llm.model.prefill(&toks[..n], &mut cache).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..200 {
        let next = argmax(&logits.to_vec1::<f32>().unwrap());
        logits = llm.model.prefill(&[next], &mut cache).unwrap();
    }
    eprintln!("decode {:.1} tok/s", 200.0 / t.elapsed().as_secs_f64());
}
