fn main() {
    slm_chat::sys::pin_thread_count();
    let path = std::env::args().nth(1).unwrap();
    let n: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let llm =
        slm_chat::model::load(std::path::Path::new(&path), &candle_core::Device::Cpu).unwrap();
    let toks = llm
        .tokenizer
        .encode(slm_chat::bench::SAMPLE_TEXT, false)
        .unwrap();
    for _ in 0..2 {
        let mut cache = llm.model.new_cache();
        let t = std::time::Instant::now();
        llm.model.prefill(&toks[..n], &mut cache).unwrap();
        eprintln!(
            "prefill {n}: {:.1} tok/s",
            n as f64 / t.elapsed().as_secs_f64()
        );
    }
}
