//! MTP speculative decoding gives exactly the greedy output, and the MTP module run over its own
//! cache reproduces the MTP logits of transformers' reference.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::{load_model, AttentionPath, LatentCache, LoadOptions};
use deepseek_infer::generate::{generate, Decoding, GenerateConfig};
use deepseek_infer::speculative::{speculative, speculative_greedy, speculative_streaming};
use safetensors::SafeTensors;

type B = Flex;

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(case)
}

fn reference(case: &str, name: &str) -> (Vec<u8>, Vec<usize>) {
    let bytes = std::fs::read(golden(case).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.data().to_vec(), t.shape().to_vec())
}

fn prompts(case: &str) -> Vec<Vec<i64>> {
    let (bytes, _) = reference(case, "input_ids");
    let ids: Vec<i64> =
        bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    ids.chunks(12).map(<[i64]>::to_vec).collect()
}

#[test]
fn speculative_decode_equals_greedy_decode() {
    let device = Default::default();
    for case in ["v3_yarn_qlora", "v5_style"] {
        let model = load_model::<B>(golden(case), &device, LoadOptions::default()).unwrap();
        for prompt in prompts(case) {
            for max_new in [1, 2, 7, 20] {
                let cfg = GenerateConfig {
                    max_new_tokens: max_new,
                    decoding: Decoding::Greedy,
                    eos_token_id: None,
                    stop_sequences: vec![],
                };
                let greedy = generate(&model, std::slice::from_ref(&prompt), &cfg, &device)
                    .unwrap()
                    .remove(0);
                let spec = speculative_greedy(&model, &prompt, max_new, None, &device).unwrap();
                assert_eq!(spec.tokens, greedy, "{case} max_new {max_new}");
                assert!(
                    spec.main_steps <= max_new,
                    "{case}: {} main steps for {max_new} tokens",
                    spec.main_steps
                );
            }
        }
    }
}

#[test]
fn mtp_over_its_cache_matches_the_reference_mtp_logits() {
    let device = Default::default();
    let case = "v3_yarn_qlora";
    let model = load_model::<B>(golden(case), &device, LoadOptions::default()).unwrap();
    let flat: Vec<i64> = prompts(case).concat();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [2, 12]), &device);
    let mut cache = LatentCache::new(&model.config, 2, 12, &device).unwrap();
    let hidden =
        model.forward_cached(ids.clone(), &mut cache, AttentionPath::Naive).unwrap().final_hidden;
    // Module 1 at positions 0..11 reads h_i and the token at i + 1; fed in two chunks.
    let mut mtp_cache = LatentCache::for_mtp(&model.config, 2, 11, &device).unwrap();
    let first = model
        .forward_mtp_cached(
            1,
            hidden.clone().narrow(1, 0, 4),
            ids.clone().narrow(1, 1, 4),
            &mut mtp_cache,
        )
        .unwrap();
    let rest = model
        .forward_mtp_cached(1, hidden.narrow(1, 4, 7), ids.narrow(1, 5, 7), &mut mtp_cache)
        .unwrap();
    let got: Vec<f32> = Tensor::cat(vec![first.logits, rest.logits], 1)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let (bytes, shape) = reference(case, "mtp_logits.1");
    assert_eq!(shape, vec![2, 11, 256]);
    let want: Vec<f32> =
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff < 1e-4, "max |diff| {diff:e}");
}

#[test]
fn speculative_without_mtp_weights_is_a_clear_error() {
    let device = Default::default();
    let model = load_model::<B>(golden("v3_no_qlora"), &device, LoadOptions::default()).unwrap();
    let err = speculative_greedy(&model, &[1, 2, 3], 4, None, &device).unwrap_err();
    assert!(err.to_string().contains("MTP"), "{err}");
}

#[test]
fn speculative_sampling_is_seeded_and_respects_the_token_budget() {
    use deepseek_infer::speculative::speculative;
    let device = Default::default();
    let model = load_model::<B>(golden("v5_style"), &device, LoadOptions::default()).unwrap();
    let prompt = prompts("v5_style").remove(0);
    let decoding =
        Decoding::Sample { temperature: 0.8, top_k: Some(50), top_p: Some(0.95), seed: 7 };
    let a = speculative(&model, &prompt, 15, None, decoding, &device).unwrap();
    let b = speculative(&model, &prompt, 15, None, decoding, &device).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens.len(), 15);
    assert!(a.tokens.iter().all(|&t| (0..256).contains(&t)));
}

#[test]
fn speculative_decoding_checks_the_sampling_settings_as_generate_does() {
    let device = Default::default();
    let model = load_model::<B>(golden("v3_yarn_qlora"), &device, LoadOptions::default()).unwrap();
    let prompt = &prompts("v3_yarn_qlora")[0];
    let bad = [
        (Decoding::Sample { temperature: -0.5, top_k: None, top_p: None, seed: 0 }, "temperature"),
        (Decoding::Sample { temperature: 0.8, top_k: None, top_p: Some(2.0), seed: 0 }, "top_p"),
        (Decoding::Sample { temperature: 0.8, top_k: Some(0), top_p: None, seed: 0 }, "top_k"),
    ];
    for (decoding, field) in bad {
        let cfg = GenerateConfig {
            max_new_tokens: 3,
            decoding,
            eos_token_id: None,
            stop_sequences: vec![],
        };
        let plain =
            generate(&model, std::slice::from_ref(prompt), &cfg, &device).unwrap_err().to_string();
        let spec = speculative(&model, prompt, 3, None, decoding, &device).unwrap_err().to_string();
        assert!(plain.contains(field), "{plain}");
        assert_eq!(spec, plain, "one validation for both decoders");
    }
}

#[test]
fn streamed_speculative_tokens_are_the_output_and_the_callback_can_stop_it() {
    let device = Default::default();
    let model = load_model::<B>(golden("v5_style"), &device, LoadOptions::default()).unwrap();
    let prompt = prompts("v5_style").remove(0);
    let full = speculative_greedy(&model, &prompt, 20, None, &device).unwrap();
    let mut seen = Vec::new();
    let out =
        speculative_streaming(&model, &prompt, 20, None, Decoding::Greedy, &device, &mut |t| {
            seen.push(t);
            Ok(true)
        })
        .unwrap();
    assert_eq!((&seen, &out.tokens), (&full.tokens, &full.tokens));
    // Stopping after 7 tokens keeps exactly those 7 (the 7th included), called no further.
    let mut calls = 0;
    let cut =
        speculative_streaming(&model, &prompt, 20, None, Decoding::Greedy, &device, &mut |_| {
            calls += 1;
            Ok(calls < 7)
        })
        .unwrap();
    assert_eq!((calls, &cut.tokens[..]), (7, &full.tokens[..7]));
    // An EOS taken from the output ends it there, EOS included.
    let eos = full.tokens[5];
    let first = full.tokens.iter().position(|&t| t == eos).unwrap();
    let stopped = speculative_greedy(&model, &prompt, 20, Some(eos), &device).unwrap();
    assert_eq!(stopped.tokens, full.tokens[..=first]);
}
