//! Weights held in bf16 and f16 (`LoadOptions::dtype`) against transformers' f32 reference on
//! the golden cases: logits and MTP logits within the dtype's tolerance, greedy tokens equal
//! wherever the reference's top-2 margin exceeds twice that tolerance, every weight stored in the
//! dtype (the routers' correction biases in f32) at half the bytes of f32, the latent cache in the
//! dtype, and cached decoding equal to the full forward pass in the same dtype.

use burn::backend::Flex;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use deepseek_core::{
    load_model, AttentionPath, DeepSeekModel, ForwardOptions, LatentCache, LoadOptions, WeightDtype,
};
use deepseek_tests::*;

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// The dtype and shape of every float parameter.
fn params<B: Backend>(model: &DeepSeekModel<B>) -> Vec<(DType, Vec<usize>)> {
    struct List(Vec<(DType, Vec<usize>)>);
    impl<B: Backend> ModuleVisitor<B> for List {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            self.0.push((t.dtype(), t.dims().to_vec()));
        }
    }
    let mut list = List(Vec::new());
    model.visit(&mut list);
    list.0
}

/// Bytes of the float parameters.
fn weight_bytes(params: &[(DType, Vec<usize>)]) -> usize {
    params.iter().map(|(d, s)| d.size() * s.iter().product::<usize>()).sum()
}

/// Positions where the reference's best token leads the second by more than `margin`, and
/// whether our argmax agrees there.
fn greedy_agreement(ours: &[f32], reference: &[f32], vocab: usize, margin: f32) -> (usize, usize) {
    let argmax = |row: &[f32]| {
        row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap()
    };
    let (mut checked, mut equal) = (0, 0);
    for (o, r) in ours.chunks(vocab).zip(reference.chunks(vocab)) {
        let best = argmax(r);
        let second = r.iter().enumerate().filter(|(i, _)| *i != best).map(|(_, v)| *v);
        let lead = r[best] - second.fold(f32::NEG_INFINITY, f32::max);
        if lead > margin {
            checked += 1;
            equal += usize::from(argmax(o) == best);
        }
    }
    (checked, equal)
}

/// Per main-model token (rows `b·seq + i`), whether it is routed differently from the reference
/// in some block or comes after such a token in its sequence (attention reads the changed
/// state); asserts that each first difference is a near-tie of the reference's selection scores
/// (sigmoid or softmax score plus correction bias).
fn routing_flips<B: Backend>(
    model: &DeepSeekModel<B>,
    reference: &Reference,
    routing: &[deepseek_core::moe::Routing<B>],
    batch: usize,
    seq: usize,
    case: &str,
    dtype: WeightDtype,
) -> Vec<bool> {
    let cfg = &model.config;
    let (k, e) = (cfg.num_experts_per_tok, cfg.n_routed_experts);
    let tie = match dtype {
        WeightDtype::F32 => 0.0,
        WeightDtype::Bf16 => BF16_ROUTING_TIE,
        WeightDtype::F16 => F16_ROUTING_TIE,
    };
    let moe_layers = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l));
    let mut flipped = vec![false; batch * seq];
    for (r, l) in routing.iter().zip(moe_layers) {
        let idx: Vec<i64> = r.indices.clone().into_data().convert::<i64>().into_vec().unwrap();
        let (idx, _) = sort_rows(&idx, &vec![0.0; idx.len()], k);
        let theirs_all = &reference.get(&format!("router.{l}.topk_idx")).i64;
        let scores = &reference.get(&format!("router.{l}.scores")).f32;
        let bias = match &model.layers[l].mlp {
            deepseek_core::block::FeedForward::Moe(m) => {
                m.gate.e_score_correction_bias.as_ref().map(|b| to_vec(b.val()))
            }
            _ => None,
        }
        .unwrap_or(vec![0.0; e]);
        for (t, (ours, theirs)) in idx.chunks(k).zip(theirs_all.chunks(k)).enumerate() {
            if ours == theirs || flipped[t] {
                continue;
            }
            let select = |x: &i64| scores[t * e + *x as usize] + bias[*x as usize];
            let weakest_theirs = theirs
                .iter()
                .filter(|x| !ours.contains(x))
                .map(select)
                .fold(f32::INFINITY, f32::min);
            let strongest_ours = ours
                .iter()
                .filter(|x| !theirs.contains(x))
                .map(select)
                .fold(f32::NEG_INFINITY, f32::max);
            let gap = weakest_theirs - strongest_ours;
            eprintln!(
                "{case} {dtype}: block {l} token {t} routed differently, selection gap {gap:.1e}"
            );
            assert!(gap < tie, "{case} {dtype}: block {l} token {t}: not a near-tie (gap {gap})");
            // Later positions of the sequence attend to this token's changed state.
            let end = (t / seq + 1) * seq;
            flipped[t..end].iter_mut().for_each(|f| *f = true);
        }
    }
    flipped
}

/// Loads `case` with weights in `dtype` on `B` and compares it with the f32 reference.
fn check_case<B: Backend>(case: &str, dtype: WeightDtype, device: &B::Device, atol: f32) {
    let reference = Reference::load(case);
    let options = LoadOptions::default().with_dtype(dtype);
    let model = load_model::<B>(golden_dir(case), device, options).unwrap();
    assert_eq!(model.dtype(), dtype);

    // Every weight is held in the dtype, but the correction biases (f32 state): about half the
    // bytes of the f32 model.
    let held = params(&model);
    let experts = model.config.n_routed_experts;
    for (d, shape) in &held {
        let bias = *d == DType::F32 && shape == &[experts];
        assert!(
            *d == dtype.dtype() || bias,
            "{case} {dtype}: a {d:?} parameter of shape {shape:?}"
        );
    }
    let f32_model = load_model::<B>(golden_dir(case), device, Default::default()).unwrap();
    let (ours, full) = (weight_bytes(&held), weight_bytes(&params(&f32_model)));
    let ratio = ours as f64 / full as f64;
    eprintln!("{case} {dtype}: weight bytes {ours} against f32 {full} ({ratio:.3}x)");
    assert!(ratio < 0.501, "{case} {dtype}: {ratio}");

    let ids = reference.get("input_ids");
    let input =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.i64.clone(), ids.shape.clone()), device);
    let out = model.forward_with(input.clone(), ForwardOptions { hidden_states: false, mtp: true });
    assert_eq!(out.logits.dtype(), DType::F32, "logits are f32 whatever the weights");
    // Routing is discrete: where the reference's choice between two experts is a near-tie, the
    // rounding of the router's input may pick the other one, and that token's output (and its
    // MTP prediction) then legitimately differs by far more than rounding. Each token's first
    // differing choice must be such a tie; its positions are then left out of the comparison.
    let [batch, seq] = input.dims();
    let main_flips = routing_flips(&model, &reference, &out.routing, batch, seq, case, dtype);
    let left_out = main_flips.iter().filter(|f| **f).count();
    eprintln!("{case} {dtype}: {left_out} of {} positions at or after a near-tie", batch * seq);
    assert!(left_out < batch * seq, "{case} {dtype}: every position left out");
    let vocab = model.config.vocab_size;
    let logits = to_vec(out.logits.clone());
    let expected = &reference.get("logits").f32;
    let keep = |rows: &[f32], flips: &[bool]| -> Vec<f32> {
        rows.chunks(vocab).zip(flips).filter(|(_, f)| !**f).flat_map(|(r, _)| r.to_vec()).collect()
    };
    let (logits, expected) = (keep(&logits, &main_flips), keep(expected, &main_flips));
    assert_close(&format!("{case} {dtype} logits"), &logits, &expected, atol);
    for (i, mtp) in out.mtp_logits.into_iter().enumerate() {
        let [_, len, _] = mtp.dims();
        // MTP module k at position j reads the main model's state at j.
        let flips: Vec<bool> =
            (0..batch * len).map(|r| main_flips[(r / len) * seq + r % len]).collect();
        assert_close(
            &format!("{case} {dtype} mtp_logits.{}", i + 1),
            &keep(&to_vec(mtp), &flips),
            &keep(&reference.get(&format!("mtp_logits.{}", i + 1)).f32, &flips),
            atol,
        );
    }
    let (checked, equal) = greedy_agreement(&logits, &expected, vocab, 2.0 * atol);
    eprintln!("{case} {dtype}: greedy token equal at {equal} of {checked} clear positions");
    assert!(checked > 0, "{case}: no position with a clear reference margin");
    assert_eq!(equal, checked, "{case} {dtype}: greedy tokens where the reference is clear");

    // Cached decoding in the dtype: the cache holds it, and the steps equal the full forward.
    let mut cache = LatentCache::new(&model.config, batch, seq, device).unwrap();
    let prefill = 5;
    let first = model
        .forward_cached(input.clone().narrow(1, 0, prefill), &mut cache, AttentionPath::Naive)
        .unwrap();
    assert_eq!(cache.bytes_per_token(), model.config.kv_cache_bytes_per_token(dtype.size()));
    let mut cached = vec![first.logits];
    for pos in prefill..seq {
        let step = model
            .forward_cached(input.clone().narrow(1, pos, 1), &mut cache, AttentionPath::Absorbed)
            .unwrap();
        cached.push(step.logits);
    }
    assert_close(
        &format!("{case} {dtype} cached decode vs full forward"),
        &to_vec(Tensor::cat(cached, 1)),
        &to_vec(out.logits),
        atol,
    );
}

#[test]
fn bf16_weights_match_the_f32_reference_within_bf16_tolerance() {
    for case in CASES {
        check_case::<Flex>(case, WeightDtype::Bf16, &Default::default(), BF16_ATOL);
    }
}

#[test]
fn f16_weights_match_the_f32_reference_within_f16_tolerance() {
    for case in CASES {
        check_case::<Flex>(case, WeightDtype::F16, &Default::default(), F16_ATOL);
    }
}

#[test]
fn a_bf16_checkpoint_loads_without_rounding_twice() {
    // The golden weights cast to bf16 on disk, loaded as bf16: every weight equals the stored
    // bits (widened on the host for the transpose, then rounded back exactly).
    let case = "v3_no_qlora";
    let dir = edited_copy(case, |tensors| {
        for t in tensors.values_mut() {
            if t.dtype == safetensors::Dtype::F32 {
                let values: Vec<u8> = t
                    .bytes
                    .chunks_exact(4)
                    .flat_map(|b| {
                        half::bf16::from_f32(f32::from_le_bytes(b.try_into().unwrap()))
                            .to_le_bytes()
                    })
                    .collect();
                *t = RawTensor {
                    dtype: safetensors::Dtype::BF16,
                    shape: t.shape.clone(),
                    bytes: values,
                };
            }
        }
    });
    let device = Default::default();
    let options = LoadOptions::default().with_dtype(WeightDtype::Bf16);
    let from_bf16 = load_model::<Flex>(dir.path(), &device, options).unwrap();
    let from_f32 = load_model::<Flex>(golden_dir(case), &device, options).unwrap();
    let embed = |m: &DeepSeekModel<Flex>| to_vec(m.embed_tokens.weight.val());
    assert_eq!(embed(&from_bf16), embed(&from_f32));
    let head = |m: &DeepSeekModel<Flex>| to_vec(m.lm_head.weight());
    assert_eq!(head(&from_bf16), head(&from_f32));
}

#[test]
fn casting_a_model_in_memory_equals_loading_it_in_the_dtype() {
    let case = "v3_yarn_qlora";
    let device = Default::default();
    let f32_model = load_model::<Flex>(golden_dir(case), &device, Default::default()).unwrap();
    let cast = f32_model.cast(WeightDtype::Bf16);
    let options = LoadOptions::default().with_dtype(WeightDtype::Bf16);
    let loaded = load_model::<Flex>(golden_dir(case), &device, options).unwrap();
    // The same parameters in the same dtypes (the correction biases stay f32)...
    assert_eq!(params(&cast), params(&loaded));
    assert!(params(&cast).iter().any(|(d, _)| *d == DType::F32), "the biases stay f32");
    // ...holding the same values: the same logits, bit for bit.
    let ids = Reference::load(case).get("input_ids").clone();
    let input = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.i64, ids.shape), &device);
    let (a, b) = (to_vec(cast.forward(input.clone())), to_vec(loaded.forward(input)));
    assert_eq!(a, b);
}

#[cfg(feature = "wgpu")]
#[test]
fn half_precision_on_wgpu_is_a_clear_error() {
    use burn::backend::Wgpu;
    let device = Default::default();
    // No wgpu device computes in bf16, and f16 (advertised by drivers with shader-f16) trips a
    // fused-reduction bug of Burn 0.21 (docs/memory.md): loading says so, naming what runs.
    for (dtype, says) in [(WeightDtype::Bf16, "no bf16"), (WeightDtype::F16, "fused reductions")] {
        let err = load_model::<Wgpu>(
            golden_dir("v3_no_qlora"),
            &device,
            LoadOptions::default().with_dtype(dtype),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(says) && err.contains("--dtype f32"), "{dtype}: {err}");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn half_precision_on_cuda_matches_the_f32_reference() {
    // Runs only where a GPU is present (scripts/gpu_check.sh sets the variable).
    if std::env::var_os("DEEPSEEK_TEST_CUDA").is_none() {
        eprintln!("skipped: set DEEPSEEK_TEST_CUDA=1 on a machine with an NVIDIA GPU");
        return;
    }
    let device = Default::default();
    for case in CASES {
        for (dtype, atol) in [(WeightDtype::Bf16, BF16_ATOL), (WeightDtype::F16, F16_ATOL)] {
            check_case::<burn::backend::Cuda>(case, dtype, &device, atol.max(CUDA_TF32_ATOL));
        }
    }
}
