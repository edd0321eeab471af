//! The router against a plain-Rust scalar reference (sigmoid/softmax, greedy, group-limited,
//! noaux_tc with a bias), and the sorted-dispatch MoE layer against running every expert on
//! every token with a dense gate matrix.

use burn::backend::Flex;
use burn::module::Param;
use burn::tensor::{Distribution, Tensor, TensorData};
use deepseek_core::fp8::GemmPrecision;
use deepseek_core::moe::{ExpertPath, MoeConfig, RouterConfig};
use deepseek_core::{DeepSeekConfig, ExecutionPolicy, ScoringFunc, TopkMethod};

type B = Flex;

fn vec2(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// Deterministic pseudo-random numbers (xorshift), so the test owns its inputs.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-12), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn vec(&mut self, n: usize, scale: f64, shift: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale + shift) as f32).collect()
    }
}

/// Scalar reference router for one token: returns (experts sorted ascending, their weights,
/// the decision margin: gap between the last chosen and the best unchosen candidate, and
/// between the last kept and the best dropped group).
fn reference_route(
    logits: &[f32],
    bias: Option<&[f32]>,
    c: &RouterConfig,
) -> (Vec<usize>, Vec<f32>, f64) {
    let e = logits.len();
    let scores: Vec<f64> = match c.scoring_func {
        ScoringFunc::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-(l as f64)).exp())).collect(),
        ScoringFunc::Softmax => {
            let m = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let ex: Vec<f64> = logits.iter().map(|&l| (l as f64 - m).exp()).collect();
            let s: f64 = ex.iter().sum();
            ex.iter().map(|x| x / s).collect()
        }
    };
    let mut choice: Vec<f64> =
        (0..e).map(|i| scores[i] + bias.map_or(0.0, |b| b[i] as f64)).collect();
    let mut margin = f64::INFINITY;
    if c.n_group > 1 && c.topk_method != TopkMethod::Greedy {
        let per = e / c.n_group;
        let mut groups: Vec<(f64, usize)> = (0..c.n_group)
            .map(|g| {
                let mut v: Vec<f64> = choice[g * per..(g + 1) * per].to_vec();
                v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                let s = if c.topk_method == TopkMethod::NoAuxTc { v[0] + v[1] } else { v[0] };
                (s, g)
            })
            .collect();
        groups.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        if c.topk_group < c.n_group {
            margin = margin.min(groups[c.topk_group - 1].0 - groups[c.topk_group].0);
        }
        for &(_, g) in &groups[c.topk_group..] {
            for x in &mut choice[g * per..(g + 1) * per] {
                *x = f64::NEG_INFINITY;
            }
        }
    }
    let mut order: Vec<usize> = (0..e).collect();
    order.sort_by(|&a, &b| choice[b].partial_cmp(&choice[a]).unwrap());
    if c.top_k < e && choice[order[c.top_k]].is_finite() {
        margin = margin.min(choice[order[c.top_k - 1]] - choice[order[c.top_k]]);
    }
    let mut chosen: Vec<usize> = order[..c.top_k].to_vec();
    chosen.sort();
    let mut w: Vec<f64> = chosen.iter().map(|&i| scores[i]).collect();
    if c.norm_topk_prob && c.top_k > 1 {
        let s: f64 = w.iter().sum::<f64>() + 1e-20;
        w.iter_mut().for_each(|x| *x /= s);
    }
    let w = w.iter().map(|x| (x * c.routed_scaling_factor) as f32).collect();
    (chosen, w, margin)
}

fn check_router(c: RouterConfig, bias_shift: f64, seed: u64) {
    let (t, d, e) = (64, 16, c.n_experts);
    let mut rng = Rng(seed);
    let device = Default::default();
    let mut router = c.init::<B>(&device);
    let x = rng.vec(t * d, 1.0, 0.0);
    let w = rng.vec(e * d, 0.5, 0.0);
    router.weight =
        Param::from_tensor(Tensor::from_data(TensorData::new(w.clone(), [e, d]), &device));
    let bias = router.e_score_correction_bias.as_ref().map(|_| rng.vec(e, 0.3, bias_shift));
    if let Some(b) = &bias {
        router.e_score_correction_bias =
            Some(Param::from_tensor(Tensor::from_data(TensorData::new(b.clone(), [e]), &device)));
    }
    let routing = router.forward(
        Tensor::from_data(TensorData::new(x.clone(), [t, d]), &device),
        &ExecutionPolicy::default(),
    );
    let idx: Vec<i64> = routing.indices.into_data().convert::<i64>().into_vec().unwrap();
    let weights = vec2(routing.weights);
    let mut checked = 0;
    for tok in 0..t {
        let logits: Vec<f32> = (0..e)
            .map(|j| {
                (0..d).map(|k| x[tok * d + k] as f64 * w[j * d + k] as f64).sum::<f64>() as f32
            })
            .collect();
        let (chosen, expected_w, margin) = reference_route(&logits, bias.as_deref(), &c);
        if margin < 1e-4 {
            continue; // a near-tie: f32 rounding may legitimately decide either way
        }
        checked += 1;
        let k = c.top_k;
        let mut pairs: Vec<(usize, f32)> =
            (0..k).map(|j| (idx[tok * k + j] as usize, weights[tok * k + j])).collect();
        pairs.sort_by_key(|p| p.0);
        assert_eq!(pairs.iter().map(|p| p.0).collect::<Vec<_>>(), chosen, "token {tok}: {c:?}");
        for (got, want) in pairs.iter().map(|p| p.1).zip(expected_w) {
            assert!((got - want).abs() < 1e-5, "token {tok}: weight {got} vs {want}");
        }
    }
    assert!(checked > t * 3 / 4, "only {checked} of {t} tokens had a clear decision");
}

fn router_config(
    method: TopkMethod,
    scoring: ScoringFunc,
    groups: usize,
    keep: usize,
    norm: bool,
) -> RouterConfig {
    RouterConfig::new(16, 16, 4, groups, keep, scoring, method, norm, 2.5)
}

#[test]
fn v3_noaux_tc_router_matches_scalar_reference() {
    check_router(router_config(TopkMethod::NoAuxTc, ScoringFunc::Sigmoid, 4, 2, true), 0.0, 1);
    check_router(router_config(TopkMethod::NoAuxTc, ScoringFunc::Sigmoid, 1, 1, true), 0.0, 2);
}

#[test]
fn dropped_groups_are_masked_with_negative_infinity_not_zero() {
    // All biased scores negative: a 0.0 mask would make dropped groups win.
    check_router(router_config(TopkMethod::NoAuxTc, ScoringFunc::Sigmoid, 4, 2, true), -3.0, 3);
}

#[test]
fn v2_softmax_routers_match_scalar_reference() {
    check_router(router_config(TopkMethod::Greedy, ScoringFunc::Softmax, 1, 1, false), 0.0, 4);
    check_router(
        router_config(TopkMethod::GroupLimited, ScoringFunc::Softmax, 4, 2, false),
        0.0,
        5,
    );
    check_router(router_config(TopkMethod::Greedy, ScoringFunc::Softmax, 1, 1, true), 0.0, 6);
}

#[test]
fn router_bias_changes_selection_not_gate_weights() {
    let device = Default::default();
    let c = router_config(TopkMethod::NoAuxTc, ScoringFunc::Sigmoid, 1, 1, false);
    let mut router = c.init::<B>(&device);
    let mut rng = Rng(7);
    let x = Tensor::<B, 2>::from_data(TensorData::new(rng.vec(8 * 16, 1.0, 0.0), [8, 16]), &device);
    let mut bias = vec![0.0f32; 16];
    bias[5] = 10.0; // expert 5 must be chosen for every token...
    router.e_score_correction_bias =
        Some(Param::from_tensor(Tensor::from_data(TensorData::new(bias, [16]), &device)));
    let r = router.forward(x, &ExecutionPolicy::default());
    let idx: Vec<i64> = r.indices.into_data().convert::<i64>().into_vec().unwrap();
    let w = vec2(r.weights);
    let scores = vec2(r.scores);
    for tok in 0..8 {
        let j = (0..4).find(|&j| idx[tok * 4 + j] == 5).expect("expert 5 chosen");
        // ...with its unbiased score as weight (times the scaling factor, no normalization).
        assert!((w[tok * 4 + j] - 2.5 * scores[tok * 16 + 5]).abs() < 1e-6);
    }
}

#[test]
fn sorted_dispatch_moe_equals_every_expert_on_every_token() {
    let device = Default::default();
    let mut cfg = DeepSeekConfig::tiny();
    cfg.num_experts_per_tok = 1; // with 3 tokens and 8 experts most experts receive nothing
    cfg.n_group = 1;
    cfg.topk_group = 1;
    for (tokens, k) in [(3, 1), (40, 2)] {
        cfg.num_experts_per_tok = k;
        let moe = MoeConfig::from_model(&cfg).init::<B>(&device);
        let x = Tensor::<B, 3>::random(
            [1, tokens, cfg.hidden_size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let (y, routing) = moe.forward(x.clone(), &ExecutionPolicy::default());
        let flat = x.reshape([tokens, cfg.hidden_size]);
        // Dense reference: gate matrix [T, E] with the chosen weights, zeros elsewhere.
        let idx: Vec<i64> = routing.indices.into_data().convert::<i64>().into_vec().unwrap();
        let w = vec2(routing.weights);
        let mut expected =
            moe.shared_experts.as_ref().unwrap().forward(flat.clone(), GemmPrecision::Full);
        let (d, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        for e in 0..cfg.n_routed_experts {
            let gate: Vec<f32> = (0..tokens)
                .map(|t| (0..k).filter(|&j| idx[t * k + j] == e as i64).map(|j| w[t * k + j]).sum())
                .collect();
            let gate = Tensor::<B, 2>::from_data(TensorData::new(gate, [tokens, 1]), &device);
            let gate_proj =
                moe.experts.gate_up.weight().narrow(0, e, 1).reshape([d, 2 * i]).narrow(1, 0, i);
            let up_proj =
                moe.experts.gate_up.weight().narrow(0, e, 1).reshape([d, 2 * i]).narrow(1, i, i);
            let down_proj = moe.experts.down.weight().narrow(0, e, 1).reshape([i, d]);
            let swiglu = burn::tensor::activation::silu(flat.clone().matmul(gate_proj))
                * flat.clone().matmul(up_proj);
            expected = expected + swiglu.matmul(down_proj) * gate;
        }
        let got = vec2(y.reshape([tokens, cfg.hidden_size]));
        let want = vec2(expected);
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-5, "T={tokens} K={k}: max diff {diff}");
        let counts: Vec<i64> = routing.counts.into_data().convert::<i64>().into_vec().unwrap();
        assert_eq!(counts.iter().sum::<i64>(), (tokens * k) as i64);
        if tokens == 3 {
            assert!(
                counts.iter().filter(|&&c| c == 0).count() >= 5,
                "idle experts exercised: {counts:?}"
            );
        }
    }
}

#[test]
fn grouped_and_per_expert_paths_agree() {
    let device = Default::default();
    let cfg = DeepSeekConfig::tiny();
    let moe = MoeConfig::from_model(&cfg).init::<B>(&device);
    for tokens in [1, 5, 64] {
        let x = Tensor::<B, 2>::random(
            [tokens, cfg.hidden_size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let routing = moe.gate.forward(x.clone(), &ExecutionPolicy::default());
        let run = |path| {
            let policy = ExecutionPolicy::default().with_expert_path(path);
            vec2(moe.experts.forward(
                x.clone(),
                routing.indices.clone(),
                routing.weights.clone(),
                &policy,
            ))
        };
        let (grouped, per_expert) = (run(ExpertPath::Grouped), run(ExpertPath::PerExpert));
        let diff = grouped.iter().zip(&per_expert).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-5, "T={tokens}: {diff}");
    }
}
