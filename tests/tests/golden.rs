//! The model against Hugging Face transformers on the golden cases (see `tests/golden/README.md`):
//! logits, the residual stream after every block, routing decisions and gate weights, MTP
//! logits, RoPE tables and the softmax scale.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::rope::RotaryEmbedding;
use deepseek_core::{load_model, DeepSeekConfig, ForwardOptions, LoadOptions};
use deepseek_tests::*;

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// Runs one golden case on backend `B` and compares everything the reference holds.
fn check_case<B: Backend>(case: &str, device: &B::Device, atol: f32) {
    let reference = Reference::load(case);
    let model = load_model::<B>(golden_dir(case), device, LoadOptions::default()).unwrap();
    let ids = reference.get("input_ids");
    let input =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.i64.clone(), ids.shape.clone()), device);
    let out = model.forward_with(input, ForwardOptions { hidden_states: true, mtp: true });

    assert_close(
        &format!("{case} logits"),
        &to_vec(out.logits),
        &reference.get("logits").f32,
        atol,
    );
    assert_close(
        &format!("{case} final hidden"),
        &to_vec(out.final_hidden),
        &reference.get("final_hidden").f32,
        atol,
    );
    for (l, h) in out.hidden_states.into_iter().enumerate() {
        assert_close(
            &format!("{case} hidden.{l}"),
            &to_vec(h),
            &reference.get(&format!("hidden.{l}")).f32,
            atol,
        );
    }

    let cfg = &model.config;
    let k = cfg.num_experts_per_tok;
    // Router outputs pass through few ops: tighter on the CPU, the GPU tolerance elsewhere.
    let router_atol = if atol <= F32_ATOL { ROUTER_ATOL } else { atol };
    let moe_layers: Vec<usize> = (0..cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
        .filter(|&l| cfg.is_moe_layer(l))
        .collect();
    assert_eq!(out.routing.len(), moe_layers.len(), "{case}: one routing per MoE block");
    for (routing, l) in out.routing.into_iter().zip(moe_layers) {
        let idx: Vec<i64> = routing.indices.into_data().convert::<i64>().into_vec().unwrap();
        let (idx, w) = sort_rows(&idx, &to_vec(routing.weights), k);
        assert_eq!(
            idx,
            reference.get(&format!("router.{l}.topk_idx")).i64,
            "{case}: experts chosen in block {l}"
        );
        assert_close(
            &format!("{case} gate weights {l}"),
            &w,
            &reference.get(&format!("router.{l}.topk_weight")).f32,
            router_atol,
        );
        assert_close(
            &format!("{case} scores {l}"),
            &to_vec(routing.scores),
            &reference.get(&format!("router.{l}.scores")).f32,
            router_atol,
        );
        let counts: Vec<i64> = routing.counts.into_data().convert::<i64>().into_vec().unwrap();
        let mut expected = vec![0i64; cfg.n_routed_experts];
        for &e in &idx {
            expected[e as usize] += 1;
        }
        assert_eq!(counts, expected, "{case}: per-expert token counts in block {l}");
    }

    assert_eq!(
        out.mtp_logits.len(),
        cfg.num_nextn_predict_layers,
        "{case}: one MTP output per module"
    );
    for (i, logits) in out.mtp_logits.into_iter().enumerate() {
        assert_close(
            &format!("{case} mtp_logits.{}", i + 1),
            &to_vec(logits),
            &reference.get(&format!("mtp_logits.{}", i + 1)).f32,
            atol,
        );
    }
}

#[test]
fn golden_v3_yarn_qlora_matches_transformers() {
    check_case::<Flex>("v3_yarn_qlora", &Default::default(), F32_ATOL);
}

#[test]
fn golden_v3_no_qlora_matches_transformers() {
    check_case::<Flex>("v3_no_qlora", &Default::default(), F32_ATOL);
}

#[test]
fn golden_v5_style_config_matches_transformers() {
    check_case::<Flex>("v5_style", &Default::default(), F32_ATOL);
}

#[cfg(feature = "wgpu")]
#[test]
fn golden_cases_match_transformers_on_wgpu() {
    for case in CASES {
        check_case::<burn::backend::Wgpu>(case, &Default::default(), GPU_ATOL);
    }
}

#[cfg(feature = "cuda")]
#[test]
fn golden_cases_match_transformers_on_cuda() {
    // Runs only where a GPU is present: the CUDA backend panics when its device is created
    // without one.
    if std::env::var_os("DEEPSEEK_TEST_CUDA").is_none() {
        eprintln!("skipped: set DEEPSEEK_TEST_CUDA=1 on a machine with an NVIDIA GPU");
        return;
    }
    for case in CASES {
        check_case::<burn::backend::Cuda>(case, &Default::default(), CUDA_TF32_ATOL);
    }
}

#[test]
fn rope_tables_and_softmax_scale_match_transformers() {
    for case in CASES {
        let reference = Reference::load(case);
        let cfg = DeepSeekConfig::from_hf_file(golden_dir(case)).unwrap();
        let scale = reference.get("attn.scaling").f32[0];
        assert!(
            (cfg.softmax_scale() as f32 - scale).abs() < 1e-6,
            "{case}: scale {} vs {scale}",
            cfg.softmax_scale()
        );

        // transformers lays cos/sin out as [seq, r] with column j and j + r/2 both belonging to
        // pair j; ours are [seq, r/2].
        let rope = RotaryEmbedding::new(&cfg.rope, cfg.qk_rope_head_dim);
        let (cos, sin) = rope.tables::<Flex>(0, 12, &Default::default());
        let half = cfg.qk_rope_head_dim / 2;
        for (name, ours) in [("rope.cos", cos), ("rope.sin", sin)] {
            let r = reference.get(name);
            let theirs: Vec<f32> =
                r.f32.chunks(2 * half).flat_map(|row| row[..half].to_vec()).collect();
            assert_close(&format!("{case} {name}"), &to_vec(ours), &theirs, 1e-6);
        }
    }
}
