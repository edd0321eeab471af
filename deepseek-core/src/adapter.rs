//! LoRA adapters on disk in PEFT's layout, so an adapter trained here loads in PEFT and a
//! PEFT-made adapter loads here:
//!
//! - `adapter_model.safetensors`: `base_model.model.<module path>.lora_A.weight` `[r, in]` and
//!   `…lora_B.weight` `[out, r]` per adapted projection (module paths as the checkpoint names
//!   them, `model.layers.3.self_attn.kv_b_proj`);
//! - `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha`, `use_rslora`,
//!   `target_modules`, `lora_dropout`, `bias: "none"`, `base_model_name_or_path`, and optional
//!   `rank_pattern` / `alpha_pattern` (per-module rank and alpha, keyed by module name).
//!
//! Fields PEFT writes that do not change the math are ignored; fields that change it in ways
//! not implemented here (DoRA, trained biases, `modules_to_save`, Conv1D `fan_in_fan_out`,
//! regular-expression patterns) are errors that say so, never silently dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::checkpoint::{table, write_atomic, write_safetensors, Checkpoint, NamedTensor, Target};
use crate::error::{DeepSeekError, Result};
use crate::finetune::{for_each_adaptable, for_each_routed_experts, DOWN_PARTS, GATE_UP_PARTS};
use crate::lora::{scale, Lora, LoraSettings, LoraTargets, ATTENTION_TARGETS, MLP_TARGETS};
use crate::model::DeepSeekModel;

/// The adapter's configuration file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What PEFT puts before every module path.
const PREFIX: &str = "base_model.model.";

/// `adapter_config.json`: the fields this crate reads and writes (others are ignored on read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Must be `LORA`.
    pub peft_type: String,
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Scale `alpha / √r` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The adapted module names (a list; PEFT also allows one regular expression).
    pub target_modules: Value,
    /// Dropout on the adapter input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which biases train: only `none` is implemented.
    #[serde(default = "none")]
    pub bias: String,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Per-module ranks (module name → r).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas (module name → alpha).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// PEFT's task type (`CAUSAL_LM`).
    #[serde(default)]
    pub task_type: Option<String>,
    /// DoRA (weight-decomposed LoRA): not implemented, rejected on read.
    #[serde(default)]
    pub use_dora: bool,
    /// Conv1D-style transposed weights: not how DeepSeek stores them, rejected on read.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Fully trained extra modules: not implemented, rejected on read when non-empty.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// A trainable bias in `lora_B`: not implemented, rejected on read.
    #[serde(default)]
    pub lora_bias: bool,
    /// Whether the adapter is for inference (PEFT writes `true` on save).
    #[serde(default)]
    pub inference_mode: bool,
}

fn none() -> String {
    "none".into()
}

impl AdapterConfig {
    /// The configuration of adapters made with `settings` on `targets`.
    pub fn new(settings: &LoraSettings, targets: &LoraTargets, base: Option<String>) -> Self {
        Self {
            peft_type: "LORA".into(),
            r: settings.rank,
            lora_alpha: settings.alpha,
            use_rslora: settings.rslora,
            target_modules: Value::from(targets.0.clone()),
            lora_dropout: settings.dropout,
            bias: none(),
            base_model_name_or_path: base,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            task_type: Some("CAUSAL_LM".into()),
            use_dora: false,
            fan_in_fan_out: false,
            modules_to_save: None,
            lora_bias: false,
            inference_mode: true,
        }
    }

    /// Reads `dir/adapter_config.json` and rejects what this crate does not implement.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| DeepSeekError::Io { path: path.clone(), source })?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| DeepSeekError::Json { path: path.clone(), reason: e.to_string() })?;
        config.check(&path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let fail = |problem: String| Err(DeepSeekError::Adapter { path: path.into(), problem });
        if self.peft_type != "LORA" {
            return fail(format!(
                "peft_type `{}`: only LORA adapters are supported",
                self.peft_type
            ));
        }
        if self.use_dora {
            return fail("use_dora: DoRA adapters are not supported (only plain LoRA)".into());
        }
        if self.bias != "none" || self.lora_bias {
            return fail(format!(
                "bias `{}` / lora_bias {}: adapters with trained biases are not supported",
                self.bias, self.lora_bias
            ));
        }
        if self.fan_in_fan_out {
            return fail("fan_in_fan_out: DeepSeek projections are not Conv1D layers".into());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return fail(format!(
                "modules_to_save {:?}: fully trained extra modules are not supported",
                self.modules_to_save.as_ref().expect("checked")
            ));
        }
        if self.r == 0 {
            return fail("r is 0: a LoRA rank must be at least 1".into());
        }
        let regex =
            |k: &str| k.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'));
        if let Some(k) =
            self.rank_pattern.keys().chain(self.alpha_pattern.keys()).find(|k| regex(k))
        {
            return fail(format!(
                "pattern `{k}`: regular-expression patterns are not supported, only module names"
            ));
        }
        let known: Vec<&str> = ATTENTION_TARGETS.iter().chain(&MLP_TARGETS).copied().collect();
        match &self.target_modules {
            Value::Array(names) => {
                for name in names {
                    let Some(name) = name.as_str() else {
                        return fail(format!("target_modules holds {name}, not a module name"));
                    };
                    let last = name.rsplit('.').next().unwrap_or(name);
                    if !known.contains(&last) {
                        return fail(format!(
                            "target module `{name}` is not a DeepSeek projection (known: {}): the adapter is for another model type",
                            known.join(", ")
                        ));
                    }
                }
            }
            // A regular expression (PEFT matches it against full module paths): the tensors
            // below say which modules it adapted.
            Value::String(_) => {}
            other => return fail(format!("target_modules is {other}, expected a list of names")),
        }
        Ok(())
    }

    /// The rank and scale of the adapter at module `path` (patterns match the path's trailing
    /// components, as PEFT matches them).
    fn rank_and_scale(&self, path: &str, rank: usize) -> f64 {
        let matches = |key: &String| path == key || path.ends_with(&format!(".{key}"));
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| matches(k))
            .map_or(self.lora_alpha, |(_, a)| *a);
        scale(alpha, rank, self.use_rslora)
    }
}

/// `dir/adapter_config.json` and `dir/adapter_model.safetensors` of the adapters in `model`,
/// each written atomically. Fails if the model has none.
pub fn save_adapter<B: Backend>(
    model: &DeepSeekModel<B>,
    dir: &Path,
    config: &AdapterConfig,
) -> Result<()> {
    let mut model = model.clone();
    let mut tensors = Vec::new();
    // What the file holds, not what was asked for: the module names adapted, and the modules
    // whose rank or scale differ from the defaults as patterns.
    let mut config = config.clone();
    let mut names: Vec<String> = Vec::new();
    for_each_adaptable(&mut model, |path, projection| {
        if let Some(lora) = &projection.lora {
            let name = path.rsplit('.').next().unwrap_or(path).to_string();
            if !names.contains(&name) {
                names.push(name);
            }
            let rank = lora.rank();
            if rank != config.r {
                config.rank_pattern.insert(path.to_string(), rank);
            }
            let default = scale(config.lora_alpha, rank, config.use_rslora);
            if (lora.scale - default).abs() > 1e-12 * default.abs().max(1.0) {
                let per_alpha = scale(1.0, rank, config.use_rslora);
                config.alpha_pattern.insert(path.to_string(), lora.scale / per_alpha);
            }
            // Burn `[in, r]` / `[r, out]` → PEFT `[r, in]` / `[out, r]`.
            for (name, t) in [("lora_A", lora.a.val()), ("lora_B", lora.b.val())] {
                let t = t.transpose();
                let shape = t.dims().to_vec();
                let values = t.into_data().convert::<f32>().into_vec().expect("f32 weights");
                tensors.push(NamedTensor {
                    name: format!("{PREFIX}{path}.{name}.weight"),
                    shape,
                    values,
                });
            }
        }
        Ok(())
    })?;
    for_each_routed_experts(&mut model, |prefix, routed| {
        for (projection, parts) in
            [(&routed.gate_up, &GATE_UP_PARTS[..]), (&routed.down, &DOWN_PARTS[..])]
        {
            let Some(lora) = &projection.lora else { continue };
            let (r, n_parts) = (lora.rank(), parts.len());
            let [experts, d_in, pr] = lora.a.dims();
            let [_, _, d_part] = lora.b.dims();
            let host = |t: Tensor<B, 3>| -> Vec<f32> {
                t.into_data().convert::<f32>().into_vec().expect("f32 weights")
            };
            let (a, b) = (host(lora.a.val()), host(lora.b.val()));
            let per_alpha = scale(1.0, r, config.use_rslora);
            let default = scale(config.lora_alpha, r, config.use_rslora);
            for e in 0..experts {
                for (p, part) in parts.iter().enumerate() {
                    let path = format!("{prefix}.{e}.{part}");
                    if !names.contains(&part.to_string()) {
                        names.push(part.to_string());
                    }
                    if r != config.r {
                        config.rank_pattern.insert(path.clone(), r);
                    }
                    if (lora.scale - default).abs() > 1e-12 * default.abs().max(1.0) {
                        config.alpha_pattern.insert(path.clone(), lora.scale / per_alpha);
                    }
                    // PEFT lora_A [r, in]: (j, i) = a[e, i, p·r + j]; lora_B [out_p, r]:
                    // (o, j) = b[e, p·r + j, o].
                    let a_t: Vec<f32> = (0..r)
                        .flat_map(|j| (0..d_in).map(move |i| (i, j)))
                        .map(|(i, j)| a[(e * d_in + i) * pr + p * r + j])
                        .collect();
                    let b_t: Vec<f32> = (0..d_part)
                        .flat_map(|o| (0..r).map(move |j| (o, j)))
                        .map(|(o, j)| b[(e * pr + p * r + j) * d_part + o])
                        .collect();
                    debug_assert_eq!(pr, n_parts * r);
                    tensors.push(NamedTensor {
                        name: format!("{PREFIX}{path}.lora_A.weight"),
                        shape: vec![r, d_in],
                        values: a_t,
                    });
                    tensors.push(NamedTensor {
                        name: format!("{PREFIX}{path}.lora_B.weight"),
                        shape: vec![d_part, r],
                        values: b_t,
                    });
                }
            }
        }
        Ok(())
    })?;
    config.target_modules = Value::from(names);
    let config = &config;
    if tensors.is_empty() {
        return Err(DeepSeekError::Adapter {
            path: dir.into(),
            problem: "the model has no adapters to save".into(),
        });
    }
    std::fs::create_dir_all(dir)
        .map_err(|source| DeepSeekError::Io { path: dir.into(), source })?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), &tensors, Some(metadata))?;
    let json = serde_json::to_string_pretty(config).expect("adapter config serializes");
    write_atomic(&dir.join(ADAPTER_CONFIG_FILE), json.as_bytes())
}

/// `model` with the adapters of `dir` (PEFT layout) on its projections, applied unmerged. Every
/// tensor of the file must belong to a projection of this model with the right shape.
pub fn load_adapter<B: Backend>(model: DeepSeekModel<B>, dir: &Path) -> Result<DeepSeekModel<B>> {
    let config = AdapterConfig::read(dir)?;
    let file = dir.join(ADAPTER_WEIGHTS_FILE);
    let weights = Checkpoint::open_file(&file)?;
    let device = model.embed_tokens.weight.device();
    let mut model = model;
    let mut used = BTreeSet::new();
    let bad = |problem: String| DeepSeekError::Adapter { path: file.clone(), problem };
    for_each_adaptable(&mut model, |path, projection| {
        let a_name = format!("{PREFIX}{path}.lora_A.weight");
        let b_name = format!("{PREFIX}{path}.lora_B.weight");
        let (a, b) = (weights.stored(&a_name), weights.stored(&b_name));
        let (a, b) = match (a, b) {
            (None, None) => return Ok(()),
            (Some(a), Some(b)) => (a, b),
            _ => return Err(bad(format!("`{path}` has only one of lora_A and lora_B"))),
        };
        let [d_in, d_out] = projection.dims();
        let rank = a.shape.first().copied().unwrap_or(0);
        if a.shape != [rank, d_in] || b.shape != [d_out, rank] || rank == 0 {
            return Err(bad(format!(
                "`{path}`: lora_A is {:?} and lora_B {:?}, but this model's projection is [{d_out}, {d_in}] (expected lora_A [r, {d_in}], lora_B [{d_out}, r]): the adapter was trained on another model",
                a.shape, b.shape
            )));
        }
        let read = |name: &str, rows: usize, cols: usize| -> Result<Tensor<B, 2>> {
            let data = weights.read_f32(name, &[rows, cols])?;
            Ok(Tensor::<B, 2>::from_data(data, &device).transpose())
        };
        let a_t = read(&a_name, rank, d_in)?; // [in, r]
        let b_t = read(&b_name, d_out, rank)?; // [r, out]
        let s = config.rank_and_scale(path, rank);
        projection.lora = Some(Lora::from_tensors(a_t, b_t, s, config.lora_dropout));
        used.insert(a_name);
        used.insert(b_name);
        Ok(())
    })?;
    for_each_routed_experts(&mut model, |prefix, routed| {
        for (projection, parts) in
            [(&mut routed.gate_up, &GATE_UP_PARTS[..]), (&mut routed.down, &DOWN_PARTS[..])]
        {
            let [experts, d_in, d_out] = projection.dims();
            let d_part = d_out / parts.len();
            let name =
                |e: usize, part: &str, m: &str| format!("{PREFIX}{prefix}.{e}.{part}.{m}.weight");
            let present = (0..experts)
                .flat_map(|e| parts.iter().map(move |p| (e, *p)))
                .filter(|(e, p)| weights.stored(&name(*e, p, "lora_A")).is_some())
                .count();
            if present == 0 {
                continue;
            }
            if present != experts * parts.len() {
                return Err(bad(format!(
                    "{prefix}: adapters on {present} of the {} routed-expert maps ({}); this crate needs all or none",
                    experts * parts.len(),
                    parts.join(", ")
                )));
            }
            let first = name(0, parts[0], "lora_A");
            let r = weights.stored(&first).and_then(|t| t.shape.first().copied()).unwrap_or(0);
            if r == 0 {
                return Err(bad(format!(
                    "`{first}`: rank 0 (or not a matrix): a LoRA rank must be at least 1"
                )));
            }
            let s = config.rank_and_scale(&format!("{prefix}.0.{}", parts[0]), r);
            let pr = parts.len() * r;
            let (mut a, mut b) =
                (vec![0f32; experts * d_in * pr], vec![0f32; experts * pr * d_part]);
            for e in 0..experts {
                for (p, part) in parts.iter().enumerate() {
                    let path = format!("{prefix}.{e}.{part}");
                    if (config.rank_and_scale(&path, r) - s).abs() > 1e-12 * s.abs().max(1.0) {
                        return Err(bad(format!(
                            "`{path}`: routed experts with different scales are not supported"
                        )));
                    }
                    let (an, bn) = (name(e, part, "lora_A"), name(e, part, "lora_B"));
                    let shapes = (
                        weights.stored(&an).map(|t| t.shape),
                        weights.stored(&bn).map(|t| t.shape),
                    );
                    if shapes != (Some(vec![r, d_in]), Some(vec![d_part, r])) {
                        return Err(bad(format!(
                            "`{path}`: lora_A/lora_B are {:?}/{:?}, expected [{r}, {d_in}]/[{d_part}, {r}] (one rank for all experts, shapes of this model)",
                            shapes.0, shapes.1
                        )));
                    }
                    let host = |n: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
                        Ok(weights.read_f32(n, &shape)?.into_vec().expect("read_f32 gives f32"))
                    };
                    let (a_t, b_t) = (host(&an, [r, d_in])?, host(&bn, [d_part, r])?);
                    for j in 0..r {
                        for i in 0..d_in {
                            a[(e * d_in + i) * pr + p * r + j] = a_t[j * d_in + i];
                        }
                        for o in 0..d_part {
                            b[(e * pr + p * r + j) * d_part + o] = b_t[o * r + j];
                        }
                    }
                    used.insert(an);
                    used.insert(bn);
                }
            }
            let a = Tensor::from_data(TensorData::new(a, [experts, d_in, pr]), &device);
            let b = Tensor::from_data(TensorData::new(b, [experts, pr, d_part]), &device);
            projection.lora = Some(Lora::from_stacked(a, b, parts.len(), s, config.lora_dropout));
        }
        Ok(())
    })?;
    let unused: Vec<&str> = weights.names().filter(|n| !used.contains(*n)).collect();
    if let Some(first) = unused.first() {
        return Err(bad(format!(
            "{} tensor(s) target modules this model does not have, e.g. `{first}`: the adapter is for another model type or size",
            unused.len()
        )));
    }
    if used.is_empty() {
        return Err(bad("the file holds no lora_A/lora_B tensors".into()));
    }
    let biases = dir.join(ROUTER_BIAS_FILE);
    if biases.is_file() {
        model = load_router_biases(model, &biases)?;
    }
    Ok(model)
}

/// A fine-tune that kept the auxiliary-loss-free bias updates on changed the routers'
/// `e_score_correction_bias`: this file beside the adapter holds them (checkpoint names, F32).
/// PEFT does not read it; [`load_adapter`] applies it when present.
pub const ROUTER_BIAS_FILE: &str = "router_bias.safetensors";

/// Writes every router's correction bias to `path` (atomically).
pub fn save_router_biases<B: Backend>(model: &DeepSeekModel<B>, path: &Path) -> Result<()> {
    let mut model = model.clone();
    let mut tensors = Vec::new();
    for row in table::<B>(&model.config.clone()) {
        if let Target::Vector(get) = row.target {
            let t = get(&mut model, row.index).val();
            let values = t.into_data().convert::<f32>().into_vec().expect("f32 bias");
            tensors.push(NamedTensor { name: row.name.clone(), shape: row.shape.clone(), values });
        }
    }
    write_safetensors(path, &tensors, None)
}

/// Replaces the routers' correction biases with those in `path`.
pub fn load_router_biases<B: Backend>(
    mut model: DeepSeekModel<B>,
    path: &Path,
) -> Result<DeepSeekModel<B>> {
    let file = Checkpoint::open_file(path)?;
    let device = model.embed_tokens.weight.device();
    for row in table::<B>(&model.config.clone()) {
        if let Target::Vector(get) = row.target {
            let data = file.read_f32(&row.name, &row.shape)?;
            *get(&mut model, row.index) =
                Param::from_tensor(Tensor::from_data(data, &device)).set_require_grad(false);
        }
    }
    Ok(model)
}
