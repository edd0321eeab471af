//! LoRA adapters against Hugging Face PEFT (`tests/golden/peft/generate_peft.py`): PEFT-made
//! adapters applied here give PEFT's logits, an adapter trained by `deepseek-train sft` gives in
//! PEFT the logits it gives here, merging equals the unmerged adapter, the absorbed decode path
//! sees the adapter, and adapters that do not fit are typed errors.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::adapter::{load_adapter, save_adapter, AdapterConfig};
use deepseek_core::{
    load_model, AttentionPath, DeepSeekModel, LatentCache, LoadOptions, LoraSettings, LoraTargets,
};
use deepseek_tests::{assert_close, golden_dir, max_abs_diff, F32_ATOL};
use safetensors::SafeTensors;

type B = Flex;

fn peft_dir(name: &str) -> PathBuf {
    golden_dir("peft").join(name)
}

/// `(input_ids, logits, merged_logits)` written by PEFT.
fn peft_logits(name: &str) -> (Vec<i64>, [usize; 2], Vec<f32>, Option<Vec<f32>>) {
    let bytes = std::fs::read(peft_dir(name).join("peft_logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| {
        st.tensor(n).ok().map(|t| {
            t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        })
    };
    let ids = st.tensor("input_ids").unwrap();
    let shape = [ids.shape()[0], ids.shape()[1]];
    let ids =
        ids.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    (ids, shape, f32s("logits").unwrap(), f32s("merged_logits"))
}

fn base(case: &str) -> DeepSeekModel<B> {
    load_model::<B>(golden_dir(case), &Default::default(), LoadOptions::default()).unwrap()
}

fn logits(model: &DeepSeekModel<B>, ids: &[i64], shape: [usize; 2]) -> Vec<f32> {
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), shape), &Default::default());
    model.forward(ids).into_data().convert::<f32>().into_vec().unwrap()
}

#[test]
fn peft_made_adapters_give_peft_logits() {
    for (name, case) in [("plain", "v3_yarn_qlora"), ("rslora", "v3_no_qlora")] {
        let (ids, shape, expected, merged_expected) = peft_logits(name);
        let plain = logits(&base(case), &ids, shape);
        // The adapter matters: a loader that ignored it could not pass.
        assert!(max_abs_diff(&plain, &expected) > 0.5, "{name}: the adapter must change logits");
        let adapted = load_adapter(base(case), &peft_dir(name)).unwrap();
        assert_close(
            &format!("{name}: --adapter logits vs PEFT"),
            &logits(&adapted, &ids, shape),
            &expected,
            F32_ATOL,
        );
        let merged = adapted.merge_adapters();
        assert_close(
            &format!("{name}: merged vs PEFT"),
            &logits(&merged, &ids, shape),
            &expected,
            F32_ATOL,
        );
        assert_close(
            &format!("{name}: merged vs PEFT merged"),
            &logits(&merged, &ids, shape),
            &merged_expected.unwrap(),
            F32_ATOL,
        );
    }
}

#[test]
fn an_adapter_trained_here_gives_in_peft_the_logits_it_gives_here() {
    let (ids, shape, expected, _) = peft_logits("sft_trained");
    let adapted = load_adapter(base("v3_yarn_qlora"), &peft_dir("sft_trained")).unwrap();
    let ours = logits(&adapted, &ids, shape);
    assert!(max_abs_diff(&logits(&base("v3_yarn_qlora"), &ids, shape), &ours) > 0.1);
    assert_close("sft-trained adapter: ours vs PEFT", &ours, &expected, F32_ATOL);
}

#[test]
fn saved_adapters_load_back_and_name_peft_keys() {
    let targets = LoraTargets::parse("attn+mlp").unwrap();
    let settings = LoraSettings { rank: 3, alpha: 5.0, rslora: true, dropout: 0.0, expert_rank: 2 };
    let mut model = base("v3_yarn_qlora").with_lora(&targets, &settings).unwrap();
    // Non-zero B so the adapter is not a no-op.
    deepseek_core::finetune::for_each_adaptable(&mut model, |_, p| {
        if let Some(lora) = p.lora.as_mut() {
            let b = Tensor::random(
                lora.b.dims(),
                burn::tensor::Distribution::Normal(0.0, 0.5),
                &Default::default(),
            );
            lora.b = burn::module::Param::from_tensor(b);
        }
        Ok(())
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, dir.path(), &AdapterConfig::new(&settings, &targets, None)).unwrap();
    let (ids, shape, _, _) = peft_logits("plain");
    let before = logits(&model, &ids, shape);
    let reloaded = load_adapter(base("v3_yarn_qlora"), dir.path()).unwrap();
    assert!(max_abs_diff(&before, &logits(&base("v3_yarn_qlora"), &ids, shape)) > 0.1);
    assert_close("saved and reloaded adapter", &logits(&reloaded, &ids, shape), &before, 1e-5);
    let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let names = SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert!(
        names.contains(
            &"base_model.model.model.layers.0.self_attn.kv_b_proj.lora_A.weight".to_string()
        ),
        "{names:?}"
    );
    assert!(
        names.contains(
            &"base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_B.weight".to_string()
        ),
        "{names:?}"
    );
}

#[test]
fn absorbed_decoding_sees_the_adapter() {
    let model = load_adapter(base("v3_yarn_qlora"), &peft_dir("plain")).unwrap();
    let (ids, shape, expected, _) = peft_logits("plain");
    let device = Default::default();
    let vocab = model.config.vocab_size;
    let ids_t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), shape), &device);
    let [batch, seq] = shape;
    // Prefill all but the last token naively, then decode it with the absorbed path.
    let mut cache = LatentCache::new(&model.config, batch, seq, &device).unwrap();
    model
        .forward_cached(ids_t.clone().narrow(1, 0, seq - 1), &mut cache, AttentionPath::Naive)
        .unwrap();
    let last = model
        .forward_cached(ids_t.narrow(1, seq - 1, 1), &mut cache, AttentionPath::Absorbed)
        .unwrap();
    let got: Vec<f32> = last.logits.into_data().convert::<f32>().into_vec().unwrap();
    let want: Vec<f32> = (0..batch)
        .flat_map(|b| expected[(b * seq + seq - 1) * vocab..(b * seq + seq) * vocab].to_vec())
        .collect();
    assert_close("absorbed decode with an adapter vs PEFT", &got, &want, F32_ATOL);
}

#[test]
fn adapters_that_do_not_fit_are_errors_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(peft_dir("plain").join(f), dir.join(f)).unwrap();
        }
        dir
    };
    let err = |dir: &std::path::Path, case: &str| {
        load_adapter(base(case), dir).err().unwrap().to_string()
    };
    // Shapes of another model: the q-LoRA adapter on the q_proj model.
    let e = err(&copy("other"), "v3_no_qlora");
    assert!(e.contains("another model"), "{e}");
    // DoRA, a foreign target module, a zero rank, another PEFT type.
    for (field, value, expect) in [
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("target_modules", serde_json::json!(["q_proj", "k_proj"]), "k_proj"),
        ("r", serde_json::json!(0), "rank"),
        ("peft_type", serde_json::json!("IA3"), "LORA"),
        ("modules_to_save", serde_json::json!(["lm_head"]), "modules_to_save"),
    ] {
        let dir = copy(field);
        let path = dir.join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[field] = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let e = err(&dir, "v3_yarn_qlora");
        assert!(e.contains(expect), "{field}: {e}");
    }
    // A missing directory.
    let e = err(&tmp.path().join("absent"), "v3_yarn_qlora");
    assert!(e.contains("adapter_config.json"), "{e}");
    // LoRA settings and targets.
    assert!(LoraTargets::parse("q_a_proj,wq").unwrap_err().to_string().contains("wq"));
    let zero = LoraSettings { rank: 0, ..Default::default() };
    let e =
        base("v3_yarn_qlora").with_lora(&LoraTargets::parse("attn").unwrap(), &zero).err().unwrap();
    assert!(e.to_string().contains("at least 1"), "{e}");
}

fn f32s(t: &deepseek_tests::RawTensor) -> Vec<f32> {
    t.bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Adapters on every routed expert (`--lora-targets all`): the adapted model equals a plain
/// checkpoint whose expert weights were edited by PEFT's merge rule `W += s·B·A` (host
/// arithmetic on the saved per-expert tensors), on the per-expert and grouped paths, reloaded
/// and merged.
#[test]
fn routed_expert_adapters_equal_their_merged_checkpoint() {
    use deepseek_core::moe::ExpertPath;
    let targets = LoraTargets::parse("all").unwrap();
    assert!(targets.experts());
    let settings =
        LoraSettings { rank: 2, alpha: 3.0, rslora: false, dropout: 0.0, expert_rank: 3 };
    let mut model = base("v3_yarn_qlora").with_lora(&targets, &settings).unwrap();
    let device = Default::default();
    let random = |dims: [usize; 3]| {
        burn::module::Param::from_tensor(Tensor::<B, 3>::random(
            dims,
            burn::tensor::Distribution::Normal(0.0, 0.5),
            &device,
        ))
    };
    deepseek_core::finetune::for_each_routed_experts(&mut model, |_, routed| {
        for p in [&mut routed.gate_up, &mut routed.down] {
            let lora = p.lora.as_mut().unwrap();
            lora.b = random(lora.b.dims());
        }
        Ok(())
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, dir.path(), &AdapterConfig::new(&settings, &targets, None)).unwrap();
    let (ids, shape, _, _) = peft_logits("plain");
    let adapted = logits(&model, &ids, shape);

    // The reference: the saved per-expert adapters merged into the checkpoint on the host.
    let saved = deepseek_tests::read_raw(&dir.path().join("adapter_model.safetensors"));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let mut edited = 0;
    let merged_dir = deepseek_tests::edited_copy("v3_yarn_qlora", |tensors| {
        for (name, t) in tensors.iter_mut() {
            let Some(path) = name.strip_suffix(".weight") else { continue };
            let key = |m: &str| format!("base_model.model.{path}.{m}.weight");
            let (Some(a), Some(b)) = (saved.get(&key("lora_A")), saved.get(&key("lora_B"))) else {
                continue;
            };
            let r = a.shape[0];
            let alpha = cfg["alpha_pattern"]
                .get(path)
                .and_then(|v| v.as_f64())
                .unwrap_or(cfg["lora_alpha"].as_f64().unwrap());
            let s = (alpha / r as f64) as f32;
            let (a, b, mut w) = (f32s(a), f32s(b), f32s(t));
            let (out, inp) = (t.shape[0], t.shape[1]);
            for o in 0..out {
                for i in 0..inp {
                    w[o * inp + i] +=
                        s * (0..r).map(|j| b[o * r + j] * a[j * inp + i]).sum::<f32>();
                }
            }
            t.bytes = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            edited += 1;
        }
    });
    // Every adapted map of the checkpoint was edited: 2 MoE layers × 8 experts × 3 maps, plus
    // attention (3 × 5), the dense MLP (3) and the shared experts (2 × 3).
    assert_eq!(edited, 2 * 8 * 3 + 15 + 3 + 6);
    let reference = logits(
        &load_model::<B>(merged_dir.path(), &device, LoadOptions::default()).unwrap(),
        &ids,
        shape,
    );
    assert!(max_abs_diff(&reference, &logits(&base("v3_yarn_qlora"), &ids, shape)) > 0.1);
    assert_close("expert adapters vs the host-merged checkpoint", &adapted, &reference, F32_ATOL);
    let grouped = model
        .clone()
        .with_policy(model.policy().clone().with_expert_path(ExpertPath::Grouped))
        .unwrap();
    assert_close("grouped expert path", &logits(&grouped, &ids, shape), &reference, F32_ATOL);
    let reloaded = load_adapter(base("v3_yarn_qlora"), dir.path()).unwrap();
    assert_close("reloaded", &logits(&reloaded, &ids, shape), &reference, F32_ATOL);
    assert_close("merged", &logits(&reloaded.merge_adapters(), &ids, shape), &reference, F32_ATOL);
    // The expert ranks differ from r: recorded per module for PEFT.
    assert_eq!(cfg["rank_pattern"]["model.layers.1.mlp.experts.7.up_proj"], 3);
}

/// The expert adapters' gradients agree between the per-expert and the grouped paths.
#[test]
fn routed_expert_adapter_gradients_agree_across_expert_paths() {
    use burn::backend::Autodiff;
    use deepseek_core::moe::ExpertPath;
    type AB = Autodiff<B>;
    deepseek_core::register_autodiff::<B>();
    let device = Default::default();
    let targets = LoraTargets::parse("all").unwrap();
    let settings =
        LoraSettings { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0, expert_rank: 2 };
    let model: DeepSeekModel<AB> =
        load_model::<AB>(golden_dir("v3_yarn_qlora"), &device, LoadOptions::default())
            .unwrap()
            .with_lora(&targets, &settings)
            .unwrap();
    model.materialize();
    let (ids, shape, _, _) = peft_logits("plain");
    let grads = |path: ExpertPath| -> Vec<f32> {
        let m = model.clone().with_policy(model.policy().clone().with_expert_path(path)).unwrap();
        let ids = Tensor::<AB, 2, Int>::from_data(TensorData::new(ids.clone(), shape), &device);
        let loss = m.forward(ids).powi_scalar(2).mean();
        let g = loss.backward();
        let mut out = Vec::new();
        let mut m = m;
        deepseek_core::finetune::for_each_routed_experts(&mut m, |_, routed| {
            for p in [&routed.gate_up, &routed.down] {
                let lora = p.lora.as_ref().unwrap();
                for param in [&lora.a, &lora.b] {
                    out.extend(
                        param
                            .val()
                            .grad(&g)
                            .unwrap()
                            .into_data()
                            .convert::<f32>()
                            .into_vec::<f32>()
                            .unwrap(),
                    );
                }
            }
            Ok(())
        })
        .unwrap();
        out
    };
    let (per_expert, grouped) = (grads(ExpertPath::PerExpert), grads(ExpertPath::Grouped));
    assert!(per_expert.iter().any(|g| g.abs() > 1e-6), "the adapters must get gradients");
    let scale = per_expert.iter().fold(0f32, |m, g| m.max(g.abs()));
    assert_close(
        "expert adapter gradients, per-expert vs grouped",
        &grouped,
        &per_expert,
        1e-4 * scale.max(1.0),
    );
}

#[test]
fn f32_adapters_on_a_bf16_base_give_peft_logits_within_bf16_tolerance() {
    let (ids, shape, expected, _) = peft_logits("plain");
    let options = LoadOptions::default().with_dtype(deepseek_core::WeightDtype::Bf16);
    let bf16 = load_model::<B>(golden_dir("v3_yarn_qlora"), &Default::default(), options).unwrap();
    let adapted = load_adapter(bf16, &peft_dir("plain")).unwrap();
    let lora = adapted.layers[0].self_attn.o_proj.lora.as_ref().expect("o_proj has an adapter");
    assert_eq!(lora.dtype(), burn::tensor::DType::F32, "adapters keep their precision");
    assert_eq!(adapted.layers[0].self_attn.o_proj.weight().dtype(), burn::tensor::DType::BF16);

    // Positions routed as the f32 model routes them in every block (a near-tie may go the other
    // way in bf16, and that token's expert output then differs by far more than rounding).
    let full = load_adapter(base("v3_yarn_qlora"), &peft_dir("plain")).unwrap();
    let input =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), shape), &Default::default());
    let options = deepseek_core::ForwardOptions::default();
    let (ours, reference) =
        (adapted.forward_with(input.clone(), options), full.forward_with(input, options));
    let mut kept = vec![true; shape[0] * shape[1]];
    for (a, b) in ours.routing.iter().zip(&reference.routing) {
        let k = a.indices.dims()[1];
        let sorted = |t: &Tensor<B, 2, Int>| {
            let idx: Vec<i64> = t.clone().into_data().convert::<i64>().into_vec().unwrap();
            deepseek_tests::sort_rows(&idx, &vec![0.0; idx.len()], k).0
        };
        let (a, b) = (sorted(&a.indices), sorted(&b.indices));
        for (t, (x, y)) in a.chunks(k).zip(b.chunks(k)).enumerate() {
            kept[t] &= x == y;
        }
    }
    let vocab = expected.len() / kept.len();
    let keep = |v: &[f32]| -> Vec<f32> {
        v.chunks(vocab).zip(&kept).filter(|(_, k)| **k).flat_map(|(r, _)| r.to_vec()).collect()
    };
    let left = kept.iter().filter(|k| **k).count();
    eprintln!("{left} of {} positions routed as in f32", kept.len());
    assert!(left * 2 >= kept.len(), "most positions route as in f32");
    assert_close(
        "plain adapter on a bf16 base vs PEFT (f32), positions routed alike",
        &keep(&logits(&adapted, &ids, shape)),
        &keep(&expected),
        deepseek_tests::BF16_ATOL,
    );
}
