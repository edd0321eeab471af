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
