//! Reading Hugging Face `config.json` into [`DeepSeekConfig`], once, in both styles seen in the
//! wild: DeepSeek's original files (`rope_theta` + `rope_scaling: {type: yarn}`, `scoring_func`,
//! `topk_method`, `quantization_config`) and transformers 5.x files (`rope_parameters`,
//! `rope_interleave`, `head_dim`). Unknown keys are ignored; keys we cannot honour are errors.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{
    yarn_mscale, DeepSeekConfig, Fp8Quantization, RopeConfig, ScoringFunc, TopkMethod, YarnConfig,
};
use crate::error::{DeepSeekError, Result};

/// The raw file, field names as Hugging Face writes them. Everything optional is resolved in
/// [`HfConfig::resolve`].
#[derive(Debug, Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    first_k_dense_replace: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    head_dim: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    routed_scaling_factor: Option<f64>,
    norm_topk_prob: Option<bool>,
    scoring_func: Option<String>,
    topk_method: Option<String>,
    moe_layer_freq: Option<usize>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    rope_interleave: Option<bool>,
    num_nextn_predict_layers: Option<usize>,
    quantization_config: Option<Value>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

impl DeepSeekConfig {
    /// Reads and validates `DIR/config.json` (or the file itself if `path` is a file).
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file)
            .map_err(|source| DeepSeekError::Io { path: file.clone(), source })?;
        Self::from_hf_json(&text).map_err(|e| match e {
            DeepSeekError::Json { reason, .. } => DeepSeekError::Json { path: file, reason },
            other => other,
        })
    }

    /// Parses the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| DeepSeekError::Json {
            path: "config.json".into(),
            reason: e.to_string(),
        })?;
        let cfg = raw.resolve()?;
        cfg.validate()?;
        Ok(cfg)
    }
}

impl DeepSeekConfig {
    /// The configuration as a Hugging Face `config.json` in DeepSeek's original style (the one
    /// the released V3 checkpoint uses), readable by [`DeepSeekConfig::from_hf_json`] and by
    /// transformers. Resolved values are written back in the form that resolves to them again.
    pub fn to_hf_json(&self) -> Value {
        let v2 = self.scoring_func == ScoringFunc::Softmax && !self.topk_method.has_bias();
        let mut obj = serde_json::json!({
            "architectures": [if v2 { "DeepseekV2ForCausalLM" } else { "DeepseekV3ForCausalLM" }],
            "model_type": if v2 { "deepseek_v2" } else { "deepseek_v3" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "first_k_dense_replace": self.first_k_dense_replace,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_layer_freq": 1,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "norm_topk_prob": self.norm_topk_prob,
            "scoring_func": match self.scoring_func { ScoringFunc::Sigmoid => "sigmoid", ScoringFunc::Softmax => "softmax" },
            "topk_method": match self.topk_method {
                TopkMethod::Greedy => "greedy",
                TopkMethod::GroupLimited => "group_limited_greedy",
                TopkMethod::NoAuxTc => "noaux_tc",
            },
            "hidden_act": "silu",
            "attention_bias": false,
            "tie_word_embeddings": false,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_interleave": self.rope.interleaved,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        });
        let map = obj.as_object_mut().expect("built as an object");
        if let Some(y) = self.rope.yarn {
            // `mscale = mscale_all_dim` makes the cos/sin factor 1; any other resolved factor is
            // written explicitly as `attention_factor`, which both readers honour.
            let mut scaling = serde_json::json!({
                "type": "yarn",
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "mscale": y.mscale_all_dim,
                "mscale_all_dim": y.mscale_all_dim,
                "truncate": y.truncate,
            });
            let implied = if y.mscale_all_dim != 0.0 { 1.0 } else { yarn_mscale(y.factor, 1.0) };
            if y.attention_factor != implied {
                scaling["attention_factor"] = y.attention_factor.into();
            }
            map.insert("rope_scaling".into(), scaling);
        }
        if let Some(q) = self.quantization {
            map.insert(
                "quantization_config".into(),
                serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": q.weight_block_size}),
            );
        }
        obj
    }
}

fn required<T>(value: Option<T>, field: &str) -> Result<T> {
    value.ok_or_else(|| DeepSeekError::config(field, "is required but missing"))
}

fn get_f64(obj: &Value, key: &str, section: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| {
            DeepSeekError::config(format!("{section}.{key}"), format!("must be a number, got {v}"))
        }),
    }
}

fn token_id(value: Option<Value>, field: &str) -> Result<Option<u32>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|v| Some(v as u32))
            .ok_or_else(|| DeepSeekError::config(field, format!("must be a token id, got {n}"))),
        // Some configs list several EOS ids; the first is the canonical one.
        Some(Value::Array(items)) => token_id(items.into_iter().next(), field),
        Some(other) => {
            Err(DeepSeekError::config(field, format!("must be a token id, got {other}")))
        }
    }
}

impl HfConfig {
    fn resolve(self) -> Result<DeepSeekConfig> {
        let is_v2 = self.check_architecture()?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(DeepSeekError::config(
                    "hidden_act",
                    format!("only `silu` (SwiGLU) is implemented, got `{act}`"),
                ));
            }
        }
        if self.attention_bias == Some(true) {
            return Err(DeepSeekError::config(
                "attention_bias",
                "DeepSeek attention has no biases; `true` is not supported",
            ));
        }
        if self.tie_word_embeddings == Some(true) {
            return Err(DeepSeekError::config(
                "tie_word_embeddings",
                "DeepSeek models have an untied lm_head; `true` is not supported",
            ));
        }
        if let Some(freq) = self.moe_layer_freq {
            if freq != 1 {
                return Err(DeepSeekError::config(
                    "moe_layer_freq",
                    format!(
                        "only 1 (every layer after first_k_dense_replace) is supported, got {freq}"
                    ),
                ));
            }
        }
        let heads = required(self.num_attention_heads, "num_attention_heads")?;
        if let Some(kv_heads) = self.num_key_value_heads {
            // MLA has no KV heads of its own; HF configs repeat the head count here.
            if kv_heads != heads {
                return Err(DeepSeekError::config(
                    "num_key_value_heads",
                    format!(
                        "MLA expects it equal to num_attention_heads ({heads}), got {kv_heads}"
                    ),
                ));
            }
        }
        let qk_rope_head_dim = required(self.qk_rope_head_dim, "qk_rope_head_dim")?;
        if let Some(head_dim) = self.head_dim {
            // transformers 5.x uses `head_dim` as the rotary width.
            if head_dim != qk_rope_head_dim {
                return Err(DeepSeekError::config("head_dim", format!("transformers uses it as the rotary width and it must equal qk_rope_head_dim ({qk_rope_head_dim}), got {head_dim}")));
            }
        }
        let max_position_embeddings =
            required(self.max_position_embeddings, "max_position_embeddings")?;
        let rope = self.resolve_rope(max_position_embeddings)?;
        let (default_scoring, default_method) = if is_v2 {
            (ScoringFunc::Softmax, TopkMethod::Greedy)
        } else {
            (ScoringFunc::Sigmoid, TopkMethod::NoAuxTc)
        };
        let scoring_func = match self.scoring_func.as_deref() {
            None => default_scoring,
            Some("sigmoid") => ScoringFunc::Sigmoid,
            Some("softmax") => ScoringFunc::Softmax,
            Some(other) => {
                return Err(DeepSeekError::config(
                    "scoring_func",
                    format!("expected `sigmoid` or `softmax`, got `{other}`"),
                ))
            }
        };
        let topk_method = match self.topk_method.as_deref() {
            None => default_method,
            Some("greedy") => TopkMethod::Greedy,
            Some("group_limited_greedy") => TopkMethod::GroupLimited,
            Some("noaux_tc") => TopkMethod::NoAuxTc,
            Some(other) => {
                return Err(DeepSeekError::config(
                    "topk_method",
                    format!(
                        "expected `greedy`, `group_limited_greedy` or `noaux_tc`, got `{other}`"
                    ),
                ))
            }
        };
        let n_routed_experts = self.n_routed_experts.unwrap_or(0);
        Ok(DeepSeekConfig {
            vocab_size: required(self.vocab_size, "vocab_size")?,
            hidden_size: required(self.hidden_size, "hidden_size")?,
            num_hidden_layers: required(self.num_hidden_layers, "num_hidden_layers")?,
            first_k_dense_replace: self.first_k_dense_replace.unwrap_or(0),
            intermediate_size: self.intermediate_size.unwrap_or(0),
            moe_intermediate_size: self.moe_intermediate_size.unwrap_or(0),
            num_attention_heads: heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: required(self.kv_lora_rank, "kv_lora_rank")?,
            qk_nope_head_dim: required(self.qk_nope_head_dim, "qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: required(self.v_head_dim, "v_head_dim")?,
            n_routed_experts,
            n_shared_experts: self.n_shared_experts.unwrap_or(0),
            num_experts_per_tok: if n_routed_experts > 0 {
                required(self.num_experts_per_tok, "num_experts_per_tok")?
            } else {
                0
            },
            n_group: self.n_group.unwrap_or(1),
            topk_group: self.topk_group.unwrap_or(1),
            routed_scaling_factor: self.routed_scaling_factor.unwrap_or(1.0),
            norm_topk_prob: self.norm_topk_prob.unwrap_or(!is_v2),
            scoring_func,
            topk_method,
            rope,
            max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            num_nextn_predict_layers: self.num_nextn_predict_layers.unwrap_or(0),
            quantization: resolve_quantization(self.quantization_config.as_ref())?,
            bos_token_id: token_id(self.bos_token_id, "bos_token_id")?,
            eos_token_id: token_id(self.eos_token_id, "eos_token_id")?,
        })
    }

    /// Returns whether this is a V2-family config (softmax routing defaults).
    fn check_architecture(&self) -> Result<bool> {
        const V3: [&str; 2] = ["DeepseekV3ForCausalLM", "DeepseekV3Model"];
        const V2: [&str; 2] = ["DeepseekV2ForCausalLM", "DeepseekV2Model"];
        if let Some(archs) = &self.architectures {
            for arch in archs {
                if !V3.contains(&arch.as_str()) && !V2.contains(&arch.as_str()) {
                    return Err(DeepSeekError::UnknownArchitecture { found: arch.clone() });
                }
            }
        }
        match self.model_type.as_deref() {
            Some("deepseek_v3") => Ok(false),
            Some("deepseek_v2") => Ok(true),
            Some(other) => {
                Err(DeepSeekError::UnknownArchitecture { found: format!("model_type {other}") })
            }
            None => Ok(self
                .architectures
                .as_ref()
                .is_some_and(|a| a.iter().any(|x| V2.contains(&x.as_str())))),
        }
    }

    /// Both styles carry the same information: `rope_theta` + `rope_scaling` (original) or one
    /// `rope_parameters` object with `rope_type` and `rope_theta` inside (transformers 5.x).
    fn resolve_rope(&self, max_position_embeddings: usize) -> Result<RopeConfig> {
        let (section, params) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
            (_, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
            _ => ("rope_scaling", None),
        };
        if let Some(p) = params {
            if !p.is_object() {
                return Err(DeepSeekError::config(section, format!("must be an object, got {p}")));
            }
        }
        let theta = params
            .map(|p| get_f64(p, "rope_theta", section))
            .transpose()?
            .flatten()
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let kind = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str);
        let yarn = match kind {
            None | Some("default") => None,
            Some("yarn") => {
                let p = params.expect("kind came from params");
                let factor =
                    required(get_f64(p, "factor", section)?, &format!("{section}.factor"))?;
                let original = get_f64(p, "original_max_position_embeddings", section)?
                    .map(|v| v as usize)
                    .unwrap_or(max_position_embeddings);
                let mscale = get_f64(p, "mscale", section)?;
                let mscale_all_dim = get_f64(p, "mscale_all_dim", section)?;
                // The cos/sin factor as transformers resolves it (`_compute_yarn_parameters`).
                let attention_factor =
                    match (get_f64(p, "attention_factor", section)?, mscale, mscale_all_dim) {
                        (Some(f), _, _) => f,
                        (None, Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    };
                let truncate = match p.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => {
                        return Err(DeepSeekError::config(
                            format!("{section}.truncate"),
                            format!("must be a boolean, got {v}"),
                        ))
                    }
                };
                Some(YarnConfig {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: get_f64(p, "beta_fast", section)?.unwrap_or(32.0),
                    beta_slow: get_f64(p, "beta_slow", section)?.unwrap_or(1.0),
                    mscale_all_dim: mscale_all_dim.unwrap_or(0.0),
                    attention_factor,
                    truncate,
                })
            }
            Some(other) => {
                return Err(DeepSeekError::config(
                    format!("{section}.type"),
                    format!("only `yarn` (or no scaling) is implemented, got `{other}`"),
                ))
            }
        };
        Ok(RopeConfig { theta, yarn, interleaved: self.rope_interleave.unwrap_or(true) })
    }
}

fn resolve_quantization(q: Option<&Value>) -> Result<Option<Fp8Quantization>> {
    let Some(q) = q.filter(|q| !q.is_null()) else { return Ok(None) };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "fp8" {
        return Err(DeepSeekError::config(
            "quantization_config.quant_method",
            format!("only `fp8` block quantization is supported, got `{method}`"),
        ));
    }
    if let Some(fmt) = q.get("fmt").and_then(Value::as_str) {
        if fmt != "e4m3" {
            return Err(DeepSeekError::config(
                "quantization_config.fmt",
                format!("only `e4m3` is supported, got `{fmt}`"),
            ));
        }
    }
    let block = match q.get("weight_block_size") {
        Some(Value::Array(a)) if a.len() == 2 => {
            let dims: Vec<Option<u64>> = a.iter().map(Value::as_u64).collect();
            match dims[..] {
                [Some(r), Some(c)] if r > 0 && c > 0 => [r as usize, c as usize],
                _ => {
                    return Err(DeepSeekError::config(
                        "quantization_config.weight_block_size",
                        format!("must be two positive integers, got {a:?}"),
                    ))
                }
            }
        }
        None => [128, 128],
        Some(other) => {
            return Err(DeepSeekError::config(
                "quantization_config.weight_block_size",
                format!("must be [rows, cols], got {other}"),
            ))
        }
    };
    Ok(Some(Fp8Quantization { weight_block_size: block }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_original_json() -> String {
        r#"{
          "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
          "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
          "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
          "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
          "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5,
          "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
          "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
          "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
          "norm_topk_prob": true, "scoring_func": "sigmoid", "hidden_act": "silu",
          "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "bos_token_id": 0,
          "eos_token_id": 1, "tie_word_embeddings": false, "rope_theta": 10000,
          "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
          "attention_bias": false,
          "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
            "quant_method": "fp8", "weight_block_size": [128, 128]}
        }"#
        .to_string()
    }

    #[test]
    fn written_config_reads_back_equal() {
        for name in DeepSeekConfig::PRESETS {
            let cfg = DeepSeekConfig::preset(name).unwrap();
            let text = serde_json::to_string_pretty(&cfg.to_hf_json()).unwrap();
            assert_eq!(DeepSeekConfig::from_hf_json(&text).unwrap(), cfg, "{name}");
        }
        let mut cfg = DeepSeekConfig::tiny();
        cfg.rope.yarn.as_mut().unwrap().attention_factor = 1.25;
        cfg.rope.interleaved = false;
        let text = cfg.to_hf_json().to_string();
        assert_eq!(DeepSeekConfig::from_hf_json(&text).unwrap(), cfg);
    }

    #[test]
    fn released_v3_config_equals_the_preset() {
        let cfg = DeepSeekConfig::from_hf_json(&v3_original_json()).unwrap();
        assert_eq!(cfg, DeepSeekConfig::v3_671b());
    }

    #[test]
    fn v5_style_rope_parameters_are_read() {
        let json = v3_original_json()
            .replace(r#""rope_theta": 10000,"#, r#""rope_interleave": true, "head_dim": 64,"#)
            .replace(r#""rope_scaling""#, r#""rope_parameters""#)
            .replace(r#""type": "yarn""#, r#""rope_type": "yarn", "rope_theta": 10000.0"#);
        let cfg = DeepSeekConfig::from_hf_json(&json).unwrap();
        assert_eq!(cfg.rope, DeepSeekConfig::v3_671b().rope);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (v3_original_json().replace(r#""n_group": 8"#, r#""n_group": 7"#), "n_group"),
            (
                v3_original_json()
                    .replace(r#""scoring_func": "sigmoid""#, r#""scoring_func": "relu""#),
                "scoring_func",
            ),
            (
                v3_original_json().replace(r#""type": "yarn""#, r#""type": "dynamic""#),
                "rope_scaling.type",
            ),
            (v3_original_json().replace(r#""kv_lora_rank": 512,"#, ""), "kv_lora_rank"),
            (
                v3_original_json().replace(r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#),
                "hidden_act",
            ),
        ];
        for (json, field) in cases {
            let err = DeepSeekError::to_string(&DeepSeekConfig::from_hf_json(&json).unwrap_err());
            assert!(err.contains(field), "expected `{field}` in: {err}");
        }
    }

    #[test]
    fn unknown_architecture_is_rejected() {
        let json = v3_original_json().replace("DeepseekV3ForCausalLM", "LlamaForCausalLM");
        let err = DeepSeekConfig::from_hf_json(&json).unwrap_err();
        assert!(matches!(err, DeepSeekError::UnknownArchitecture { .. }), "{err}");
    }

    #[test]
    fn malformed_json_is_a_json_error() {
        let err = DeepSeekConfig::from_hf_json("{\"vocab_size\": ").unwrap_err();
        assert!(matches!(err, DeepSeekError::Json { .. }), "{err}");
    }
}
