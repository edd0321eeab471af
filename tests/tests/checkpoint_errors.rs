//! Bad checkpoints give typed errors naming the tensor or file; good variants (sharded, bf16,
//! f16) load. Each case edits a copy of a golden checkpoint.

use std::collections::BTreeMap;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::checkpoint::Checkpoint;
use deepseek_core::{load_model, DeepSeekError, LoadOptions};
use deepseek_tests::*;
use safetensors::Dtype;

const CASE: &str = "v3_yarn_qlora";
const KV_B: &str = "model.layers.1.self_attn.kv_b_proj.weight";

fn load(dir: &std::path::Path) -> Result<deepseek_core::DeepSeekModel<Flex>, DeepSeekError> {
    load_model::<Flex>(dir, &Default::default(), LoadOptions::default())
}

fn logits(dir: &std::path::Path) -> Vec<f32> {
    let model = load(dir).unwrap();
    let ids = Reference::load(CASE).get("input_ids").clone();
    let input =
        Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.i64, ids.shape), &Default::default());
    model.forward(input).into_data().convert::<f32>().into_vec().unwrap()
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_copy(CASE, |t| {
        t.remove(KV_B);
    });
    match load(dir.path()).unwrap_err() {
        DeepSeekError::MissingTensor { name, expected, .. } => {
            assert_eq!(name, KV_B);
            assert_eq!(expected, vec![128, 16]);
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
}

#[test]
fn shape_mismatch_names_expected_and_actual() {
    let dir = edited_copy(CASE, |t| {
        let w = t.get_mut(KV_B).unwrap();
        w.shape = vec![64, 32];
    });
    match load(dir.path()).unwrap_err() {
        DeepSeekError::ShapeMismatch { name, expected, actual } => {
            assert_eq!(name, KV_B);
            assert_eq!(expected, vec![128, 16]);
            assert_eq!(actual, vec![64, 32]);
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
}

#[test]
fn truncated_file_is_reported_as_malformed() {
    let dir = edited_copy(CASE, |_| {});
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 1000).unwrap();
    match load(dir.path()).unwrap_err() {
        DeepSeekError::MalformedSafetensors { path: p, .. } => assert_eq!(p, path),
        other => panic!("expected MalformedSafetensors, got {other}"),
    }
}

#[test]
fn garbage_header_is_reported_as_malformed() {
    let dir = edited_copy(CASE, |_| {});
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",
    )
    .unwrap();
    assert!(matches!(load(dir.path()).unwrap_err(), DeepSeekError::MalformedSafetensors { .. }));
}

#[test]
fn integer_weights_are_a_dtype_error() {
    let dir = edited_copy(CASE, |t| {
        t.get_mut(KV_B).unwrap().dtype = Dtype::I32;
    });
    match load(dir.path()).unwrap_err() {
        DeepSeekError::WrongDtype { name, actual } => {
            assert_eq!(name, KV_B);
            assert_eq!(actual, "I32");
        }
        other => panic!("expected WrongDtype, got {other}"),
    }
}

#[test]
fn fp8_weights_point_to_fp8_support() {
    let dir = edited_copy(CASE, |t| {
        let w = t.get_mut(KV_B).unwrap();
        w.dtype = Dtype::F8_E4M3;
        w.bytes.truncate(w.bytes.len() / 4);
    });
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, DeepSeekError::Fp8Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("FP8"), "{err}");
}

#[test]
fn unexpected_tensors_are_reported_unless_allowed() {
    let dir = edited_copy(CASE, |t| {
        let extra = t["model.norm.weight"].clone();
        t.insert("model.layers.0.self_attn.rotary_emb.inv_freq".into(), extra);
    });
    match load(dir.path()).unwrap_err() {
        DeepSeekError::UnexpectedTensors { names } => {
            assert_eq!(names, vec!["model.layers.0.self_attn.rotary_emb.inv_freq"])
        }
        other => panic!("expected UnexpectedTensors, got {other}"),
    }
    load_model::<Flex>(
        dir.path(),
        &Default::default(),
        LoadOptions { allow_unused: true, ..Default::default() },
    )
    .unwrap();
}

#[test]
fn unknown_architecture_is_a_typed_error() {
    let dir = edited_copy(CASE, |_| {});
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("DeepseekV3ForCausalLM", "MixtralForCausalLM");
    std::fs::write(&path, text).unwrap();
    assert!(matches!(load(dir.path()).unwrap_err(), DeepSeekError::UnknownArchitecture { .. }));
}

#[test]
fn sharded_checkpoint_with_index_gives_the_same_logits() {
    let src = golden_dir(CASE);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let tensors = read_raw(&src.join("model.safetensors"));
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        weight_map.insert(name.clone(), file.into());
        if i % 2 == 0 {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    write_raw(&dir.path().join("model-00001-of-00002.safetensors"), &a);
    write_raw(&dir.path().join("model-00002-of-00002.safetensors"), &b);
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(logits(dir.path()), logits(&src));
}

#[test]
fn index_naming_a_missing_shard_is_an_io_error() {
    let dir = edited_copy(CASE, |_| {});
    let index = serde_json::json!({ "weight_map": { "lm_head.weight": "model-00009-of-00009.safetensors" } });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    match load(dir.path()).unwrap_err() {
        DeepSeekError::Io { path, .. } => {
            assert!(path.ends_with("model-00009-of-00009.safetensors"))
        }
        other => panic!("expected Io, got {other}"),
    }
}

#[test]
fn bf16_and_f16_weights_load_as_their_rounded_values() {
    let f32_tensors = read_raw(&golden_dir(CASE).join("model.safetensors"));
    for dtype in [Dtype::BF16, Dtype::F16] {
        let dir = edited_copy(CASE, |t| {
            for tensor in t.values_mut() {
                let values =
                    tensor.bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()));
                tensor.bytes = match dtype {
                    Dtype::BF16 => values
                        .flat_map(|v| half::bf16::from_f32(v).to_bits().to_le_bytes())
                        .collect(),
                    _ => values
                        .flat_map(|v| half::f16::from_f32(v).to_bits().to_le_bytes())
                        .collect(),
                };
                tensor.dtype = dtype;
            }
        });
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let original = &f32_tensors[KV_B];
        let loaded: Vec<f32> = ckpt.read_f32(KV_B, &original.shape).unwrap().into_vec().unwrap();
        let expected: Vec<f32> = original
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .map(|v| {
                if dtype == Dtype::BF16 {
                    half::bf16::from_f32(v).to_f32()
                } else {
                    half::f16::from_f32(v).to_f32()
                }
            })
            .collect();
        assert_eq!(loaded, expected, "{dtype:?}");
        // The whole model still loads and runs.
        assert_eq!(logits(dir.path()).len(), 2 * 12 * 256);
    }
}
