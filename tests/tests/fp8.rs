//! FP8 E4M3 and block quantization against PyTorch (`tests/golden/fp8/generate_fp8.py`):
//! bit-identical codes on all 256 values, a random set with subnormals, ties, values beyond 448
//! and specials, and DeepSeek-V3's block quantization on ragged shapes with f32 and UE8M0 scales.

use deepseek_core::fp8::{decode, encode, quantize_blocks, scale_grid, ScaleFormat};
use deepseek_tests::{read_raw, RawTensor};

fn golden() -> std::collections::BTreeMap<String, RawTensor> {
    read_raw(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/fp8/e4m3.safetensors"))
}

fn f32s(t: &RawTensor) -> Vec<f32> {
    t.bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn decoding_every_code_matches_pytorch() {
    let g = golden();
    let expected = f32s(&g["all_codes_decoded"]);
    for code in 0..=255u8 {
        let (ours, theirs) = (decode(code), expected[code as usize]);
        assert!(ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()), "code {code:#04x}: {ours} vs {theirs}");
    }
}

#[test]
fn encoding_random_values_is_bit_identical_to_pytorch() {
    let g = golden();
    let inputs = f32s(&g["random_in"]);
    let codes = &g["random_codes"].bytes;
    assert!(inputs.len() > 10_000);
    let mismatches: Vec<String> = inputs
        .iter()
        .zip(codes)
        .filter(|(x, c)| encode(**x) != **c)
        .take(5)
        .map(|(x, c)| format!("{x:e} ({:#010x}): ours {:#04x}, PyTorch {c:#04x}", x.to_bits(), encode(*x)))
        .collect();
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}

#[test]
fn block_quantization_matches_the_reference_on_ragged_shapes() {
    let g = golden();
    for (name, rows, cols, block) in [("weight", 130, 200, [128, 128]), ("act", 3, 300, [1, 128])] {
        let x = f32s(&g[&format!("{name}_in")]);
        for (fmt, format) in [("f32", ScaleFormat::F32), ("ue8m0", ScaleFormat::Ue8m0)] {
            let q = quantize_blocks(&x, rows, cols, block, format);
            let scales = f32s(&g[&format!("{name}_scales_{fmt}")]);
            assert_eq!(g[&format!("{name}_scales_{fmt}")].shape, scale_grid(rows, cols, block).to_vec());
            assert_eq!(q.scales, scales, "{name} {fmt} scales");
            let codes = &g[&format!("{name}_codes_{fmt}")].bytes;
            let wrong = q.codes.iter().zip(codes).filter(|(a, b)| a != b).count();
            assert_eq!(wrong, 0, "{name} {fmt}: {wrong} codes differ");
        }
    }
}

/// Logits of an FP8 golden checkpoint (weights dequantized on load) against transformers on the
/// same weights dequantized by the generating script.
fn fp8_case_matches(case: &str) {
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor, TensorData};
    let dir = deepseek_tests::golden_dir(case);
    let device = Default::default();
    let model: deepseek_core::DeepSeekModel<Flex> = deepseek_core::load_model(&dir, &device, deepseek_core::LoadOptions::default()).unwrap();
    let reference = read_raw(&dir.join("reference.safetensors"));
    let ids_raw = &reference["input_ids"];
    let ids: Vec<i64> = ids_raw.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [ids_raw.shape[0], ids_raw.shape[1]]), &device);
    let logits: Vec<f32> = model.forward(ids).into_data().into_vec().unwrap();
    deepseek_tests::assert_close(&format!("{case} logits"), &logits, &f32s(&reference["logits"]), deepseek_tests::F32_ATOL);
}

#[test]
fn fp8_checkpoint_with_128_blocks_reproduces_the_reference_logits() {
    fp8_case_matches("v3_fp8_128");
}

#[test]
fn fp8_checkpoint_with_ragged_blocks_reproduces_the_reference_logits() {
    fp8_case_matches("v3_fp8_ragged");
}

#[test]
fn bad_fp8_checkpoints_are_errors_naming_the_tensor() {
    use deepseek_core::DeepSeekError;
    const W: &str = "model.layers.1.self_attn.kv_b_proj.weight";
    let load = |dir: &std::path::Path| deepseek_core::load_model::<burn::backend::Flex>(dir, &Default::default(), deepseek_core::LoadOptions::default());
    // Missing scale.
    let dir = deepseek_tests::edited_copy("v3_fp8_ragged", |t| {
        t.remove(&format!("{W}_scale_inv"));
    });
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(&err, DeepSeekError::MissingTensor { name, .. } if name == &format!("{W}_scale_inv")), "{err}");
    // Scale grid of the wrong shape.
    let dir = deepseek_tests::edited_copy("v3_fp8_ragged", |t| {
        let s = t.get_mut(&format!("{W}_scale_inv")).unwrap();
        s.shape = vec![s.shape.iter().product::<usize>()];
    });
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(&err, DeepSeekError::ShapeMismatch { name, .. } if name.ends_with("_scale_inv")), "{err}");
    // A NaN code in the weight data.
    let dir = deepseek_tests::edited_copy("v3_fp8_ragged", |t| {
        t.get_mut(W).unwrap().bytes[5] = 0xFF;
    });
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(&err, DeepSeekError::Fp8Nan { name, index: 5, .. } if name == W), "{err}");
}
