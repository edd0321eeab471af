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
        assert!(
            ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
            "code {code:#04x}: {ours} vs {theirs}"
        );
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
        .map(|(x, c)| {
            format!("{x:e} ({:#010x}): ours {:#04x}, PyTorch {c:#04x}", x.to_bits(), encode(*x))
        })
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
            assert_eq!(
                g[&format!("{name}_scales_{fmt}")].shape,
                scale_grid(rows, cols, block).to_vec()
            );
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
    let model: deepseek_core::DeepSeekModel<Flex> =
        deepseek_core::load_model(&dir, &device, deepseek_core::LoadOptions::default()).unwrap();
    let reference = read_raw(&dir.join("reference.safetensors"));
    let ids_raw = &reference["input_ids"];
    let ids: Vec<i64> =
        ids_raw.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    let ids = Tensor::<Flex, 2, Int>::from_data(
        TensorData::new(ids, [ids_raw.shape[0], ids_raw.shape[1]]),
        &device,
    );
    let logits: Vec<f32> = model.forward(ids).into_data().into_vec().unwrap();
    deepseek_tests::assert_close(
        &format!("{case} logits"),
        &logits,
        &f32s(&reference["logits"]),
        deepseek_tests::F32_ATOL,
    );
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
    let load = |dir: &std::path::Path| {
        deepseek_core::load_model::<burn::backend::Flex>(
            dir,
            &Default::default(),
            deepseek_core::LoadOptions::default(),
        )
    };
    // Missing scale.
    let dir = deepseek_tests::edited_copy("v3_fp8_ragged", |t| {
        t.remove(&format!("{W}_scale_inv"));
    });
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, DeepSeekError::MissingTensor { name, .. } if name == &format!("{W}_scale_inv")),
        "{err}"
    );
    // Scale grid of the wrong shape.
    let dir = deepseek_tests::edited_copy("v3_fp8_ragged", |t| {
        let s = t.get_mut(&format!("{W}_scale_inv")).unwrap();
        s.shape = vec![s.shape.iter().product::<usize>()];
    });
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, DeepSeekError::ShapeMismatch { name, .. } if name.ends_with("_scale_inv")),
        "{err}"
    );
    // A NaN code in the weight data.
    let dir = deepseek_tests::edited_copy("v3_fp8_ragged", |t| {
        t.get_mut(W).unwrap().bytes[5] = 0xFF;
    });
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(&err, DeepSeekError::Fp8Nan { name, index: 5, .. } if name == W), "{err}");
}

#[test]
fn converting_to_fp8_writes_the_released_format_bit_for_bit() {
    use deepseek_core::checkpoint::convert::{convert, ConvertTo};
    let out = tempfile::tempdir().unwrap();
    // Small shards: the output is split and indexed.
    let report =
        convert(&deepseek_tests::golden_dir("v3_yarn_qlora"), out.path(), ConvertTo::Fp8, 200_000)
            .unwrap();
    assert!(report.shards > 1, "{report:?}");
    assert_eq!(report.converted, 101);
    // Same codes and scales as the golden FP8 checkpoint the Python script made.
    let ours = deepseek_core::checkpoint::Checkpoint::open(out.path()).unwrap();
    let golden = read_raw(&deepseek_tests::golden_dir("v3_fp8_128").join("model.safetensors"));
    assert_eq!(ours.names().count(), golden.len());
    for (name, t) in &golden {
        let stored = ours.stored(name).unwrap_or_else(|| panic!("`{name}` missing"));
        assert_eq!((stored.dtype, &stored.shape), (t.dtype, &t.shape), "{name}");
        assert!(ours.raw_bytes(name) == t.bytes.as_slice(), "`{name}` differs");
    }
    // And it loads (sharded, FP8); its tensors are those of the golden case, whose logits are
    // checked above.
    let model: deepseek_core::DeepSeekModel<burn::backend::Flex> = deepseek_core::load_model(
        out.path(),
        &Default::default(),
        deepseek_core::LoadOptions::default(),
    )
    .unwrap();
    assert!(model.config.quantization.is_some());
}

#[test]
fn converting_fp8_to_bf16_dequantizes_and_drops_the_scales() {
    use deepseek_core::checkpoint::convert::{convert, ConvertTo};
    let out = tempfile::tempdir().unwrap();
    let report =
        convert(&deepseek_tests::golden_dir("v3_fp8_ragged"), out.path(), ConvertTo::Bf16, 1 << 30)
            .unwrap();
    assert_eq!((report.converted, report.shards), (101, 1));
    let ckpt = deepseek_core::checkpoint::Checkpoint::open(out.path()).unwrap();
    assert!(ckpt.names().all(|n| !n.ends_with("_scale_inv")));
    let w = "model.layers.1.self_attn.kv_b_proj.weight";
    assert_eq!(ckpt.stored(w).unwrap().dtype, safetensors::Dtype::BF16);
    let model: deepseek_core::DeepSeekModel<burn::backend::Flex> = deepseek_core::load_model(
        out.path(),
        &Default::default(),
        deepseek_core::LoadOptions::default(),
    )
    .unwrap();
    assert!(model.config.quantization.is_none());
    // Every converted weight is the BF16 rounding of the dequantized FP8 weight; the rest is as stored.
    // (Logits are not compared: BF16 rounding moves router scores by more than the golden
    // case's top-k margins, so expert choices may change.)
    let source =
        deepseek_core::checkpoint::Checkpoint::open(deepseek_tests::golden_dir("v3_fp8_ragged"))
            .unwrap()
            .with_fp8_block(Some([32, 48]));
    for name in ckpt.names() {
        let shape = ckpt.stored(name).unwrap().shape;
        let before: Vec<f32> = source.read_f32(name, &shape).unwrap().into_vec().unwrap();
        let after: Vec<f32> = ckpt.read_f32(name, &shape).unwrap().into_vec().unwrap();
        let rounded: Vec<f32> = before.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
        let expected = if source.stored(name).unwrap().dtype == safetensors::Dtype::F8_E4M3 {
            rounded
        } else {
            before
        };
        assert!(after == expected, "`{name}`");
    }
}

/// FP8-resident weights (the default for an FP8 checkpoint) against the same checkpoint
/// dequantized on load (`--dequantize`), f32 activations: the full forward pass (prefill, the
/// host-dequantized GEMMs), MTP, and cached decoding one token at a time (the few-row FP8
/// kernel, the absorbed attention from dequantized `kv_b_proj`), within 1e-4; and the weights
/// held take half the bytes of bf16.
fn resident_case_matches_dequantized(case: &str) {
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor, TensorData};
    use deepseek_core::finetune::{for_each_adaptable, for_each_routed_experts};
    use deepseek_core::{AttentionPath, DeepSeekModel, LatentCache, LoadOptions, WeightDtype};
    let dir = deepseek_tests::golden_dir(case);
    let device = Default::default();
    let load = |options: LoadOptions| -> DeepSeekModel<Flex> {
        deepseek_core::load_model(&dir, &device, options).unwrap()
    };
    let mut resident = load(LoadOptions::default());
    let mut dequantized = load(LoadOptions::default().with_dequantize_fp8(true));
    let mut bf16 =
        load(LoadOptions::default().with_dtype(WeightDtype::Bf16).with_dequantize_fp8(true));

    // Which projections hold codes (those the checkpoint stores in FP8: every `*_proj`; these
    // goldens keep `kv_a_proj_with_mqa` in f32), and their bytes against the same
    // projections in bf16.
    let ckpt = deepseek_core::checkpoint::Checkpoint::open(&dir).unwrap();
    let stored_fp8 = |path: &str| {
        ckpt.stored(&format!("{path}.weight")).unwrap().dtype == safetensors::Dtype::F8_E4M3
    };
    let bytes = |model: &mut DeepSeekModel<Flex>| {
        let (mut total, mut fp8, mut expected) = (0, 0, 0);
        for_each_adaptable(model, |path, p| {
            if stored_fp8(path) {
                total += p.weight_bytes();
                expected += 1;
            }
            fp8 += usize::from(p.is_fp8());
            Ok(())
        })
        .unwrap();
        for_each_routed_experts(model, |_, experts| {
            for p in [&experts.gate_up, &experts.down] {
                total += p.weight_bytes();
                fp8 += usize::from(p.is_fp8());
                expected += 1;
            }
            Ok(())
        })
        .unwrap();
        (total, fp8, expected)
    };
    let (ours, fp8, expected) = bytes(&mut resident);
    assert_eq!(fp8, expected, "{case}: every projection stored in FP8 stays FP8");
    assert!(fp8 >= 20, "{case}: {fp8} FP8 projections");
    assert_eq!(bytes(&mut dequantized).1, 0, "{case}: --dequantize holds none");
    let (half, _, _) = bytes(&mut bf16);
    let ratio = ours as f64 / half as f64;
    eprintln!("{case}: FP8-resident projections {ours} bytes, bf16 {half} ({ratio:.3}x)");
    assert!((0.5..0.52).contains(&ratio), "{case}: {ratio} of bf16's bytes");

    let reference = deepseek_tests::Reference::load(case);
    let ids = reference.get("input_ids").clone();
    let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.i64, ids.shape), &device);
    let values = |t: Tensor<Flex, 3>| -> Vec<f32> { t.into_data().into_vec().unwrap() };
    let options = deepseek_core::ForwardOptions { mtp: true, ..Default::default() };
    let (ours, theirs) = (
        resident.forward_with(ids.clone(), options),
        dequantized.forward_with(ids.clone(), options),
    );
    deepseek_tests::assert_close(
        &format!("{case} logits"),
        &values(ours.logits),
        &values(theirs.logits),
        1e-4,
    );
    for (k, (a, b)) in ours.mtp_logits.into_iter().zip(theirs.mtp_logits).enumerate() {
        deepseek_tests::assert_close(&format!("{case} MTP {k}"), &values(a), &values(b), 1e-4);
    }
    let [batch, seq] = ids.dims();
    let mut caches: Vec<LatentCache<Flex>> =
        (0..2).map(|_| LatentCache::new(&resident.config, batch, seq, &device).unwrap()).collect();
    for pos in 0..seq {
        let token = ids.clone().narrow(1, pos, 1);
        let mut steps =
            [&resident, &dequantized].into_iter().zip(caches.iter_mut()).map(|(m, c)| {
                values(m.forward_cached(token.clone(), c, AttentionPath::Absorbed).unwrap().logits)
            });
        let (a, b) = (steps.next().unwrap(), steps.next().unwrap());
        deepseek_tests::assert_close(&format!("{case} decode {pos}"), &a, &b, 1e-4);
    }
}

#[test]
fn fp8_resident_weights_equal_the_dequantized_checkpoint() {
    resident_case_matches_dequantized("v3_fp8_128");
}

#[test]
fn fp8_resident_weights_equal_the_dequantized_checkpoint_with_ragged_blocks() {
    resident_case_matches_dequantized("v3_fp8_ragged");
}
