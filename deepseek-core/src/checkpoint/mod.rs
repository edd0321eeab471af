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
use crate::dtype::WeightDtype;
use crate::error::{DeepSeekError, Result};
use crate::fp8::{Fp8Layout, Fp8Weight};
use crate::model::DeepSeekModel;
use crate::projection::Weight;
pub(crate) use hf_names::{table, ExpertPart, Target, EXPERT_STRIDE};
pub use reader::{Checkpoint, Fp8Codes, StoredTensor, INDEX_FILE, SINGLE_FILE};
pub use writer::{model_tensors, save_model, write_atomic, write_safetensors, NamedTensor};

/// Loader switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Ignore tensors the model does not use instead of failing.
    pub allow_unused: bool,
    /// The dtype the weights are held in, whatever the checkpoint stores (F32, BF16, F16, or FP8
    /// dequantized); the routers' correction biases stay f32 ([`crate::dtype`]). FP8-resident
    /// projections keep their codes and compute with activations of this dtype.
    pub dtype: WeightDtype,
    /// Dequantize the weights of an FP8 checkpoint into `dtype` instead of keeping them as E4M3
    /// codes and block scales ([`crate::fp8::resident`]). Training the full model needs it: FP8
    /// weights are frozen.
    pub dequantize_fp8: bool,
}

impl LoadOptions {
    /// These options with weights held in `dtype`.
    pub fn with_dtype(self, dtype: WeightDtype) -> Self {
        Self { dtype, ..self }
    }

    /// These options with FP8 weights dequantized on load (`true`) or kept as codes (`false`,
    /// the default).
    pub fn with_dequantize_fp8(self, dequantize_fp8: bool) -> Self {
        Self { dequantize_fp8, ..self }
    }
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
    options.dtype.check_supported::<B>(device)?;
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
    let fp8 =
        |name: &str| ckpt.stored(name).is_some_and(|t| t.dtype == safetensors::Dtype::F8_E4M3);
    let resident = !options.dequantize_fp8;
    // A block's routed experts stay FP8 when all of them are stored so.
    let mut float_layers = HashSet::new();
    for row in &rows {
        if let Target::Expert(_) = row.target {
            if !(resident && fp8(&row.name)) {
                float_layers.insert(row.index / EXPERT_STRIDE);
            }
        }
    }
    let mut experts = StackedExperts::new(config, options.dtype);
    // Each tensor is read in the dtype it is stored in, one at a time, and stored in the chosen
    // dtype (rounded element by element where they differ), so the model never exists in f32
    // unless it is held in f32.
    let held = (device, options.dtype.dtype());
    for row in &rows {
        if matches!(row.target, Target::Shared) {
            continue;
        }
        let layer = row.index / EXPERT_STRIDE;
        let keep_codes = match row.target {
            Target::Linear(_) => resident,
            Target::Expert(_) => !float_layers.contains(&layer),
            _ => false,
        };
        if keep_codes {
            if let Some(stored) = ckpt.read_fp8_codes(&row.name, &row.shape)? {
                let reader::Fp8Codes { codes, scales, block } = stored;
                let fp8_weight = |codes: &[u8], scales, layout| {
                    Fp8Weight::new(codes, scales, layout, device)
                        .map(|w| w.with_dtype(options.dtype.float()))
                        .map_err(|e| DeepSeekError::Input(format!("tensor `{}`: {e}", row.name)))
                };
                match row.target {
                    Target::Linear(get) => {
                        let [d_out, d_in] = [row.shape[0], row.shape[1]];
                        let layout = Fp8Layout { experts: 1, parts: 1, d_out, d_in, block };
                        get(&mut model, row.index).weight =
                            Weight::Fp8(fp8_weight(&codes, scales, layout)?);
                    }
                    Target::Expert(part) => {
                        if let Some((gate_up, down)) =
                            experts.write_fp8(row.index, part, &codes, &scales, block)
                        {
                            let layer = hf_names::routed_experts(&mut model, layer);
                            layer.gate_up.weight =
                                Weight::Fp8(fp8_weight(&gate_up.0, gate_up.1, gate_up.2)?);
                            layer.down.weight = Weight::Fp8(fp8_weight(&down.0, down.1, down.2)?);
                        }
                    }
                    _ => unreachable!("only projections keep their codes"),
                }
                continue;
            }
        }
        let data = match row.target {
            // The balancing bias stays f32; everything else is rounded as it is read.
            Target::Vector(_) => ckpt.read_float(&row.name, &row.shape)?,
            _ => ckpt.read_float_as(&row.name, &row.shape, options.dtype)?,
        };
        match row.target {
            Target::Linear(get) => {
                // Stored [out, in]; Burn's Linear computes x·W with W [in, out]. Transposing on
                // the host keeps the weight contiguous, so no matmul pays for a strided layout.
                get(&mut model, row.index).weight =
                    Weight::Dense(Param::from_tensor(Tensor::<B, 2>::from_data(
                        transpose(data, row.shape[0], row.shape[1], options.dtype),
                        held,
                    )));
            }
            Target::Norm(get) => {
                get(&mut model, row.index).weight =
                    Param::from_tensor(Tensor::from_data(data, held))
            }
            Target::Matrix(get) => {
                *get(&mut model, row.index) = Param::from_tensor(Tensor::from_data(data, held))
            }
            Target::Vector(get) => {
                // The balancing bias is state, not a trainable parameter, and stays f32.
                *get(&mut model, row.index) =
                    Param::from_tensor(Tensor::from_data(data, device)).set_require_grad(false)
            }
            Target::Expert(part) => {
                if let Some(done) = experts.write(row.index, part, data) {
                    // A block's stack goes to the device as soon as it is complete: the host
                    // holds one block's experts at a time, in the held dtype.
                    experts.install(&mut model, done, held);
                }
            }
            Target::Shared => unreachable!("skipped above"),
        }
    }
    debug_assert!(
        experts.blocks.is_empty() && experts.fp8_blocks.is_empty(),
        "every block's experts were checked present"
    );
    Ok(model)
}

/// Host buffers in which the per-expert checkpoint tensors are assembled into the stacked
/// `gate_up [E, D, 2I]` and `down [E, I, D]` weights of each MoE block, in the dtype the weights
/// are held in (a bf16 model stages bf16: one block's experts, not twice that).
struct StackedExperts {
    d: usize,
    i: usize,
    e: usize,
    dtype: WeightDtype,
    /// block index → (gate_up, down) values and the number of expert tensors written.
    blocks: std::collections::BTreeMap<usize, (Staging, Staging, usize)>,
    /// block index → FP8-resident stacks being assembled.
    fp8_blocks: std::collections::BTreeMap<usize, Fp8Staging>,
}

/// The codes and scales of one block's experts in the checkpoint's layout, each expert's
/// `[out, in]` matrices stacked along the rows (gate rows, then up rows, per expert).
struct Fp8Staging {
    /// `(codes, scales, layout)` of `gate_up` and `down`.
    gate_up: (Vec<u8>, Vec<f32>, Fp8Layout),
    down: (Vec<u8>, Vec<f32>, Fp8Layout),
    written: usize,
}

/// A stack of FP8 matrices: its codes, scales and layout.
type Fp8Parts = (Vec<u8>, Vec<f32>, Fp8Layout);

/// A host buffer of one of the weight dtypes.
enum Staging {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl Staging {
    fn zeros(dtype: WeightDtype, n: usize) -> Self {
        match dtype {
            WeightDtype::F32 => Staging::F32(vec![0.0; n]),
            WeightDtype::Bf16 => Staging::Bf16(vec![half::bf16::ZERO; n]),
            WeightDtype::F16 => Staging::F16(vec![half::f16::ZERO; n]),
        }
    }

    /// `self[at(k)] = data[k]` for every `k` of a float tensor (f32, bf16 or f16), rounded to
    /// the buffer's dtype (exact where the dtypes agree: widening to f32 and back is lossless).
    fn scatter(&mut self, data: &TensorData, at: impl Fn(usize) -> usize) {
        match data.dtype {
            burn::tensor::DType::F32 => {
                self.scatter_from(data.as_slice::<f32>().expect("f32 data"), |v| v, at)
            }
            burn::tensor::DType::BF16 => self.scatter_from(
                data.as_slice::<half::bf16>().expect("bf16 data"),
                |v| v.to_f32(),
                at,
            ),
            burn::tensor::DType::F16 => self.scatter_from(
                data.as_slice::<half::f16>().expect("f16 data"),
                |v| v.to_f32(),
                at,
            ),
            other => unreachable!("read_float returns f32, bf16 or f16, not {other:?}"),
        }
    }

    fn scatter_from<S: Copy>(
        &mut self,
        src: &[S],
        widen: fn(S) -> f32,
        at: impl Fn(usize) -> usize,
    ) {
        fn put<S: Copy, T>(
            dst: &mut [T],
            src: &[S],
            at: impl Fn(usize) -> usize,
            f: impl Fn(S) -> T,
        ) {
            for (k, &v) in src.iter().enumerate() {
                dst[at(k)] = f(v);
            }
        }
        match self {
            Staging::F32(dst) => put(dst, src, at, widen),
            Staging::Bf16(dst) => put(dst, src, at, |v| half::bf16::from_f32(widen(v))),
            Staging::F16(dst) => put(dst, src, at, |v| half::f16::from_f32(widen(v))),
        }
    }

    fn into_data(self, shape: Vec<usize>) -> TensorData {
        match self {
            Staging::F32(v) => TensorData::new(v, shape),
            Staging::Bf16(v) => TensorData::new(v, shape),
            Staging::F16(v) => TensorData::new(v, shape),
        }
    }
}

impl StackedExperts {
    fn new(cfg: &DeepSeekConfig, dtype: WeightDtype) -> Self {
        Self {
            d: cfg.hidden_size,
            i: cfg.moe_intermediate_size,
            e: cfg.n_routed_experts,
            dtype,
            blocks: Default::default(),
            fp8_blocks: Default::default(),
        }
    }

    /// Copies one expert's FP8 codes and scales into the block's stacks; returns the stacks once
    /// all `3·E` tensors of the block are written.
    fn write_fp8(
        &mut self,
        packed: usize,
        part: ExpertPart,
        codes: &[u8],
        scales: &[f32],
        block: [usize; 2],
    ) -> Option<(Fp8Parts, Fp8Parts)> {
        let (d, i, e) = (self.d, self.i, self.e);
        let (layer, expert) = (packed / EXPERT_STRIDE, packed % EXPERT_STRIDE);
        let stack = self.fp8_blocks.entry(layer).or_insert_with(|| {
            let new = |parts, d_out, d_in| {
                let layout = Fp8Layout { experts: e, parts, d_out, d_in, block };
                let [gr, gc] = layout.grid();
                (vec![0u8; e * d_out * d_in], vec![0f32; e * gr * gc], layout)
            };
            Fp8Staging { gate_up: new(2, 2 * i, d), down: new(1, d, i), written: 0 }
        });
        // Expert `expert`'s matrix is rows `expert·d_out..` of its stack; gate is the first part
        // of gate_up, up the second.
        let (target, part_index) = match part {
            ExpertPart::Gate => (&mut stack.gate_up, 0),
            ExpertPart::Up => (&mut stack.gate_up, 1),
            ExpertPart::Down => (&mut stack.down, 0),
        };
        let (stack_codes, stack_scales, layout) = target;
        let [gr, gc] = layout.grid();
        let part_rows = layout.part_rows();
        let row0 = expert * layout.d_out + part_index * part_rows;
        stack_codes[row0 * layout.d_in..][..codes.len()].copy_from_slice(codes);
        let scale_row0 = expert * gr + part_index * gr / layout.parts;
        stack_scales[scale_row0 * gc..][..scales.len()].copy_from_slice(scales);
        stack.written += 1;
        if stack.written < 3 * e {
            return None;
        }
        let done = self.fp8_blocks.remove(&layer).expect("the block being written");
        Some((done.gate_up, done.down))
    }

    /// Writes one expert's `[out, in]` checkpoint tensor, transposed, into its slice; returns the
    /// block once all its `3·E` tensors are written.
    fn write(&mut self, packed: usize, part: ExpertPart, data: TensorData) -> Option<usize> {
        let (d, i, e, dtype) = (self.d, self.i, self.e, self.dtype);
        let (layer, expert) = (packed / EXPERT_STRIDE, packed % EXPERT_STRIDE);
        let (gate_up, down, written) = self.blocks.entry(layer).or_insert_with(|| {
            (Staging::zeros(dtype, e * d * 2 * i), Staging::zeros(dtype, e * i * d), 0)
        });
        *written += 1;
        let complete = (*written == 3 * e).then_some(layer);
        match part {
            // gate/up: stored [I, D] (value k at row k / D, column k % D); slice [D, 2I] of
            // expert `expert`, columns offset by 0 or I.
            ExpertPart::Gate | ExpertPart::Up => {
                let col0 = if part == ExpertPart::Gate { 0 } else { i };
                let base = expert * d * 2 * i;
                gate_up.scatter(&data, |k| base + (k % d) * 2 * i + col0 + k / d);
            }
            // down: stored [D, I]; slice [I, D].
            ExpertPart::Down => {
                let base = expert * i * d;
                down.scatter(&data, |k| base + (k % i) * d + k / i);
            }
        }
        complete
    }

    /// Moves block `layer`'s stacks into the model, stored as `held` says.
    fn install<B: Backend>(
        &mut self,
        model: &mut DeepSeekModel<B>,
        layer: usize,
        held: (&B::Device, burn::tensor::DType),
    ) {
        let (d, i, e) = (self.d, self.i, self.e);
        let (gate_up, down, _) = self.blocks.remove(&layer).expect("a block being written");
        let experts = hf_names::routed_experts(model, layer);
        experts.gate_up.weight = Weight::Dense(Param::from_tensor(Tensor::from_data(
            gate_up.into_data(vec![e, d, 2 * i]),
            held,
        )));
        experts.down.weight = Weight::Dense(Param::from_tensor(Tensor::from_data(
            down.into_data(vec![e, i, d]),
            held,
        )));
    }
}

/// `[rows, cols]` → `[cols, rows]` of a float tensor, rounded to `dtype` as it is written.
fn transpose(data: TensorData, rows: usize, cols: usize, dtype: WeightDtype) -> TensorData {
    let mut out = Staging::zeros(dtype, rows * cols);
    // Value k sits at row k / cols, column k % cols; it goes to row k % cols, column k / cols.
    out.scatter(&data, |k| (k % cols) * rows + k / cols);
    out.into_data(vec![cols, rows])
}
