//! FP8 benchmark: throughput of block quantization and of the block-scaled FP8 GEMM, against
//! Burn's f32 matmul on the same device, and FP8 weight memory against BF16.
//!
//! ```sh
//! cargo bench -p deepseek-core --bench fp8                                  # Flex: the host twin
//! cargo bench -p deepseek-core --features wgpu --bench fp8 -- --device wgpu # the CubeCL kernels
//! cargo bench -p deepseek-core --features cuda --bench fp8 -- --device cuda --sizes 4096x4096x4096
//! ```
//! `--sizes MxNxK,...` (GEMM `[M, K] · [N, K]ᵀ`), `--iters N`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use deepseek_core::device::{run_on, BackendTask, DeviceKind};
use deepseek_core::fp8::{self, Fp8Linear, ScaleFormat};
use deepseek_core::DeepSeekConfig;

struct Args {
    device: DeviceKind,
    sizes: Vec<[usize; 3]>,
    iters: usize,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        device: DeviceKind::Flex,
        sizes: vec![[256, 1024, 1024], [1024, 1024, 1024], [512, 576, 7168]],
        iters: 5,
    };
    let mut it = std::env::args().skip(1).filter(|s| s != "--bench");
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = value()?.parse().map_err(anyhow::Error::msg)?,
            "--iters" => a.iters = value()?.parse()?,
            "--sizes" => {
                a.sizes = value()?
                    .split(',')
                    .map(|s| {
                        let v: Vec<usize> =
                            s.split('x').map(str::parse).collect::<Result<_, _>>()?;
                        let [m, n, k] = v[..] else { bail!("size `{s}` is not MxNxK") };
                        Ok([m, n, k])
                    })
                    .collect::<Result<_>>()?
            }
            other => bail!("unknown option `{other}` (use --device, --sizes MxNxK,..., --iters)"),
        }
    }
    Ok(a)
}

/// Median seconds of `iters` runs of `f` (after one warm-up), with `sync` before each clock read.
fn time(iters: usize, mut f: impl FnMut(), sync: &dyn Fn()) -> f64 {
    f();
    sync();
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            sync();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn memory() {
    println!("\n## FP8 weight memory (E4M3 codes + f32 scales per 128 × 128 block) against BF16");
    println!("| weight | shape | BF16 | FP8 | ratio |");
    println!("|---|---|---|---|---|");
    let device = Default::default();
    for (name, [n, k]) in [
        ("q_b_proj", [24576, 1536]),
        ("kv_a_proj_with_mqa", [576, 7168]),
        ("expert down_proj", [7168, 2048]),
        ("o_proj", [7168, 16384]),
    ] {
        let w = Tensor::<burn::backend::Flex, 2>::zeros([k, n], &device);
        let bytes = Fp8Linear::quantize(w).weight_bytes();
        let bf16 = 2 * n * k;
        println!(
            "| {name} | {n} × {k} | {:.2} MiB | {:.2} MiB | {:.3} |",
            bf16 as f64 / 1048576.0,
            bytes as f64 / 1048576.0,
            bytes as f64 / bf16 as f64
        );
    }
    let v3 = DeepSeekConfig::v3_671b();
    let (bf16, f8) = (v3.weight_bytes_bf16(), v3.weight_bytes_fp8());
    println!(
        "| DeepSeek-V3 (all weights, MTP included) | | {:.1} GiB | {:.1} GiB | {:.3} |",
        bf16 as f64 / (1u64 << 30) as f64,
        f8 as f64 / (1u64 << 30) as f64,
        f8 as f64 / bf16 as f64
    );
}

/// GEMM table through Burn tensors: `Fp8Linear::forward` (activation quantization + FP8 GEMM on
/// GPU backends, the reference elsewhere) against an f32 matmul.
fn gemm_table<B: Backend>(args: &Args, device: &B::Device, label: &str) {
    println!("\n## GEMM `[M, K] · [N, K]ᵀ` on {label} ({} iterations, median)", args.iters);
    println!("| M × N × K | f32 matmul | FP8 (quantize x + GEMM) | FP8 TFLOP/s | f32 TFLOP/s |");
    println!("|---|---|---|---|---|");
    let sync = || B::sync(device).expect("device sync");
    for &[m, n, k] in &args.sizes {
        let x = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), device);
        let w = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 0.02), device);
        let layer = Fp8Linear::quantize(w.clone());
        let f32_s = time(args.iters, || drop(x.clone().matmul(w.clone())), &sync);
        let fp8_s = time(args.iters, || drop(layer.forward(x.clone())), &sync);
        let flop = 2.0 * (m * n * k) as f64;
        println!(
            "| {m} × {n} × {k} | {:.2} ms | {:.2} ms | {:.3} | {:.3} |",
            f32_s * 1e3,
            fp8_s * 1e3,
            flop / fp8_s / 1e12,
            flop / f32_s / 1e12
        );
    }
}

/// Quantization throughput in GB/s of f32 input.
fn quant_row(label: &str, elements: usize, seconds: f64) {
    println!(
        "| {label} | {:.2} ms | {:.2} GB/s |",
        seconds * 1e3,
        (elements * 4) as f64 / seconds / 1e9
    );
}

fn host(args: &Args) {
    println!(
        "\n## Quantization on the host (the twin; {} threads)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| what | time | f32 input |");
    println!("|---|---|---|");
    let [m, _, k] = args.sizes[0];
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
    quant_row(
        &format!("quantize [{m}, {k}] in 1 × 128 tiles"),
        m * k,
        time(
            args.iters,
            || drop(fp8::quantize_blocks(&x, m, k, fp8::ACTIVATION_BLOCK, ScaleFormat::F32)),
            &|| (),
        ),
    );
    quant_row(
        &format!("fake-quantize [{m}, {k}] (quantize + dequantize)"),
        m * k,
        time(
            args.iters,
            || fp8::fake_quantize_blocks(&mut x.clone(), m, k, fp8::ACTIVATION_BLOCK),
            &|| (),
        ),
    );
    gemm_table::<burn::backend::Flex>(
        args,
        &Default::default(),
        "Flex (reference: fake-quantized x · dequantized W)",
    );
}

/// The kernels on their own (quantize, dequantize, GEMM of quantized operands), on the CubeCL
/// runtime under backend `B`, if it has one.
fn raw_kernels<B: Backend>(args: &Args) {
    let backend = std::any::TypeId::of::<B>();
    #[cfg(feature = "wgpu")]
    if backend == std::any::TypeId::of::<burn::backend::Wgpu>() {
        kernels::<burn_wgpu::WgpuRuntime>(args, "wgpu");
    }
    #[cfg(feature = "cuda")]
    if backend == std::any::TypeId::of::<burn::backend::Cuda>() {
        kernels::<cubecl::cuda::CudaRuntime>(args, "CUDA");
    }
    let _ = (backend, args);
}

#[cfg(feature = "kernels")]
fn kernels<R: burn_cubecl::CubeRuntime>(args: &Args, label: &str) {
    use deepseek_core::fp8::kernels;
    type Cube<R> = burn_cubecl::CubeBackend<R, f32, i32, u32>;
    let device = R::Device::default();
    let sync = || <Cube<R> as Backend>::sync(&device).expect("device sync");
    println!("\n## Kernels on {label} ({} iterations, median)", args.iters);
    println!("| what | time | f32 input |");
    println!("|---|---|---|");
    for &[m, n, k] in &args.sizes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
        let w: Vec<f32> =
            (0..n * k).map(|i| ((i * 104_729 % 977) as f32 - 488.0) / 3111.0).collect();
        let xd = kernels::upload::<R>(&device, &x, [m, k]);
        let wd = kernels::upload::<R>(&device, &w, [n, k]);
        let t = time(
            args.iters,
            || {
                drop(
                    kernels::quantize(xd.clone(), fp8::ACTIVATION_BLOCK, ScaleFormat::F32).unwrap(),
                )
            },
            &sync,
        );
        quant_row(&format!("quantize [{m}, {k}], 1 × 128"), m * k, t);
        let t = time(
            args.iters,
            || drop(kernels::quantize(wd.clone(), fp8::WEIGHT_BLOCK, ScaleFormat::F32).unwrap()),
            &sync,
        );
        quant_row(&format!("quantize [{n}, {k}], 128 × 128"), n * k, t);
        let qa = kernels::quantize(xd.clone(), fp8::ACTIVATION_BLOCK, ScaleFormat::F32).unwrap();
        let qw = kernels::quantize(wd.clone(), fp8::WEIGHT_BLOCK, ScaleFormat::F32).unwrap();
        let t = time(args.iters, || drop(kernels::dequantize(&qw).unwrap()), &sync);
        quant_row(&format!("dequantize [{n}, {k}]"), n * k, t);
        let t = time(args.iters, || drop(kernels::gemm(&qa, &qw).unwrap()), &sync);
        println!(
            "| FP8 GEMM {m} × {n} × {k} (operands quantized) | {:.2} ms | {:.3} TFLOP/s |",
            t * 1e3,
            2.0 * (m * n * k) as f64 / t / 1e12
        );
    }
    gemm_table::<Cube<R>>(args, &device, label);
}

struct Bench(Args);

impl BackendTask for Bench {
    type Output = ();
    fn run<B: Backend>(self, _devices: Vec<B::Device>) {
        if self.0.device == DeviceKind::Flex {
            host(&self.0);
        } else {
            raw_kernels::<B>(&self.0);
        }
    }
}

fn main() -> Result<()> {
    let args = parse()?;
    run_on(args.device, &[], Bench(args))?;
    memory();
    Ok(())
}
