//! Training checkpoints: everything a run needs to continue exactly.
//!
//! `<out>/checkpoints/step-00000100/` holds the model in Hugging Face layout (`config.json`,
//! `model.safetensors` in f32, balancing biases included), `optimizer.safetensors` (AdamW
//! moments) and `state.json` (step, optimizer step, data position, seed, settings). The data
//! order is a function of the seed and the position, and the model has no other randomness, so
//! this is the whole RNG state. A LoRA fine-tune's checkpoint holds its adapters in PEFT's
//! layout (`adapter_config.json`, `adapter_model.safetensors`) and the routers' biases instead
//! of the model: the frozen base is read again from `base_model`.
//!
//! A checkpoint is written into `.step-00000100.partial/` and renamed into place when complete:
//! a crash during a save leaves the previous checkpoints untouched and a partial directory that
//! [`latest`] ignores and the next save removes.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use deepseek_core::adapter::{
    load_adapter, save_adapter, save_router_biases, AdapterConfig, ROUTER_BIAS_FILE,
};
use deepseek_core::checkpoint::{write_atomic, write_safetensors, NamedTensor};
use deepseek_core::{DeepSeekConfig, DeepSeekModel, LoadOptions};
use serde::{Deserialize, Serialize};

use crate::config::{RouterMode, TrainConfig};
use crate::data::DataConfig;
use crate::error::{Result, TrainError};
use crate::optim::{param_sizes, AdamW};

/// Subdirectory of the run directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// AdamW's step count (differs from `step` when updates were skipped).
    pub adam_step: u64,
    /// Training windows consumed (the data position).
    pub position: u64,
    pub tokens: u64,
    pub seed: u64,
    /// Wall time of the run so far, seconds.
    pub elapsed_s: f64,
    pub train: TrainConfig,
    pub data: DataConfig,
    /// The loss scale of an f16 run ([`crate::precision`]).
    #[serde(default)]
    pub loss_scale: Option<crate::precision::LossScale>,
}

/// A checkpoint read back.
pub struct Loaded<AB: AutodiffBackend> {
    pub model: DeepSeekModel<AB>,
    pub optim: AdamW<AB::InnerBackend>,
    pub state: TrainState,
    pub dir: PathBuf,
}

fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(CHECKPOINTS_DIR).join(format!("step-{step:08}"))
}

/// Writes a checkpoint of `step` and keeps only the newest `keep` ones.
pub fn save<AB: AutodiffBackend>(
    out: &Path,
    model: &DeepSeekModel<AB>,
    optim: &AdamW<AB::InnerBackend>,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    save_interruptible(out, model, optim, state, keep, None)
}

/// [`save`] that stops, as a crash would, after writing `stop_after` of its files (for tests).
#[doc(hidden)]
pub fn save_interruptible<AB: AutodiffBackend>(
    out: &Path,
    model: &DeepSeekModel<AB>,
    optim: &AdamW<AB::InnerBackend>,
    state: &TrainState,
    keep: usize,
    stop_after: Option<usize>,
) -> Result<PathBuf> {
    let root = out.join(CHECKPOINTS_DIR);
    let final_dir = step_dir(out, state.step);
    let partial = root.join(format!(".step-{:08}.partial", state.step));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
    let crash = |written: usize| -> Result<()> {
        match stop_after {
            Some(n) if written >= n => Err(TrainError::checkpoint(&partial, "interrupted (test)")),
            _ => Ok(()),
        }
    };
    match state.train.finetune.as_ref().and_then(|f| f.lora.as_ref().map(|l| (f, l))) {
        // LoRA: the adapters (PEFT layout) and the routers' biases; the frozen base stays where
        // `base_model` points.
        Some((finetune, lora)) => {
            let config = serde_json::to_string_pretty(&model.config.to_hf_json())
                .expect("JSON values serialize");
            write_atomic(&partial.join("config.json"), config.as_bytes())?;
            let adapter = AdapterConfig::new(
                &lora.settings(),
                &lora.targets(),
                Some(finetune.base_model.display().to_string()),
            );
            save_adapter(model, &partial, &adapter)?;
            save_router_biases(model, &partial.join(ROUTER_BIAS_FILE))?;
        }
        None => deepseek_core::save_model(model, &partial)?, // config.json + model.safetensors
    }
    crash(2)?;
    write_safetensors(&partial.join(OPTIMIZER_FILE), &optim.state_tensors(), None)?;
    crash(3)?;
    let json = serde_json::to_string_pretty(state).expect("state serializes");
    write_atomic(&partial.join(STATE_FILE), json.as_bytes())?;
    if final_dir.exists() {
        // Saving the same step again (a resumed run that ends where it began).
        std::fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    }
    std::fs::rename(&partial, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    prune(&root, keep)?;
    Ok(final_dir)
}

/// Complete checkpoints under `out`, oldest first.
pub fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let root = out.join(CHECKPOINTS_DIR);
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(STATE_FILE).is_file().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint under `out`.
pub fn latest(out: &Path) -> Option<(usize, PathBuf)> {
    list(out).pop()
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root.parent().expect("checkpoints dir has a parent"));
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    // Leftovers of interrupted saves.
    for entry in std::fs::read_dir(root).map_err(|e| TrainError::io(root, e))?.flatten() {
        if entry.file_name().to_string_lossy().ends_with(".partial") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// The `state.json` of the checkpoint in `dir`.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE))
        .map_err(|e| TrainError::io(&dir.join(STATE_FILE), e))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::checkpoint(dir, format!("malformed {STATE_FILE}: {e}")))
}

/// Reads the checkpoint in `dir`; fails if its model configuration differs from `expected`.
pub fn load<AB: AutodiffBackend>(
    dir: &Path,
    expected: &DeepSeekConfig,
    device: &AB::Device,
) -> Result<Loaded<AB>> {
    let state = read_state(dir)?;
    let saved = DeepSeekConfig::from_hf_file(dir)?;
    if &saved != expected {
        return Err(TrainError::checkpoint(
            dir,
            format!("it holds a different model (saved: {} layers, hidden {}, vocab {}, {} experts, MTP depth {}; requested: {} layers, hidden {}, vocab {}, {} experts, MTP depth {}); use another --out or the same preset and flags",
                saved.num_hidden_layers, saved.hidden_size, saved.vocab_size, saved.n_routed_experts, saved.num_nextn_predict_layers,
                expected.num_hidden_layers, expected.hidden_size, expected.vocab_size, expected.n_routed_experts, expected.num_nextn_predict_layers),
        ));
    }
    let lora = state.train.finetune.as_ref().filter(|f| f.lora.is_some());
    let model: DeepSeekModel<AB> = match lora {
        Some(finetune) => {
            let base: DeepSeekModel<AB> = deepseek_core::checkpoint::load_model(
                &finetune.base_model,
                device,
                // As the run loaded it (`sft`): an FP8 base resident under LoRA.
                LoadOptions::default().with_dtype(finetune.base_dtype),
            )?;
            load_adapter(base, dir)?.freeze()
        }
        None => {
            // A mixed-precision run's weights are its f32 masters rounded to its dtype: saved
            // widened, read back rounded, exactly (the masters are in the optimizer state).
            let model: DeepSeekModel<AB> = deepseek_core::checkpoint::load_model(
                dir,
                device,
                LoadOptions::default().with_dequantize_fp8(true).with_dtype(state.train.dtype),
            )?;
            // A full fine-tune with a frozen router keeps it frozen after a resume.
            let frozen =
                state.train.finetune.as_ref().is_some_and(|f| f.router == RouterMode::Frozen);
            if frozen {
                model.freeze_routers()
            } else {
                model
            }
        }
    };
    let opt_path = dir.join(OPTIMIZER_FILE);
    let ckpt_tensors = read_all(&opt_path)?;
    let mut optim = AdamW::new(state.train.optim);
    let inner_device = burn::tensor::Tensor::<AB, 1>::zeros([1], device).inner().device();
    optim.load_state(state.adam_step, ckpt_tensors, &param_sizes(&model), &inner_device)?;
    Ok(Loaded { model, optim, state, dir: dir.to_path_buf() })
}

fn read_all(path: &Path) -> Result<Vec<NamedTensor>> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| TrainError::checkpoint(path, format!("malformed or truncated: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(TrainError::checkpoint(
                path,
                format!("`{name}` is {:?}, expected F32", view.dtype()),
            ));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        out.push(NamedTensor { name, shape: view.shape().to_vec(), values });
    }
    Ok(out)
}
