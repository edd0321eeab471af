//! Writing a model in Hugging Face layout (`config.json` + `model.safetensors`), the inverse of
//! loading and driven by the same table ([`super::hf_names`]): every row is read back out of the
//! model, linear weights transposed to `[out, in]`, routed experts cut out of their stacks, and
//! the MTP copies of the embedding and head written as the released checkpoints carry them.
//!
//! Every file is written to a temporary name in the target directory and renamed into place, so
//! a crash leaves either the previous file or the new one, never a torn one.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use burn::tensor::backend::Backend;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::hf_names::{table, ExpertPart, Target, EXPERT_STRIDE};
use super::reader::SINGLE_FILE;
use crate::error::{DeepSeekError, Result};
use crate::model::DeepSeekModel;

/// One named f32 tensor in checkpoint layout.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The Hugging Face name (`model.layers.0.self_attn.o_proj.weight`).
    pub name: String,
    /// The checkpoint shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Every checkpoint tensor of `model`, in table order, as f32 host data.
pub fn model_tensors<B: Backend>(model: &DeepSeekModel<B>) -> Vec<NamedTensor> {
    let cfg = model.config.clone();
    // The table's accessors take `&mut`; once every parameter is drawn, a clone shares the
    // tensors and costs nothing.
    model.materialize();
    let mut m = model.clone();
    let host = |t: burn::tensor::TensorData| -> Vec<f32> {
        t.convert::<f32>().into_vec().expect("float tensor data")
    };
    // Stacked expert weights are read once per block.
    let mut stacks: BTreeMap<usize, (Vec<f32>, Vec<f32>)> = BTreeMap::new();
    let (d, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let mut out = Vec::new();
    for row in table::<B>(&cfg) {
        let values = match row.target {
            Target::Linear(get) => {
                // Burn keeps [in, out]; the checkpoint stores [out, in].
                let w = host(get(&mut m, row.index).weight().into_data());
                transpose(&w, row.shape[1], row.shape[0])
            }
            Target::Norm(get) => host(get(&mut m, row.index).weight.val().into_data()),
            Target::Matrix(get) => host(get(&mut m, row.index).val().into_data()),
            Target::Vector(get) => host(get(&mut m, row.index).val().into_data()),
            Target::Shared => {
                // The MTP module's copies of the shared embedding / head.
                if row.name.ends_with("embed_tokens.weight") {
                    host(m.embed_tokens.weight.val().into_data())
                } else {
                    let w = host(m.lm_head.weight().into_data());
                    transpose(&w, row.shape[1], row.shape[0])
                }
            }
            Target::Expert(part) => {
                let (layer, expert) = (row.index / EXPERT_STRIDE, row.index % EXPERT_STRIDE);
                let (gate_up, down) = stacks.entry(layer).or_insert_with(|| {
                    let experts = super::hf_names::routed_experts(&mut m, layer);
                    (
                        host(experts.gate_up.weight().into_data()),
                        host(experts.down.weight().into_data()),
                    )
                });
                match part {
                    // gate/up: columns `0..I` / `I..2I` of the expert's [D, 2I] slice → [I, D].
                    ExpertPart::Gate | ExpertPart::Up => {
                        let col0 = if part == ExpertPart::Gate { 0 } else { i };
                        let base = expert * d * 2 * i;
                        let mut v = vec![0f32; i * d];
                        for r in 0..i {
                            for c in 0..d {
                                v[r * d + c] = gate_up[base + c * 2 * i + col0 + r];
                            }
                        }
                        v
                    }
                    // down: the expert's [I, D] slice → [D, I].
                    ExpertPart::Down => {
                        transpose(&down[expert * i * d..(expert + 1) * i * d], i, d)
                    }
                }
            }
        };
        debug_assert_eq!(values.len(), row.shape.iter().product::<usize>(), "{}", row.name);
        out.push(NamedTensor { name: row.name, shape: row.shape, values });
    }
    out
}

/// Writes `dir/config.json` and `dir/model.safetensors` (F32), each atomically. Creates `dir`.
pub fn save_model<B: Backend>(model: &DeepSeekModel<B>, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir)
        .map_err(|source| DeepSeekError::Io { path: dir.to_path_buf(), source })?;
    let config =
        serde_json::to_string_pretty(&model.config.to_hf_json()).expect("JSON values serialize");
    write_atomic(&dir.join("config.json"), config.as_bytes())?;
    let tensors = model_tensors(model);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(SINGLE_FILE), &tensors, Some(metadata))
}

/// Serializes f32 tensors into one safetensors file, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), bytemuck::cast_slice(&t.values))
            .map_err(|e| DeepSeekError::Input(format!("tensor `{}`: {e}", t.name)))?;
        views.push((t.name.clone(), view));
    }
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| DeepSeekError::Input(format!("cannot serialize {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| DeepSeekError::Io { path: path.to_path_buf(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor, TensorData};

    #[test]
    fn saved_model_loads_back_with_identical_weights_and_logits() {
        let device = Default::default();
        let cfg = crate::DeepSeekConfig::tiny();
        let model = cfg.init::<Flex>(&device);
        let dir = tempfile::tempdir().unwrap();
        save_model(&model, dir.path()).unwrap();
        let loaded: DeepSeekModel<Flex> =
            crate::load_model(dir.path(), &device, crate::LoadOptions::default()).unwrap();
        assert_eq!(loaded.config, cfg);
        // Every tensor round-trips bit for bit (the MTP copies included).
        let (a, b) = (model_tensors(&loaded), model_tensors(&model));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!(x == y, "tensor `{}` differs after the round trip", x.name);
        }
        let ids = Tensor::<Flex, 2, Int>::from_data(
            TensorData::new((0..12i64).collect::<Vec<_>>(), [2, 6]),
            &device,
        );
        let a: Vec<f32> = model.forward(ids.clone()).into_data().into_vec().unwrap();
        let b: Vec<f32> = loaded.forward(ids).into_data().into_vec().unwrap();
        assert_eq!(a, b);
    }
}
