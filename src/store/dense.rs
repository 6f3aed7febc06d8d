//! A tree's dense node vectors, `dense.safetensors` beside its other files.
//!
//! Kept apart from the sealed manifest: they depend only on the nodes' text and the
//! embedder, so a tree built before dense search existed (or while the embedder could not be
//! fetched) gets them added later without being read again. The file names the embedder and
//! carries a BLAKE3 of its vectors; one that does not match is ignored and made again.

use std::collections::HashMap;
use std::path::Path;

use half::f16;
use half::slice::HalfFloatSliceExt;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::{write_atomic, Result, StoreError};

pub(crate) const DENSE: &str = "dense.safetensors";
const TENSOR: &str = "vectors";

/// The dense vectors stored in `dir` for `embedder`, `(nodes, dim)` row-major, when there
/// are `nodes × dim` of them and their checksum holds; `None` otherwise.
pub fn read_dense(dir: &Path, embedder: &str, nodes: usize, dim: usize) -> Option<Vec<f32>> {
    let bytes = std::fs::read(dir.join(DENSE)).ok()?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).ok()?;
    let meta = meta.metadata().clone()?;
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor(TENSOR).ok()?;
    let ok = meta.get("embedder").map(String::as_str) == Some(embedder)
        && t.dtype() == Dtype::F16
        && t.shape() == [nodes, dim]
        && meta.get("blake3").map(String::as_str) == Some(blake3::hash(t.data()).to_hex().as_str());
    if !ok {
        return None;
    }
    // The file's bytes need not be aligned for f16.
    let half: Vec<f16> = t
        .data()
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect();
    let mut out = vec![0f32; half.len()];
    half.convert_to_f32_slice(&mut out);
    Some(out)
}

/// Store `vectors` (`(nodes, dim)`, made by `embedder`) in `dir` as f16, atomically.
pub fn write_dense(dir: &Path, embedder: &str, vectors: &[f32], dim: usize) -> Result<()> {
    let half: Vec<f16> = vectors.iter().map(|&x| f16::from_f32(x)).collect();
    let data: &[u8] = bytemuck::cast_slice(&half);
    let view = TensorView::new(Dtype::F16, vec![vectors.len() / dim.max(1), dim], data)
        .map_err(|e| StoreError::corrupt(dir, format!("{DENSE}: {e}")))?;
    let meta = HashMap::from([
        ("embedder".to_string(), embedder.to_string()),
        (
            "blake3".to_string(),
            blake3::hash(data).to_hex().to_string(),
        ),
    ]);
    let bytes = safetensors::serialize([(TENSOR, view)], Some(meta))
        .map_err(|e| StoreError::corrupt(dir, format!("{DENSE}: {e}")))?;
    write_atomic(&dir.join(DENSE), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_and_damage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<f32> = (0..12).map(|i| i as f32 / 8.0).collect();
        write_dense(dir.path(), "e1", &v, 4).unwrap();
        assert_eq!(read_dense(dir.path(), "e1", 3, 4).unwrap(), v);
        // Another embedder, another shape: not these vectors.
        assert!(read_dense(dir.path(), "e2", 3, 4).is_none());
        assert!(read_dense(dir.path(), "e1", 4, 3).is_none());
        // A flipped byte in the vectors.
        let path = dir.path().join(DENSE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        assert!(read_dense(dir.path(), "e1", 3, 4).is_none());
    }
}
