#![doc = include_str!("../README.md")]
//! Shared helpers of the cross-crate tests: locating the golden cases written by
//! `tests/golden/generate.py` (Hugging Face transformers), reading their reference tensors, and
//! comparing numbers. Tolerances live here, one per dtype and backend.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// Absolute tolerance on logits and hidden states against transformers in f32 on the CPU.
pub const F32_ATOL: f32 = 1e-4;
/// Absolute tolerance on gate weights and router scores (they pass through fewer ops).
pub const ROUTER_ATOL: f32 = 1e-5;
/// Absolute tolerance for GPU backends: wgpu/Vulkan shaders reorder f32 sums (tiled matmul,
/// parallel reductions) and may use fused multiply-add and approximate `exp`, which moves logits
/// of magnitude ~10 by a few 1e-5 after 4 blocks; 1e-3 leaves an order of magnitude of headroom
/// while still catching any real bug (wrong scale, wrong rotation, wrong expert) which shows up
/// as errors of 1e-1 or more.
pub const GPU_ATOL: f32 = 1e-3;

/// Absolute tolerance on CUDA. CubeCL's CUDA matmuls run f32 inputs on tensor cores as TF32
/// (10-bit mantissa, relative rounding ~5e-4 per operand); on an H200 the logits (magnitude up to
/// ~4 here) moved by 3.8e-3 at most after 4 blocks, about 1e-3 relative. 2e-2 leaves 5x headroom
/// and still catches real bugs, which move logits by 1e-1 or more.
pub const CUDA_TF32_ATOL: f32 = 2e-2;

/// Absolute tolerance on logits of a model held in bf16 against the f32 reference (positions
/// routed alike). bf16 keeps 8 bits of mantissa (unit roundoff 2^-9 ≈ 2e-3), and every weight
/// and every activation between the f32 islands (norms, router, softmax, logits) is rounded,
/// dozens of roundings on the way through 4 blocks and an MTP module. Measured on the golden
/// cases (logits up to 4 in magnitude): 7.2e-2 on logits, 9.8e-2 on MTP logits, 6.5e-2 between
/// cached decoding and the full forward. 0.15 leaves 1.5x headroom; a wrong scale, rotation or
/// layout moves logits by 1 or more.
pub const BF16_ATOL: f32 = 0.15;
/// The same for f16 (11 bits of mantissa, 8x finer): measured 7.5e-3 on logits, 1.1e-2 on MTP
/// logits, 1.6e-2 between cached decoding and the full forward; 2.5e-2 leaves 1.5x headroom.
pub const F16_ATOL: f32 = 2.5e-2;

/// Largest gap between the reference's selection scores (score plus correction bias) of two
/// experts that a bf16 model may order the other way: its router reads a hidden state rounded to
/// bf16 (relative 2^-9), which moves sigmoid scores by up to a few 1e-3 here.
pub const BF16_ROUTING_TIE: f32 = 2e-2;
/// The same for f16 (8x finer rounding).
pub const F16_ROUTING_TIE: f32 = 2.5e-3;

/// The golden cases, each a Hugging Face checkpoint directory with `reference.safetensors`.
pub const CASES: [&str; 3] = ["v3_yarn_qlora", "v3_no_qlora", "v5_style"];

/// `tests/golden/<case>`: next to this crate's sources, or under `tests/golden` of the working
/// directory when the test binary runs on another machine (GPU runs copy the tree elsewhere).
pub fn golden_dir(case: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let root = if built.exists() { built } else { PathBuf::from("tests/golden") };
    root.join(case)
}

/// A tensor of the reference file, flattened.
#[derive(Debug, Clone)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

/// All tensors of `reference.safetensors`.
pub struct Reference {
    pub tensors: HashMap<String, RefTensor>,
}

impl Reference {
    pub fn load(case: &str) -> Self {
        let path = golden_dir(case).join("reference.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).expect("valid reference file");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let (f32, i64) = match view.dtype() {
                Dtype::F32 => (
                    data.chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
                Dtype::I64 => (
                    vec![],
                    data.chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("unexpected dtype {other:?} for {name}"),
            };
            tensors.insert(name, RefTensor { shape: view.shape().to_vec(), f32, i64 });
        }
        Self { tensors }
    }

    pub fn get(&self, name: &str) -> &RefTensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("reference lacks `{name}`"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Largest absolute difference, infinite where either side is NaN (or the two are infinities
/// that do not cancel to equality); panics on length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    // `f32::max` ignores NaN, so a NaN difference must become infinite to be seen.
    let diff = |(x, y): (&f32, &f32)| {
        if x == y {
            0.0
        } else {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        }
    };
    a.iter().zip(b).map(diff).fold(0.0, f32::max)
}

/// Asserts `actual ≈ expected` within `atol`, naming what is compared; prints the difference
/// (visible with `--nocapture`) so the margin to the tolerance can be tracked.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], atol: f32) {
    let diff = max_abs_diff(actual, expected);
    eprintln!("{what}: max |diff| = {diff:.2e} (tolerance {atol:.0e})");
    assert!(diff <= atol, "{what}: max |diff| = {diff:e} > {atol:e}");
}

/// Sorts each row of `[rows, k]` expert indices ascending, permuting `weights` alike, so routing
/// decisions compare independently of top-k output order.
pub fn sort_rows(indices: &[i64], weights: &[f32], k: usize) -> (Vec<i64>, Vec<f32>) {
    let mut idx = Vec::with_capacity(indices.len());
    let mut w = Vec::with_capacity(weights.len());
    for (ri, rw) in indices.chunks(k).zip(weights.chunks(k)) {
        let mut pairs: Vec<(i64, f32)> = ri.iter().copied().zip(rw.iter().copied()).collect();
        pairs.sort_by_key(|p| p.0);
        idx.extend(pairs.iter().map(|p| p.0));
        w.extend(pairs.iter().map(|p| p.1));
    }
    (idx, w)
}

/// A tensor as raw safetensors parts, for building deliberately broken checkpoints.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Reads every tensor of a safetensors file.
pub fn read_raw(path: &Path) -> std::collections::BTreeMap<String, RawTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            (
                name,
                RawTensor { dtype: v.dtype(), shape: v.shape().to_vec(), bytes: v.data().to_vec() },
            )
        })
        .collect()
}

/// Writes tensors as a safetensors file.
pub fn write_raw(path: &Path, tensors: &std::collections::BTreeMap<String, RawTensor>) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Copies golden case `case` into a fresh temporary directory, letting `edit` change the tensors
/// first. The directory lives as long as the returned guard.
pub fn edited_copy(
    case: &str,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, RawTensor>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = golden_dir(case);
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = read_raw(&src.join("model.safetensors"));
    edit(&mut tensors);
    write_raw(&dir.path().join("model.safetensors"), &tensors);
    dir
}
