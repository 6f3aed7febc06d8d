//! Process figures for status lines and benchmarks.

/// Fix the worker thread count for the whole process. Call it first thing in `main`, before
/// any thread starts (it sets an environment variable).
///
/// candle asks for its thread count on every matrix product and, unless
/// `RAYON_NUM_THREADS` is set, re-reads CPU topology files from `/sys` each time (4 % of
/// decode time, measured with perf). Setting it once, to what the machine offers, stops that.
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Peak resident set size of this process, in bytes (Linux `VmHWM`), when the OS tells.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Resident set size of this process now, in bytes (Linux `VmRSS`), when the OS tells.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Bytes as a short human figure: `512 B`, `3.4 MB`, `1.2 GB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3_400_000), "3.4 MB");
        assert_eq!(human_bytes(1_200_000_000), "1.2 GB");
    }

    #[test]
    fn linux_reports_resident_memory() {
        if cfg!(target_os = "linux") {
            let rss = status_kib("VmRSS:").unwrap_or(0) * 1024;
            let peak = peak_rss_bytes().unwrap_or(0);
            assert!(rss > 0 && peak >= rss, "rss {rss} peak {peak}");
        }
    }
}
