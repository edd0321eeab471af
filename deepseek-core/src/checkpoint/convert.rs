//! Casting a checkpoint between BF16 and the released FP8 format, tensor by tensor, without
//! building the model (the 671B checkpoint does not fit in memory as f32).
//!
//! - **FP8 → BF16** (as DeepSeek's `fp8_cast_bf16.py`): every F8_E4M3 weight is dequantized with
//!   its `weight_scale_inv` block grid and stored as BF16; the scales go; `quantization_config`
//!   leaves `config.json`. Other tensors are copied as they are.
//! - **→ FP8**: every 2-D projection weight (`*_proj.weight`: attention, dense and expert MLPs,
//!   MTP `eh_proj`, the set the released checkpoint stores in FP8) is quantized in 128×128 blocks
//!   with f32 scales (`amax / 448`, [`crate::fp8::quantize_blocks`]); embeddings, the output head,
//!   routers, norms and the balancing bias stay as they are.
//!
//! The output is sharded (`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`),
//! every file written atomically; `tokenizer*.json` and `generation_config.json` are copied.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::Value;

use super::reader::{Checkpoint, INDEX_FILE};
use super::writer::write_atomic;
use crate::config::DeepSeekConfig;
use crate::error::{DeepSeekError, Result};
use crate::fp8::{quantize_blocks, ScaleFormat};

/// The dtype a conversion produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertTo {
    /// BF16, dequantizing FP8 weights (as DeepSeek's `fp8_cast_bf16.py`).
    Bf16,
    /// The released FP8 format: E4M3 projection weights with 128×128 `weight_scale_inv` blocks.
    Fp8,
}

impl std::str::FromStr for ConvertTo {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bf16" => Ok(Self::Bf16),
            "fp8" => Ok(Self::Fp8),
            other => Err(format!("unknown dtype `{other}`: choose bf16 or fp8")),
        }
    }
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// Tensors written.
    pub tensors: usize,
    /// Weights converted (quantized or dequantized).
    pub converted: usize,
    /// Shard files written.
    pub shards: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
}

/// The FP8 block size [`convert`] writes (DeepSeek-V3's).
pub const FP8_BLOCK: [usize; 2] = [128, 128];

/// One output tensor.
struct Out {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Converts the checkpoint in `src` into `dst`, shards of at most `shard_bytes` (a larger tensor
/// gets a shard of its own).
pub fn convert(src: &Path, dst: &Path, to: ConvertTo, shard_bytes: u64) -> Result<ConvertReport> {
    let config = DeepSeekConfig::from_hf_file(src)?;
    let config_path = src.join("config.json");
    let mut raw: Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .map_err(|source| DeepSeekError::Io { path: config_path.clone(), source })?,
    )
    .map_err(|e| DeepSeekError::Json { path: config_path.clone(), reason: e.to_string() })?;
    let block = config.quantization.map(|q| q.weight_block_size);
    let ckpt = Checkpoint::open(src)?.with_fp8_block(block);
    if to == ConvertTo::Fp8 && block.is_some_and(|b| b != FP8_BLOCK) {
        return Err(DeepSeekError::config(
            "quantization_config.weight_block_size",
            format!("the checkpoint is FP8 with blocks {block:?}; convert it to bf16 first"),
        ));
    }
    std::fs::create_dir_all(dst)
        .map_err(|source| DeepSeekError::Io { path: dst.to_path_buf(), source })?;

    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    let mut converted = 0;
    let mut outputs: Vec<(String, Out)> = Vec::new();
    for name in &names {
        let stored = ckpt.stored(name).expect("listed by the checkpoint");
        if name.ends_with("_scale_inv")
            && ckpt
                .stored(name.trim_end_matches("_scale_inv"))
                .is_some_and(|t| t.dtype == Dtype::F8_E4M3)
        {
            // Handled with its weight.
            if to == ConvertTo::Fp8 {
                outputs.push((
                    name.clone(),
                    Out {
                        dtype: stored.dtype,
                        shape: stored.shape.clone(),
                        bytes: ckpt.raw_bytes(name).to_vec(),
                    },
                ));
            }
            continue;
        }
        let out = match (to, stored.dtype) {
            (ConvertTo::Bf16, Dtype::F8_E4M3) => {
                converted += 1;
                let values: Vec<f32> =
                    ckpt.read_f32(name, &stored.shape)?.into_vec().expect("f32 data");
                let bytes = values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                    .collect();
                Out { dtype: Dtype::BF16, shape: stored.shape.clone(), bytes }
            }
            (ConvertTo::Fp8, Dtype::F32 | Dtype::BF16 | Dtype::F16)
                if name.ends_with("_proj.weight") && stored.shape.len() == 2 =>
            {
                converted += 1;
                let values: Vec<f32> =
                    ckpt.read_f32(name, &stored.shape)?.into_vec().expect("f32 data");
                let (rows, cols) = (stored.shape[0], stored.shape[1]);
                let q = quantize_blocks(&values, rows, cols, FP8_BLOCK, ScaleFormat::F32);
                let grid = crate::fp8::scale_grid(rows, cols, FP8_BLOCK);
                outputs.push((
                    format!("{name}_scale_inv"),
                    Out {
                        dtype: Dtype::F32,
                        shape: grid.to_vec(),
                        bytes: q.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                    },
                ));
                Out { dtype: Dtype::F8_E4M3, shape: stored.shape.clone(), bytes: q.codes }
            }
            _ => Out {
                dtype: stored.dtype,
                shape: stored.shape.clone(),
                bytes: ckpt.raw_bytes(name).to_vec(),
            },
        };
        outputs.push((name.clone(), out));
    }
    outputs.sort_by(|a, b| a.0.cmp(&b.0));

    // Shards in name order, so one layer's tensors stay together.
    let mut shards: Vec<Vec<(String, Out)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, out) in outputs {
        let n = out.bytes.len() as u64;
        if size > 0 && size + n > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("non-empty").push((name, out));
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    let tensors: usize = shards.iter().map(Vec::len).sum();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let mut views = Vec::with_capacity(shard.len());
        for (name, out) in &shard {
            total += out.bytes.len() as u64;
            weight_map.insert(name.clone(), Value::from(file.clone()));
            let view = TensorView::new(out.dtype, out.shape.clone(), &out.bytes)
                .map_err(|e| DeepSeekError::Input(format!("tensor `{name}`: {e}")))?;
            views.push((name.clone(), view));
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| DeepSeekError::Input(format!("cannot serialize {file}: {e}")))?;
        write_atomic(&dst.join(&file), &bytes)?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_atomic(
        &dst.join(INDEX_FILE),
        serde_json::to_string_pretty(&index).expect("JSON").as_bytes(),
    )?;

    let obj = raw.as_object_mut().ok_or_else(|| DeepSeekError::Json {
        path: config_path.clone(),
        reason: "not an object".into(),
    })?;
    match to {
        ConvertTo::Bf16 => {
            obj.remove("quantization_config");
            obj.insert("torch_dtype".into(), "bfloat16".into());
        }
        ConvertTo::Fp8 => {
            obj.insert(
                "quantization_config".into(),
                serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": FP8_BLOCK}),
            );
        }
    }
    write_atomic(
        &dst.join("config.json"),
        serde_json::to_string_pretty(&raw).expect("JSON").as_bytes(),
    )?;
    for extra in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let from = src.join(extra);
        if from.is_file() {
            let bytes = std::fs::read(&from)
                .map_err(|source| DeepSeekError::Io { path: from.clone(), source })?;
            write_atomic(&dst.join(extra), &bytes)?;
        }
    }
    Ok(ConvertReport { tensors, converted, shards: count, bytes: total })
}
