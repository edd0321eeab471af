//! Memory-mapped reading of Hugging Face safetensors checkpoints: a single `model.safetensors`
//! or shards listed in `model.safetensors.index.json`. Headers are parsed once per shard with the
//! `safetensors` crate (which also rejects truncated files); tensor bytes are converted to f32 on
//! demand.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::error::{DeepSeekError, Result};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// An opened checkpoint directory: every tensor name resolved to its shard.
pub struct Checkpoint {
    dir: PathBuf,
    /// `weight_block_size` of FP8 weights (from `quantization_config`); `None`: FP8 is an error.
    fp8_block: Option<[usize; 2]>,
    shards: Vec<Shard>,
    /// tensor name → shard index (sorted for stable error messages).
    location: BTreeMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.location.len())
            .finish()
    }
}

/// The shape and dtype of a stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// The safetensors dtype.
    pub dtype: Dtype,
    /// The stored shape (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` and its shards, or `dir/model.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        let files: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| DeepSeekError::Io { path: index_path.clone(), source })?;
            let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                DeepSeekError::Json { path: index_path.clone(), reason: e.to_string() }
            })?;
            let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                DeepSeekError::Json {
                    path: index_path.clone(),
                    reason: "missing object `weight_map`".into(),
                }
            })?;
            let mut files: Vec<String> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| DeepSeekError::Json {
                    path: index_path.clone(),
                    reason: format!("weight_map[{name}] is not a file name"),
                })?;
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
            }
            files.sort();
            files
        } else {
            vec![SINGLE_FILE.to_string()]
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut location = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            let shard = Shard::open(dir.join(file))?;
            for name in shard.metadata.tensors().into_keys() {
                if let Some(previous) = location.insert(name.clone(), i) {
                    return Err(DeepSeekError::MalformedSafetensors {
                        path: shard.path.clone(),
                        reason: format!("tensor `{name}` is also stored in `{}`", files[previous]),
                    });
                }
            }
            shards.push(shard);
        }
        Ok(Self { dir, fp8_block: None, shards, location })
    }

    /// Opens one safetensors file (an adapter's `adapter_model.safetensors`, say).
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let shard = Shard::open(path.clone())?;
        let location = shard.metadata.tensors().into_keys().map(|name| (name, 0)).collect();
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self { dir, fp8_block: None, shards: vec![shard], location })
    }

    /// Accepts F8_E4M3 weights with `<name>_scale_inv` block scales of this block size (the
    /// config's `quantization_config.weight_block_size`); they are dequantized to f32 on read.
    pub fn with_fp8_block(mut self, block: Option<[usize; 2]>) -> Self {
        self.fp8_block = block;
        self
    }

    /// Name of the block-scale tensor of FP8 weight `name`.
    pub fn scale_name(name: &str) -> String {
        format!("{name}_scale_inv")
    }

    /// The directory the checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let shard = &self.shards[*self.location.get(name)?];
        Some((shard, shard.metadata.info(name)?))
    }

    /// Shape and dtype of a stored tensor, if present.
    pub fn stored(&self, name: &str) -> Option<StoredTensor> {
        self.info(name)
            .map(|(_, info)| StoredTensor { dtype: info.dtype, shape: info.shape.clone() })
    }

    /// The stored bytes of a tensor (little-endian, in its stored dtype).
    ///
    /// # Panics
    /// If `name` is not in the checkpoint (see [`Checkpoint::stored`]).
    pub fn raw_bytes(&self, name: &str) -> &[u8] {
        let (shard, info) = self.info(name).expect("tensor listed by the checkpoint");
        &shard.mmap
            [8 + shard.header_len + info.data_offsets.0..8 + shard.header_len + info.data_offsets.1]
    }

    /// Checks presence, dtype and shape of a tensor without reading its data.
    pub fn check(&self, name: &str, expected: &[usize]) -> Result<()> {
        let Some((_, info)) = self.info(name) else {
            return Err(DeepSeekError::MissingTensor {
                name: name.to_string(),
                expected: expected.to_vec(),
                searched: self.searched(),
            });
        };
        match info.dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => {}
            Dtype::F8_E4M3 => {
                let Some(block) = self.fp8_block else {
                    return Err(DeepSeekError::Fp8Unsupported {
                        name: name.to_string(),
                        actual: "F8_E4M3".into(),
                        problem: "config.json has no `quantization_config` (fp8, weight_block_size): it says the weights are not FP8".into(),
                    });
                };
                if expected.len() != 2 {
                    return Err(DeepSeekError::Fp8Unsupported {
                        name: name.to_string(),
                        actual: "F8_E4M3".into(),
                        problem: "only 2-D weights are stored in FP8".into(),
                    });
                }
                // The scale grid: one f32 per (possibly partial) block.
                let scale = Self::scale_name(name);
                let grid = crate::fp8::scale_grid(expected[0], expected[1], block);
                let Some((_, scale_info)) = self.info(&scale) else {
                    return Err(DeepSeekError::MissingTensor {
                        name: scale,
                        expected: grid.to_vec(),
                        searched: self.searched(),
                    });
                };
                if scale_info.dtype != Dtype::F32 {
                    return Err(DeepSeekError::WrongDtype {
                        name: scale,
                        actual: format!("{:?} (block scales must be F32)", scale_info.dtype),
                    });
                }
                if scale_info.shape != grid {
                    return Err(DeepSeekError::ShapeMismatch {
                        name: scale,
                        expected: grid.to_vec(),
                        actual: scale_info.shape.clone(),
                    });
                }
            }
            Dtype::F8_E5M2 => {
                return Err(DeepSeekError::Fp8Unsupported {
                    name: name.to_string(),
                    actual: "F8_E5M2".into(),
                    problem: "DeepSeek checkpoints use E4M3 only".into(),
                })
            }
            other => {
                return Err(DeepSeekError::WrongDtype {
                    name: name.to_string(),
                    actual: format!("{other:?}"),
                })
            }
        }
        if info.shape != expected {
            return Err(DeepSeekError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: info.shape.clone(),
            });
        }
        Ok(())
    }

    /// Reads a floating-point tensor as f32, after [`Checkpoint::check`].
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<TensorData> {
        Ok(self.read_float(name, expected)?.convert::<f32>())
    }

    /// Reads a floating-point tensor in the dtype it is stored in (F32, BF16 or F16; FP8 weights
    /// dequantized to f32), after [`Checkpoint::check`]: a bf16 checkpoint is never widened as a
    /// whole.
    pub fn read_float(&self, name: &str, expected: &[usize]) -> Result<TensorData> {
        self.check(name, expected)?;
        let (shard, info) = self.info(name).expect("checked above");
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let bytes = &shard.mmap[start..end];
        let shape = info.shape.clone();
        let halves = || bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let data = match info.dtype {
            Dtype::F32 => {
                let values: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                TensorData::new(values, shape)
            }
            Dtype::BF16 => {
                TensorData::new(halves().map(half::bf16::from_bits).collect::<Vec<_>>(), shape)
            }
            Dtype::F16 => {
                TensorData::new(halves().map(half::f16::from_bits).collect::<Vec<_>>(), shape)
            }
            Dtype::F8_E4M3 => return self.read_fp8(name, bytes, &info.shape),
            _ => unreachable!("dtype checked above"),
        };
        shard.release(start, end - start);
        Ok(data)
    }

    /// [`Checkpoint::read_float`] rounded to `dtype` as it is read from the mapped file (to
    /// nearest, ties to even), so loading a wider checkpoint into a narrower dtype never holds the
    /// wide copy of a tensor; the same values as reading and then rounding.
    pub fn read_float_as(
        &self,
        name: &str,
        expected: &[usize],
        dtype: crate::dtype::WeightDtype,
    ) -> Result<TensorData> {
        use crate::dtype::WeightDtype;
        self.check(name, expected)?;
        let (shard, info) = self.info(name).expect("checked above");
        let stored = match info.dtype {
            Dtype::F32 => WeightDtype::F32,
            Dtype::BF16 => WeightDtype::Bf16,
            Dtype::F16 => WeightDtype::F16,
            _ => return Ok(convert_data(self.read_float(name, expected)?, dtype)),
        };
        if stored == dtype {
            return self.read_float(name, expected);
        }
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let bytes = &shard.mmap[start..end];
        let wide: fn(&[u8]) -> f32 = match stored {
            WeightDtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            WeightDtype::Bf16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            WeightDtype::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        };
        let values = bytes.chunks_exact(stored.size()).map(wide);
        let shape = info.shape.clone();
        let data = match dtype {
            WeightDtype::F32 => TensorData::new(values.collect::<Vec<f32>>(), shape),
            WeightDtype::Bf16 => {
                TensorData::new(values.map(half::bf16::from_f32).collect::<Vec<_>>(), shape)
            }
            WeightDtype::F16 => {
                TensorData::new(values.map(half::f16::from_f32).collect::<Vec<_>>(), shape)
            }
        };
        shard.release(start, end - start);
        Ok(data)
    }

    /// The E4M3 codes and f32 block scales of an FP8 weight, after [`Checkpoint::check`];
    /// `None` for a tensor not stored in FP8.
    pub fn read_fp8_codes(&self, name: &str, expected: &[usize]) -> Result<Option<Fp8Codes>> {
        self.check(name, expected)?;
        let (shard, info) = self.info(name).expect("checked above");
        if info.dtype != Dtype::F8_E4M3 {
            return Ok(None);
        }
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let codes = &shard.mmap[start..end];
        let (scales, block) = self.fp8_scales(name, codes, &info.shape)?;
        let codes = codes.to_vec();
        shard.release(start, end - start);
        Ok(Some(Fp8Codes { codes, scales, block }))
    }

    /// The block scales of FP8 weight `name` (`[rows, cols]`, after [`Checkpoint::check`]) and
    /// its block size, once its codes are checked free of NaN.
    fn fp8_scales(
        &self,
        name: &str,
        codes: &[u8],
        shape: &[usize],
    ) -> Result<(Vec<f32>, [usize; 2])> {
        if let Some((index, &code)) = codes.iter().enumerate().find(|(_, &c)| c & 0x7F == 0x7F) {
            return Err(DeepSeekError::Fp8Nan { name: name.to_string(), index, code });
        }
        let block = self.fp8_block.expect("checked: FP8 needs a block size");
        let grid = crate::fp8::scale_grid(shape[0], shape[1], block);
        let scales = self.read_f32(&Self::scale_name(name), &grid)?.into_vec().expect("f32 data");
        Ok((scales, block))
    }

    /// Dequantizes an FP8 weight with its block scales (checked by [`Checkpoint::check`]).
    fn read_fp8(&self, name: &str, codes: &[u8], shape: &[usize]) -> Result<TensorData> {
        let (scales, block) = self.fp8_scales(name, codes, shape)?;
        let q = crate::fp8::BlockQuant {
            rows: shape[0],
            cols: shape[1],
            block,
            codes: codes.to_vec(),
            scales,
        };
        Ok(TensorData::new(crate::fp8::dequantize_blocks(&q), shape.to_vec()))
    }

    fn searched(&self) -> String {
        let files: Vec<String> = self.shards.iter().map(|s| s.path.display().to_string()).collect();
        files.join(", ")
    }
}

/// An FP8 weight as stored: what [`Checkpoint::read_fp8_codes`] reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Codes {
    /// E4M3 codes, row-major as stored (`[out, in]`).
    pub codes: Vec<u8>,
    /// f32 block scales, row-major over the block grid (`weight_scale_inv`).
    pub scales: Vec<f32>,
    /// `[block_rows, block_cols]` (`weight_block_size`).
    pub block: [usize; 2],
}

/// Float data (f32 from dequantized FP8) rounded to `dtype`.
fn convert_data(data: TensorData, dtype: crate::dtype::WeightDtype) -> TensorData {
    use crate::dtype::WeightDtype;
    match dtype {
        WeightDtype::F32 => data.convert::<f32>(),
        WeightDtype::Bf16 | WeightDtype::F16 => {
            let shape = data.shape.clone();
            let values: Vec<f32> = data.convert::<f32>().into_vec().expect("float data");
            match dtype {
                WeightDtype::Bf16 => TensorData::new(
                    values.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>(),
                    shape,
                ),
                _ => TensorData::new(
                    values.into_iter().map(half::f16::from_f32).collect::<Vec<_>>(),
                    shape,
                ),
            }
        }
    }
}

impl Shard {
    /// Lets the kernel drop the mapped pages of bytes `offset..offset + len`, once read: a
    /// loaded tensor then no longer counts twice (as mapped file pages and as the model's
    /// copy), so loading peaks near the model's own size. Pages are re-read from the file if
    /// touched again. Best effort: a refusal only costs memory.
    fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        // SAFETY: the map is a read-only shared file mapping: dropping its pages loses nothing
        // (the next access faults them in from the file again) and no slice into it changes.
        let _ = unsafe {
            self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        };
        #[cfg(not(unix))]
        let _ = (offset, len);
    }

    fn open(path: PathBuf) -> Result<Self> {
        let file =
            File::open(&path).map_err(|source| DeepSeekError::Io { path: path.clone(), source })?;
        // SAFETY: the map is read-only; a checkpoint modified while loaded is outside our
        // contract, as for every memory-mapped loader.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|source| DeepSeekError::Io { path: path.clone(), source })?;
        // Validates the header and that the data section matches the file length, which
        // catches truncated downloads.
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            DeepSeekError::MalformedSafetensors { path: path.clone(), reason: e.to_string() }
        })?;
        Ok(Self { path, mmap, header_len, metadata })
    }
}
