//! Continuous batching: every sequence's greedy output is exactly what it generates alone
//! (`generate`, one sequence over its own cache), whatever runs beside it: different prompt
//! lengths, budgets and stop conditions, sequences joining late and finishing early. The batched
//! step's logits match the single-sequence step's within f32 rounding.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use deepseek_core::{load_model, AttentionPath, LatentCache, LoadOptions, SlotCache};
use deepseek_infer::engine::{generate_all, generate_traced, Engine, Finish, Request};
use deepseek_infer::generate::{generate, Decoding, GenerateConfig};
use safetensors::SafeTensors;

type B = Flex;

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(case)
}

/// Prompts of lengths 1..=12 cut from the golden inputs.
fn prompts(case: &str) -> Vec<Vec<i64>> {
    let bytes = std::fs::read(golden(case).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<i64> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let rows: Vec<&[i64]> = ids.chunks(12).collect();
    [12, 3, 7, 1, 10, 5, 9, 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| rows[i % rows.len()][..n].to_vec())
        .collect()
}

fn alone<G: burn::tensor::backend::Backend>(
    model: &deepseek_core::DeepSeekModel<G>,
    r: &Request,
) -> Vec<i64> {
    let cfg = GenerateConfig {
        max_new_tokens: r.max_new_tokens,
        decoding: r.decoding,
        eos_token_id: r.stop_tokens.first().copied(),
        stop_sequences: r.stop_sequences.clone(),
    };
    let device = model.embed_tokens.weight.device();
    generate(model, std::slice::from_ref(&r.prompt), &cfg, &device).unwrap().remove(0)
}

#[test]
fn batched_greedy_output_equals_each_sequence_alone() {
    batched_equals_alone::<B>(&Default::default(), LoadOptions::default());
}

/// The same with the weights, the activations and the paged cache in bf16.
#[test]
fn batched_greedy_output_equals_each_sequence_alone_in_bf16() {
    let options = LoadOptions::default().with_dtype(deepseek_core::WeightDtype::Bf16);
    batched_equals_alone::<B>(&Default::default(), options);
}

/// The same on wgpu (CI: Mesa lavapipe): the paged cache and the ragged masks on a GPU backend.
#[cfg(feature = "wgpu")]
#[test]
fn batched_greedy_output_equals_each_sequence_alone_on_wgpu() {
    batched_equals_alone::<burn::backend::Wgpu>(&Default::default(), LoadOptions::default());
}

fn batched_equals_alone<G: burn::tensor::backend::Backend>(
    device: &G::Device,
    options: LoadOptions,
) {
    for case in ["v3_yarn_qlora", "v5_style"] {
        let model = load_model::<G>(golden(case), device, options).unwrap();
        let budgets = [20, 6, 14, 1, 9, 17, 3, 11];
        let mut requests: Vec<Request> = prompts(case)
            .into_iter()
            .zip(budgets)
            .map(|(prompt, max_new_tokens)| Request {
                prompt,
                max_new_tokens,
                decoding: Decoding::Greedy,
                stop_tokens: vec![],
                stop_sequences: vec![],
            })
            .collect();
        // Two requests stop early: one on a token, one on a two-token sequence, both taken from
        // what they generate alone.
        let free = alone(&model, &requests[0]);
        requests[0].stop_tokens = vec![free[4]];
        let free = alone(&model, &requests[5]);
        requests[5].stop_sequences = vec![free[6..8].to_vec()];
        let expected: Vec<Vec<i64>> = requests.iter().map(|r| alone(&model, r)).collect();
        assert!(expected[0].len() <= 5 && expected[5].len() <= 8, "{case}: the stops bite");

        for max_batch in [1, 3, 8] {
            let mut order = Vec::new();
            let got = generate_all(&model, requests.clone(), max_batch, device, &mut |i, _| {
                order.push(i);
                Ok(true)
            })
            .unwrap();
            for (i, (g, want)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(&g.tokens, want, "{case}, batch {max_batch}, request {i}");
                let stopped = requests[i].stop_tokens.iter().any(|t| want.last() == Some(t))
                    || requests[i].stop_sequences.iter().any(|s| want.ends_with(s));
                let finish = if stopped { Finish::Stop } else { Finish::Length };
                assert_eq!(g.finish, Some(finish), "{case}, batch {max_batch}, request {i}");
            }
            if max_batch > 1 {
                // Tokens of different requests interleave: they really ran together.
                assert!(order.windows(2).any(|w| w[0] > w[1]), "{case}: {order:?}");
            }
        }
    }
}

/// Requests with one prompt (the samples of a GRPO group, the answers of distillation) share its
/// prefill: their outputs and traces equal those of the same requests run one at a time.
#[test]
fn samples_of_one_prompt_share_the_prefill_and_generate_what_they_generate_alone() {
    let device = Default::default();
    let model = load_model::<B>(golden("v3_yarn_qlora"), &device, LoadOptions::default()).unwrap();
    let ps = prompts("v3_yarn_qlora");
    let mut requests = Vec::new();
    for (p, prompt) in [&ps[0], &ps[2], &ps[3]].into_iter().enumerate() {
        for g in 0..4u64 {
            let decoding = match g {
                0 => Decoding::Greedy,
                _ => Decoding::Sample {
                    temperature: 1.0,
                    top_k: None,
                    top_p: None,
                    seed: 10 * p as u64 + g,
                },
            };
            requests.push(Request {
                prompt: prompt.clone(),
                max_new_tokens: 3 + g as usize,
                decoding,
                stop_tokens: vec![],
                stop_sequences: vec![],
            });
        }
    }
    let one_at_a_time =
        generate_traced(&model, requests.clone(), 1, &device, &mut |_, _| Ok(true)).unwrap();
    let shared =
        generate_traced(&model, requests.clone(), 6, &device, &mut |_, _| Ok(true)).unwrap();
    for (i, (a, b)) in one_at_a_time.iter().zip(&shared).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}");
        assert_eq!(a.tokens.len(), requests[i].max_new_tokens);
        let (ta, tb) = (a.trace.as_ref().unwrap(), b.trace.as_ref().unwrap());
        assert_eq!(ta.experts, tb.experts, "request {i}");
        let k = model.config.num_experts_per_tok;
        assert_eq!(ta.experts[0].len(), (requests[i].prompt.len() + a.tokens.len() - 1) * k);
        for (x, y) in ta.logprobs.iter().zip(&tb.logprobs) {
            assert!((x - y).abs() < 1e-5, "request {i}: {x} vs {y}");
        }
    }
    // Without traces the same tokens come back.
    let plain = generate_all(&model, requests, 6, &device, &mut |_, _| Ok(true)).unwrap();
    assert!(plain.iter().zip(&shared).all(|(a, b)| a.tokens == b.tokens && a.trace.is_none()));
}

#[test]
fn a_batched_step_computes_each_rows_single_sequence_logits() {
    step_logits::<B>(&Default::default(), 1e-5);
}

#[cfg(feature = "wgpu")]
#[test]
fn a_batched_step_computes_each_rows_single_sequence_logits_on_wgpu() {
    step_logits::<burn::backend::Wgpu>(&Default::default(), 1e-4);
}

fn step_logits<B: burn::tensor::backend::Backend>(device: &B::Device, tol: f32) {
    let device = device.clone();
    let model = load_model::<B>(golden("v3_yarn_qlora"), &device, LoadOptions::default()).unwrap();
    let prompts = prompts("v3_yarn_qlora");
    let ids = |p: &[i64]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(p.to_vec(), [1, p.len()]), &device)
    };
    let mut slots = SlotCache::new(&model.config, 4, 16, &device).unwrap();
    let mut alone = Vec::new();
    for p in &prompts[..4] {
        let (_, out) = model.prefill_slot(ids(p), &mut slots).unwrap();
        let mut cache = LatentCache::new(&model.config, 1, 16, &device).unwrap();
        let reference = model.forward_cached(ids(p), &mut cache, AttentionPath::Naive).unwrap();
        let diff: f32 = (out.logits - reference.logits).abs().max().into_scalar().elem();
        assert!(diff < tol, "prefill: {diff}");
        alone.push(cache);
    }
    // Rows at positions 12, 3, 7 and 1 take one step together.
    let next = [5i64, 17, 2, 30];
    let step = Tensor::<B, 2, Int>::from_data(TensorData::new(next.to_vec(), [4, 1]), &device);
    let batched = model.decode_slots(step, &mut slots).unwrap().logits; // [4, 1, vocab]
    assert_eq!(slots.lens(), &[13, 4, 8, 2]);
    for (row, cache) in alone.iter_mut().enumerate() {
        let one = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![next[row]], [1, 1]), &device);
        let reference = model.forward_cached(one, cache, AttentionPath::Absorbed).unwrap().logits;
        let diff: f32 =
            (batched.clone().narrow(0, row, 1) - reference).abs().max().into_scalar().elem();
        assert!(diff < tol, "row {row}: {diff}");
    }
}

#[test]
fn a_cancelled_sequence_frees_its_slot_and_the_others_go_on() {
    let device = Default::default();
    let model = load_model::<B>(golden("v5_style"), &device, LoadOptions::default()).unwrap();
    let request = |prompt: Vec<i64>| Request {
        prompt,
        max_new_tokens: 12,
        decoding: Decoding::Greedy,
        stop_tokens: vec![],
        stop_sequences: vec![],
    };
    let prompts = prompts("v5_style");
    let expected = alone(&model, &request(prompts[2].clone()));
    let mut engine = Engine::new(&model, 2, 32, &device).unwrap();
    let (a, _) = engine.add(request(prompts[0].clone())).unwrap();
    let (b, first) = engine.add(request(prompts[2].clone())).unwrap();
    assert!(!engine.has_room());
    let mut got = vec![first.unwrap().token];
    for _ in 0..3 {
        got.extend(engine.step().unwrap().iter().filter(|e| e.id == b).map(|e| e.token));
    }
    // Cancelling the sequence in row 0 moves the other one into its slot.
    assert!(engine.cancel(a));
    assert!(!engine.cancel(a));
    assert_eq!(engine.active(), 1);
    assert!(engine.has_room());
    // A newcomer joins in the freed slot; the moved sequence continues exactly.
    let (_, _) = engine.add(request(prompts[4].clone())).unwrap();
    while engine.active() > 0 {
        got.extend(engine.step().unwrap().iter().filter(|e| e.id == b).map(|e| e.token));
    }
    assert_eq!(got, expected);
}

#[test]
fn bad_requests_are_errors_before_anything_runs() {
    let device = Default::default();
    let model = load_model::<B>(golden("v5_style"), &device, LoadOptions::default()).unwrap();
    let mut engine = Engine::new(&model, 2, 16, &device).unwrap();
    let vocab = model.config.vocab_size as i64;
    let request = |prompt: Vec<i64>, max_new_tokens| Request {
        prompt,
        max_new_tokens,
        decoding: Decoding::Greedy,
        stop_tokens: vec![],
        stop_sequences: vec![],
    };
    for (r, needle) in [
        (request(vec![], 4), "empty prompt"),
        (request(vec![1, vocab], 4), "outside the vocabulary"),
        (request(vec![1; 10], 7), "exceed the context of 16"),
    ] {
        let err = engine.add(r).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    let hot = Decoding::Sample { temperature: -1.0, top_k: None, top_p: None, seed: 0 };
    assert!(engine.add(Request { decoding: hot, ..request(vec![1], 2) }).is_err());
    assert_eq!(engine.active(), 0);
    let context = model.config.max_position_embeddings;
    let too_long = vec![request(vec![1], 1), request(vec![1; context], 1)];
    assert!(generate_all(&model, too_long, 2, &device, &mut |_, _| Ok(true))
        .unwrap_err()
        .to_string()
        .contains("request 1"));
}
