//! The FP8 CubeCL kernels against their host twins (`deepseek_core::fp8::block`), on wgpu
//! (lavapipe in CI): quantization codes and scales bit for bit, dequantization bit for bit, the
//! block-scaled GEMM within f32 summation-order tolerance. Random data with outliers, all-zero
//! rows and tiny values; shapes that are not multiples of the block (nor of 4, the packing).
//!
//! `cargo test -p deepseek-tests --features wgpu --test fp8_kernels` (and `--features cuda` with
//! `DEEPSEEK_TEST_DEVICE=cuda` on an NVIDIA GPU).
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;

use common::Rng;
use deepseek_core::fp8::kernels::{self, DeviceFp8};
use deepseek_core::fp8::{
    self, dequantize_blocks, quantize_blocks, reference_gemm, unpack_words, ScaleFormat,
};

#[cfg(feature = "wgpu")]
type Runtime = burn::backend::wgpu::WgpuRuntime;
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
type Runtime = cubecl::cuda::CudaRuntime;

fn device() -> <Runtime as cubecl::Runtime>::Device {
    Default::default()
}

/// Shapes `[rows, cols]`: whole blocks, partial blocks on each edge, widths that are not a
/// multiple of 4, single rows and columns.
const SHAPES: [[usize; 2]; 7] =
    [[128, 128], [3, 300], [130, 200], [257, 129], [1, 7], [5, 1], [64, 384]];

fn quantize_on_device(
    x: &[f32],
    shape: [usize; 2],
    block: [usize; 2],
    format: ScaleFormat,
) -> DeviceFp8<Runtime> {
    kernels::quantize(kernels::upload::<Runtime>(&device(), x, shape), block, format)
        .expect("valid input")
}

#[test]
fn quantization_is_bit_identical_to_the_reference() {
    let mut rng = Rng(1);
    for shape in SHAPES {
        let mut x = rng.activations(shape[0] * shape[1]);
        // One all-zero row: its tiles take the 1e-4 floor of amax.
        x[..shape[1]].fill(0.0);
        for block in [fp8::ACTIVATION_BLOCK, fp8::WEIGHT_BLOCK, [32, 48]] {
            for format in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
                let expected = quantize_blocks(&x, shape[0], shape[1], block, format);
                let q = quantize_on_device(&x, shape, block, format);
                let scales: Vec<f32> = kernels::download(&q.scales);
                let codes =
                    unpack_words(&kernels::download::<Runtime, u32>(&q.codes), shape[0], shape[1]);
                let scale_bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    scale_bits(&scales),
                    scale_bits(&expected.scales),
                    "scales of {shape:?} in {block:?} blocks ({format:?})"
                );
                let wrong = codes.iter().zip(&expected.codes).filter(|(a, b)| a != b).count();
                assert_eq!(
                    wrong, 0,
                    "{wrong} codes differ for {shape:?} in {block:?} blocks ({format:?})"
                );
                // Padding bytes of each row's last word are zero.
                let words: Vec<u32> = kernels::download(&q.codes);
                assert_eq!(words, fp8::pack_words(&expected.codes, shape[0], shape[1]));

                let y: Vec<f32> = kernels::download(&kernels::dequantize(&q).unwrap());
                let want = dequantize_blocks(&expected);
                assert!(
                    y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "dequantization of {shape:?} in {block:?}"
                );
            }
        }
    }
}

#[test]
fn every_code_decodes_like_the_reference() {
    // All 256 codes through the device decoder: codes from the reference, scale 1 (one block).
    let values: Vec<f32> = (0..=255u8).map(fp8::decode).collect();
    let finite: Vec<f32> = values.iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect();
    // Quantizing the finite values with scale exactly 1 needs amax = 448: they already span it.
    let q = quantize_on_device(&finite, [1, 256], [1, 256], ScaleFormat::F32);
    assert_eq!(kernels::download::<Runtime, f32>(&q.scales), vec![1.0]);
    let codes = unpack_words(&kernels::download::<Runtime, u32>(&q.codes), 1, 256);
    for (i, &code) in codes.iter().enumerate() {
        let want = if values[i].is_nan() { 0x00 } else { i as u8 };
        // -0.0 encodes to 0x80 and +0.0 to 0x00, as the reference.
        assert_eq!(code, want, "code {i:#04x}");
    }
    let y: Vec<f32> = kernels::download(&kernels::dequantize(&q).unwrap());
    for (i, v) in y.iter().enumerate() {
        assert_eq!(v.to_bits(), finite[i].to_bits(), "decode of code {i:#04x}");
    }
}

#[test]
fn ties_round_to_the_even_code() {
    // Midpoints between neighbouring finite codes (both signs), with 448 in the tile so that the
    // scale is exactly 1: each must land on the code with an even mantissa, as the reference.
    let mut x = vec![448.0f32];
    for code in 0..0x7Du8 {
        let mid = (fp8::decode(code) + fp8::decode(code + 1)) / 2.0;
        x.extend([mid, -mid]);
    }
    let n = x.len();
    let expected = quantize_blocks(&x, 1, n, [1, 256], ScaleFormat::F32);
    assert_eq!(expected.scales, vec![1.0]);
    let q = quantize_on_device(&x, [1, n], [1, 256], ScaleFormat::F32);
    assert_eq!(unpack_words(&kernels::download::<Runtime, u32>(&q.codes), 1, n), expected.codes);
}

#[test]
fn a_block_with_nan_gets_a_nan_scale_and_nan_codes() {
    let mut x = vec![1.0f32; 2 * 256];
    x[300] = f32::NAN;
    let q = quantize_on_device(&x, [2, 256], fp8::ACTIVATION_BLOCK, ScaleFormat::F32);
    let scales: Vec<f32> = kernels::download(&q.scales);
    assert!(
        scales[2].is_nan() && scales.iter().enumerate().all(|(i, s)| i == 2 || *s == 1.0 / 448.0),
        "{scales:?}"
    );
    let codes = unpack_words(&kernels::download::<Runtime, u32>(&q.codes), 2, 256);
    assert!(codes[256..384].iter().all(|c| c & 0x7F == 0x7F), "the NaN tile is all NaN codes");
    assert!(codes[..256].iter().chain(&codes[384..]).all(|&c| c == 0x7E), "other tiles hold 448");
}

#[test]
fn gemm_matches_the_reference_on_ragged_shapes() {
    let mut rng = Rng(7);
    // [m, n, k]: one tile, ragged on every side, K not a multiple of 128 nor of 4, single row.
    for [m, n, k] in
        [[64, 64, 128], [70, 130, 300], [1, 5, 7], [129, 257, 384], [33, 200, 1000], [3, 128, 129]]
    {
        let a = rng.activations(m * k);
        let b: Vec<f32> = rng.activations(n * k).iter().map(|v| v * 0.05).collect();
        let (qa, qb) = (
            quantize_blocks(&a, m, k, fp8::ACTIVATION_BLOCK, ScaleFormat::F32),
            quantize_blocks(&b, n, k, fp8::WEIGHT_BLOCK, ScaleFormat::F32),
        );
        let expected = reference_gemm(&qa, &qb);
        let da = quantize_on_device(&a, [m, k], fp8::ACTIVATION_BLOCK, ScaleFormat::F32);
        let db = quantize_on_device(&b, [n, k], fp8::WEIGHT_BLOCK, ScaleFormat::F32);
        let c: Vec<f32> = kernels::download(&kernels::gemm(&da, &db).expect("valid operands"));
        assert_eq!(c.len(), m * n);
        // Tolerance: f32 summation order, relative to the sum of |products|.
        let (dqa, dqb) = (dequantize_blocks(&qa), dequantize_blocks(&qb));
        for i in 0..m {
            for j in 0..n {
                let magnitude: f32 = (0..k).map(|t| (dqa[i * k + t] * dqb[j * k + t]).abs()).sum();
                let (got, want) = (c[i * n + j], expected[i * n + j]);
                assert!(
                    (got - want).abs() <= 2e-6 * magnitude + 1e-30,
                    "[{m}, {n}, {k}] at ({i}, {j}): {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn launch_wrappers_reject_bad_operands() {
    let x = kernels::upload::<Runtime>(&device(), &[1.0; 12], [3, 4]);
    let err = kernels::quantize(x.clone(), [1, 6], ScaleFormat::F32).unwrap_err();
    assert!(err.to_string().contains("multiple of 4"), "{err}");
    let a = kernels::quantize(x.clone(), fp8::ACTIVATION_BLOCK, ScaleFormat::F32).unwrap();
    let y = kernels::upload::<Runtime>(&device(), &[1.0; 10], [2, 5]);
    let b = kernels::quantize(y, fp8::WEIGHT_BLOCK, ScaleFormat::F32).unwrap();
    let err = kernels::gemm(&a, &b).unwrap_err();
    assert!(err.to_string().contains("inner dimensions differ"), "{err}");
    let err = kernels::gemm(&b, &a).unwrap_err();
    assert!(err.to_string().contains("[1, 128] tiles"), "{err}");
    // Parts that do not fit the stated shape.
    let wrong = DeviceFp8 { rows: 4, ..a.clone() };
    let err = kernels::dequantize(&wrong).unwrap_err();
    assert!(err.to_string().contains("codes must be"), "{err}");
    let wrong = DeviceFp8 { scales: b.scales.clone(), block: [1, 128], ..a };
    assert!(kernels::gemm(&wrong, &b).unwrap_err().to_string().contains("scales must be"));
}

#[cfg(feature = "wgpu")]
mod burn_tensors {
    //! The kernels behind Burn tensors: `fake_quantize` and the FP8 training GEMM on wgpu (with
    //! and without fusion, under autodiff) against the host twin on Flex.
    use super::*;
    use burn::backend::{Autodiff, Flex, Wgpu};
    use burn::tensor::{backend::Backend, Tensor, TensorData};
    use deepseek_core::device::{run_on, BackendTask, DeviceKind};
    use deepseek_core::fp8::training;

    type Plain = burn::backend::wgpu::CubeBackend<Runtime, f32, i32, u32>;

    fn fake_on<B: Backend>(x: &[f32], shape: [usize; 2], block: [usize; 2]) -> Vec<f32> {
        let t = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), shape), &Default::default());
        fp8::fake_quantize(t, block).into_data().into_vec().unwrap()
    }

    #[test]
    fn fake_quantize_runs_the_kernels_and_matches_the_host_twin() {
        assert!(fp8::runs_kernels::<Wgpu>() && fp8::runs_kernels::<Plain>());
        assert!(!fp8::runs_kernels::<Flex>() && !fp8::runs_kernels::<Autodiff<Wgpu>>());
        let mut rng = Rng(3);
        let shape = [130, 260];
        let x = rng.activations(shape[0] * shape[1]);
        for block in [fp8::ACTIVATION_BLOCK, fp8::WEIGHT_BLOCK] {
            let mut want = x.clone();
            fp8::fake_quantize_blocks(&mut want, shape[0], shape[1], block);
            for got in [fake_on::<Wgpu>(&x, shape, block), fake_on::<Plain>(&x, shape, block)] {
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{block:?}"
                );
            }
        }
    }

    #[test]
    fn fp8_linear_runs_the_gemm_kernel_and_matches_the_reference() {
        let mut rng = Rng(9);
        let (m, k, n) = (37, 300, 130);
        let x = rng.activations(m * k);
        let w: Vec<f32> = rng.activations(n * k).iter().map(|v| v * 0.05).collect();
        let qw = quantize_blocks(&w, n, k, fp8::WEIGHT_BLOCK, ScaleFormat::F32);
        fn forward<B: Backend>(
            x: &[f32],
            qw: &fp8::BlockQuant,
            [m, k, n]: [usize; 3],
        ) -> (Vec<f32>, Vec<f32>) {
            let device = Default::default();
            let layer =
                fp8::Fp8Linear::<B>::from_codes(&qw.codes, qw.scales.clone(), [n, k], &device)
                    .unwrap();
            assert_eq!(layer.codes.dtype(), burn::tensor::DType::U32, "one byte per parameter");
            let x = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [m, k]), &device);
            let host = |t: Tensor<B, 2>| t.into_data().into_vec::<f32>().unwrap();
            (host(layer.forward(x.clone())), host(layer.forward_reference(x)))
        }
        let want = reference_gemm(
            &quantize_blocks(&x, m, k, fp8::ACTIVATION_BLOCK, ScaleFormat::F32),
            &qw,
        );
        let size = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (name, (kernel, reference)) in [
            ("fusion", forward::<Wgpu>(&x, &qw, [m, k, n])),
            ("plain", forward::<Plain>(&x, &qw, [m, k, n])),
        ] {
            // The kernel sums in another order than the f32 matmul of the reference: bitwise
            // equal outputs would mean the kernel path was not taken.
            assert_ne!(kernel, reference, "{name}: the FP8 GEMM kernel ran");
            for (what, got) in [("kernel", &kernel), ("reference", &reference)] {
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= 1e-5 * size, "{name} {what}: {worst} against {size}");
            }
        }
    }

    /// Loss `Σ (x·W) ⊙ u` through the FP8 GEMM; returns (y, dx, dW).
    fn fp8_step<B: Backend>(
        x: &[f32],
        w: &[f32],
        u: &[f32],
        [m, k, n]: [usize; 3],
    ) -> [Vec<f32>; 3] {
        let device = Default::default();
        let x = Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(x.to_vec(), [m, k]), &device)
            .require_grad();
        let w = Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(w.to_vec(), [k, n]), &device)
            .require_grad();
        let u = Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(u.to_vec(), [m, n]), &device);
        let y = training::matmul(x.clone(), w.clone());
        let grads = (y.clone() * u).sum().backward();
        let host = |t: Tensor<B, 2>| t.into_data().into_vec::<f32>().unwrap();
        [host(y.inner()), host(x.grad(&grads).unwrap()), host(w.grad(&grads).unwrap())]
    }

    /// [`fp8_step`] on the backend the switch picks, which installs the FP8 backward itself.
    struct Step {
        x: Vec<f32>,
        w: Vec<f32>,
        u: Vec<f32>,
        dims: [usize; 3],
    }

    impl BackendTask for Step {
        type Output = [Vec<f32>; 3];
        fn run<B: Backend>(self, _devices: Vec<B::Device>) -> [Vec<f32>; 3] {
            fp8_step::<B>(&self.x, &self.w, &self.u, self.dims)
        }
    }

    #[test]
    fn fp8_training_gemm_on_wgpu_matches_flex() {
        let mut rng = Rng(5);
        let dims = [70, 300, 130];
        let x = rng.activations(dims[0] * dims[1]);
        let w: Vec<f32> = rng.activations(dims[1] * dims[2]).iter().map(|v| v * 0.05).collect();
        let u = rng.activations(dims[0] * dims[2]);
        let step = || Step { x: x.clone(), w: w.clone(), u: u.clone(), dims };
        // Through the backend switch, with no registration call of our own.
        let gpu = run_on(DeviceKind::Wgpu, &[], step()).unwrap();
        assert!(
            training::has_autodiff_node::<Autodiff<Wgpu>>(),
            "the switch installed the FP8 backward for wgpu"
        );
        let cpu = run_on(DeviceKind::Flex, &[], step()).unwrap();
        for (name, (a, b)) in ["y", "dx", "dW"].iter().zip(gpu.iter().zip(&cpu)) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale, "{name}: {worst} against {scale}");
        }
    }
}

#[cfg(feature = "wgpu")]
mod resident {
    //! FP8-resident weights on wgpu: the codes dequantized on the device by table lookup (`u32`
    //! shifts and masks, a gather from the 256 decoded values), against the checkpoint
    //! dequantized on load on Flex.
    use burn::backend::{Flex, Wgpu};
    use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
    use deepseek_core::{load_model, AttentionPath, DeepSeekModel, LatentCache, LoadOptions};

    fn logits<B: Backend>(
        model: &DeepSeekModel<B>,
        ids: &[i64],
        shape: [usize; 2],
    ) -> Vec<Vec<f32>> {
        let device = Default::default();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), shape), &device);
        let full = model.forward(ids.clone()).into_data().convert::<f32>().into_vec().unwrap();
        // Two decoding steps after a prefill: the absorbed path's `kv_b_proj` dequantized.
        let mut cache = LatentCache::new(&model.config, shape[0], shape[1], &device).unwrap();
        let mut out = vec![full];
        let prefill = ids.clone().narrow(1, 0, shape[1] - 2);
        model.forward_cached(prefill, &mut cache, AttentionPath::Naive).unwrap();
        for pos in shape[1] - 2..shape[1] {
            let step = model
                .forward_cached(ids.clone().narrow(1, pos, 1), &mut cache, AttentionPath::Absorbed)
                .unwrap();
            out.push(step.logits.into_data().convert::<f32>().into_vec().unwrap());
        }
        out
    }

    #[test]
    fn fp8_resident_weights_on_wgpu_equal_the_dequantized_checkpoint() {
        for case in ["v3_fp8_128", "v3_fp8_ragged"] {
            let dir = deepseek_tests::golden_dir(case);
            let ids = deepseek_tests::Reference::load(case).get("input_ids").clone();
            let shape = [ids.shape[0], ids.shape[1]];
            let dequantized: DeepSeekModel<Flex> = load_model(
                &dir,
                &Default::default(),
                LoadOptions::default().with_dequantize_fp8(true),
            )
            .unwrap();
            let resident: DeepSeekModel<Wgpu> =
                load_model(&dir, &Default::default(), LoadOptions::default()).unwrap();
            assert!(resident.layers[0].self_attn.o_proj.is_fp8(), "{case}: loaded resident");
            let (ours, theirs) =
                (logits(&resident, &ids.i64, shape), logits(&dequantized, &ids.i64, shape));
            for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                deepseek_tests::assert_close(
                    &format!("{case} output {k}"),
                    a,
                    b,
                    deepseek_tests::GPU_ATOL,
                );
            }
        }
    }
}
