//! Loading Hugging Face-layout checkpoint directories (`config.json` plus `model.safetensors` or
//! sharded files with `model.safetensors.index.json`) into a [`DeepSeekModel`].
//!
//! Every tensor the configuration implies is checked (presence, dtype, shape) before any data is
//! read, so a bad checkpoint fails fast with an error that names the tensor and the file; tensors
//! the model does not use are reported as an error unless the caller allows them.

pub mod convert;
mod hf_names;
mod reader;
mod writer;

use std::collections::HashSet;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::config::DeepSeekConfig;
use crate::error::{DeepSeekError, Result};
use crate::model::DeepSeekModel;
pub(crate) use hf_names::{table, ExpertPart, Target, EXPERT_STRIDE};
pub use reader::{Checkpoint, StoredTensor, INDEX_FILE, SINGLE_FILE};
pub use writer::{model_tensors, save_model, write_atomic, write_safetensors, NamedTensor};

/// Loader switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Ignore tensors the model does not use instead of failing.
    pub allow_unused: bool,
}

/// Reads `dir/config.json` and the weights into a model on `device`.
pub fn load_model<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
    options: LoadOptions,
) -> Result<DeepSeekModel<B>> {
    let dir = dir.as_ref();
    let config = DeepSeekConfig::from_hf_file(dir)?;
    let ckpt =
        Checkpoint::open(dir)?.with_fp8_block(config.quantization.map(|q| q.weight_block_size));
    load_weights(&config, &ckpt, device, options)
}

/// Builds a model of `config` from the tensors of `ckpt`.
pub fn load_weights<B: Backend>(
    config: &DeepSeekConfig,
    ckpt: &Checkpoint,
    device: &B::Device,
    options: LoadOptions,
) -> Result<DeepSeekModel<B>> {
    let rows = table::<B>(config);
    // Validate everything before reading any data.
    let mut used: HashSet<String> = HashSet::new();
    for row in &rows {
        let optional = matches!(row.target, Target::Shared);
        if optional && ckpt.stored(&row.name).is_none() {
            continue;
        }
        ckpt.check(&row.name, &row.shape)?;
        if ckpt.stored(&row.name).is_some_and(|t| t.dtype == safetensors::Dtype::F8_E4M3) {
            used.insert(Checkpoint::scale_name(&row.name));
        }
        used.insert(row.name.clone());
    }
    if !options.allow_unused {
        let unused: Vec<String> =
            ckpt.names().filter(|n| !used.contains(*n)).map(str::to_string).collect();
        if !unused.is_empty() {
            return Err(DeepSeekError::UnexpectedTensors { names: unused });
        }
    }
    let mut model = config.init::<B>(device);
    let mut experts = StackedExperts::new(config);
    for row in &rows {
        if matches!(row.target, Target::Shared) {
            continue;
        }
        let data = ckpt.read_f32(&row.name, &row.shape)?;
        match row.target {
            Target::Linear(get) => {
                // Stored [out, in]; Burn's Linear computes x·W with W [in, out]. Transposing on
                // the host keeps the weight contiguous, so no matmul pays for a strided layout.
                get(&mut model, row.index).weight = Param::from_tensor(Tensor::<B, 2>::from_data(
                    transpose(data, row.shape[0], row.shape[1]),
                    device,
                ));
            }
            Target::Norm(get) => {
                get(&mut model, row.index).weight =
                    Param::from_tensor(Tensor::from_data(data, device))
            }
            Target::Matrix(get) => {
                *get(&mut model, row.index) = Param::from_tensor(Tensor::from_data(data, device))
            }
            Target::Vector(get) => {
                // The balancing bias is state, not a trainable parameter.
                *get(&mut model, row.index) =
                    Param::from_tensor(Tensor::from_data(data, device)).set_require_grad(false)
            }
            Target::Expert(part) => experts.write(row.index, part, data),
            Target::Shared => unreachable!("skipped above"),
        }
    }
    experts.install(&mut model, device);
    Ok(model)
}

/// Host buffers in which the per-expert checkpoint tensors are assembled into the stacked
/// `gate_up [E, D, 2I]` and `down [E, I, D]` weights of each MoE block.
struct StackedExperts {
    d: usize,
    i: usize,
    e: usize,
    /// block index → (gate_up, down) values.
    blocks: std::collections::BTreeMap<usize, (Vec<f32>, Vec<f32>)>,
}

impl StackedExperts {
    fn new(cfg: &DeepSeekConfig) -> Self {
        Self {
            d: cfg.hidden_size,
            i: cfg.moe_intermediate_size,
            e: cfg.n_routed_experts,
            blocks: Default::default(),
        }
    }

    /// Writes one expert's `[out, in]` checkpoint tensor, transposed, into its slice.
    fn write(&mut self, packed: usize, part: ExpertPart, data: TensorData) {
        let (d, i, e) = (self.d, self.i, self.e);
        let (layer, expert) = (packed / EXPERT_STRIDE, packed % EXPERT_STRIDE);
        let (gate_up, down) = self
            .blocks
            .entry(layer)
            .or_insert_with(|| (vec![0.0; e * d * 2 * i], vec![0.0; e * i * d]));
        let values: Vec<f32> = data.into_vec().expect("read_f32 returns f32 data");
        match part {
            // gate/up: stored [I, D]; slice [D, 2I] of expert `expert`, columns offset by 0 or I.
            ExpertPart::Gate | ExpertPart::Up => {
                let col0 = if part == ExpertPart::Gate { 0 } else { i };
                let base = expert * d * 2 * i;
                for r in 0..i {
                    for c in 0..d {
                        gate_up[base + c * 2 * i + col0 + r] = values[r * d + c];
                    }
                }
            }
            // down: stored [D, I]; slice [I, D].
            ExpertPart::Down => {
                let base = expert * i * d;
                for r in 0..d {
                    for c in 0..i {
                        down[base + c * d + r] = values[r * i + c];
                    }
                }
            }
        }
    }

    fn install<B: Backend>(self, model: &mut DeepSeekModel<B>, device: &B::Device) {
        let (d, i, e) = (self.d, self.i, self.e);
        for (layer, (gate_up, down)) in self.blocks {
            let experts = hf_names::routed_experts(model, layer);
            experts.gate_up.weight = Param::from_tensor(Tensor::from_data(
                TensorData::new(gate_up, [e, d, 2 * i]),
                device,
            ));
            experts.down.weight =
                Param::from_tensor(Tensor::from_data(TensorData::new(down, [e, i, d]), device));
        }
    }
}

/// `[rows, cols]` → `[cols, rows]` of an f32 tensor.
fn transpose(data: TensorData, rows: usize, cols: usize) -> TensorData {
    let values: Vec<f32> = data.into_vec().expect("read_f32 returns f32 data");
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    TensorData::new(out, [cols, rows])
}
