//! Latent-cache decoding: absorbed attention equals naive attention, cached decoding equals a
//! full forward pass, and the cache holds exactly `kv_lora_rank + qk_rope_head_dim` values per
//! token per block.

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::fp8::GemmPrecision;
use deepseek_core::{load_model, AttentionPath, DeepSeekError, LatentCache, LoadOptions};
use deepseek_tests::*;

type B = Flex;

fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn golden_ids(case: &str) -> Tensor<B, 2, Int> {
    let ids = Reference::load(case).get("input_ids").clone();
    Tensor::from_data(TensorData::new(ids.i64, ids.shape), &Default::default())
}

#[test]
fn absorbed_attention_matches_naive() {
    let device = Default::default();
    for case in CASES {
        let model = load_model::<B>(golden_dir(case), &device, LoadOptions::default()).unwrap();
        let x = model.embed_tokens.forward(golden_ids(case)); // [2, 12, d]
        for layer in &model.layers {
            let attn = &layer.self_attn;
            let x = layer.input_layernorm.forward(x.clone());
            // The last `q_len` positions attending to everything before them (from 10: two
            // query rows per sequence, the first with the last key masked).
            for start in [0, 1, 6, 10, 11] {
                let q_len = 12 - start;
                let full = GemmPrecision::Full;
                let kv = || attn.latent(x.clone(), &model.rope, 0, full);
                let q =
                    || attn.queries(x.clone().narrow(1, start, q_len), &model.rope, start, full);
                let naive = to_vec(attn.attend_naive(q(), kv(), start, full));
                let absorbed = to_vec(attn.attend_absorbed(q(), kv(), start, full));
                assert_close(&format!("{case} start {start}"), &absorbed, &naive, 1e-5);
            }
        }
    }
}

#[test]
fn cached_decode_matches_full_prefill() {
    let device = Default::default();
    for case in CASES {
        let model = load_model::<B>(golden_dir(case), &device, LoadOptions::default()).unwrap();
        let ids = golden_ids(case);
        let full = model.forward(ids.clone()); // [2, 12, V]
        let mut cache = LatentCache::new(&model.config, 2, 12, &device).unwrap();
        // Prefill 5 tokens on the naive path, then decode one token at a time on the absorbed path.
        let prefill = model
            .forward_cached(ids.clone().narrow(1, 0, 5), &mut cache, AttentionPath::Naive)
            .unwrap();
        assert_close(
            &format!("{case} prefill"),
            &to_vec(prefill.logits),
            &to_vec(full.clone().narrow(1, 0, 5)),
            1e-4,
        );
        for pos in 5..12 {
            let step = model
                .forward_cached(ids.clone().narrow(1, pos, 1), &mut cache, AttentionPath::Absorbed)
                .unwrap();
            assert_close(
                &format!("{case} decode {pos}"),
                &to_vec(step.logits),
                &to_vec(full.clone().narrow(1, pos, 1)),
                1e-4,
            );
        }
        assert_eq!(cache.len(), 12);
        // Full: one more token is a typed error and leaves the cache as it was.
        let err = model
            .forward_cached(ids.narrow(1, 0, 1), &mut cache, AttentionPath::Absorbed)
            .unwrap_err();
        assert!(matches!(err, DeepSeekError::Input(ref m) if m.contains("context full")), "{err}");
        assert_eq!(cache.len(), 12);
    }
}

#[test]
fn latent_cache_holds_kv_lora_plus_rope_values_per_token_and_block() {
    let device = Default::default();
    for case in CASES {
        let model = load_model::<B>(golden_dir(case), &device, LoadOptions::default()).unwrap();
        let cfg = &model.config;
        let cache = LatentCache::<B>::new(cfg, 1, 16, &device).unwrap();
        let f32_bytes = 4;
        assert_eq!(
            cache.bytes_per_token(),
            (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * f32_bytes * cfg.num_hidden_layers
        );
        assert_eq!(cache.bytes_per_token(), cfg.kv_cache_bytes_per_token(f32_bytes));
    }
}

#[test]
fn cache_larger_than_the_context_is_rejected() {
    let model =
        load_model::<B>(golden_dir("v3_no_qlora"), &Default::default(), LoadOptions::default())
            .unwrap();
    let too_long = model.config.max_position_embeddings + 1;
    let err = LatentCache::<B>::new(&model.config, 1, too_long, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
}
