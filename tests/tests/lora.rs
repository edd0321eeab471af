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
    let settings = LoraSettings { rank: 3, alpha: 5.0, rslora: true, dropout: 0.0 };
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
