//! Low-rank adapters (LoRA, Hu et al. 2021) as a property of a [`Projection`]: the frozen
//! weight `W` plus a trainable update of rank `r`,
//!
//! `y = x·W + s · (dropout(x)·A)·B`, with `s = alpha / r` (or `alpha / √r` with rsLoRA,
//! Kalajdzievski 2023),
//!
//! in PEFT's conventions: `A` is drawn like a fresh linear layer (Kaiming-uniform with `a = √5`,
//! i.e. `U(−1/√in, 1/√in)`), `B` starts at zero so the adapted model equals the base at step 0,
//! and dropout applies to the adapter's input only. Burn keeps `A` as `[in, r]` and `B` as
//! `[r, out]` (PEFT stores `lora_A.weight [r, in]` and `lora_B.weight [out, r]`; the adapter
//! files in [`crate::adapter`] transpose).
//!
//! Which projections carry adapters is a list of module names ([`LoraTargets`]) matched against
//! the last component of each projection's checkpoint path (`q_a_proj` matches
//! `model.layers.3.self_attn.q_a_proj`), as PEFT matches `target_modules`; attaching, freezing
//! and merging on a whole model live in [`crate::finetune`].

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{backend::Backend, Distribution, Tensor};

use crate::error::{DeepSeekError, Result};

/// The MLA projections, NeMo's DeepSeek-V3 LoRA targets: five per block, `q_a_proj` and
/// `q_b_proj` or, in models without q-LoRA, `q_proj`.
pub const ATTENTION_TARGETS: [&str; 6] =
    ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"];
/// The dense MLP and the shared experts' projections.
pub const MLP_TARGETS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
/// The target name that puts one adapter on every routed expert's gate, up and down maps.
pub const EXPERTS_TARGET: &str = "experts";

/// The hyperparameters of one adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSettings {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha` of the scale.
    pub alpha: f64,
    /// rsLoRA: scale `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
    /// Dropout probability on the adapter input (training only).
    pub dropout: f64,
    /// Rank of the adapters on the routed experts (target `experts`): E of them per layer, so
    /// a smaller rank than the others.
    pub expert_rank: usize,
}

impl Default for LoraSettings {
    /// Rank 16, alpha 32, no dropout: the common fine-tuning choice (PEFT's default is 8/8).
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, rslora: false, dropout: 0.0, expert_rank: 4 }
    }
}

impl LoraSettings {
    /// The scale `s` of the update.
    pub fn scale(&self) -> f64 {
        scale(self.alpha, self.rank, self.rslora)
    }

    /// Checks the values (ranks at least 1, finite positive alpha, dropout in `[0, 1)`).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(DeepSeekError::config("lora rank", "must be at least 1"));
        }
        if self.expert_rank == 0 {
            return Err(DeepSeekError::config("expert lora rank", "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(DeepSeekError::config(
                "lora alpha",
                format!("must be positive, got {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(DeepSeekError::config(
                "lora dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        Ok(())
    }
}

/// `alpha / r`, or `alpha / √r` for rsLoRA.
pub fn scale(alpha: f64, rank: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// The module names that carry adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTargets(pub Vec<String>);

impl LoraTargets {
    /// `attn` (the MLA projections), `attn+mlp` (plus the dense MLP and shared experts), `all`
    /// (plus every routed expert), or a comma-separated list of module names (`experts` for
    /// the routed experts).
    pub fn parse(s: &str) -> Result<Self> {
        let names: Vec<String> = match s {
            "attn" => ATTENTION_TARGETS.iter().map(|s| s.to_string()).collect(),
            "attn+mlp" => {
                ATTENTION_TARGETS.iter().chain(&MLP_TARGETS).map(|s| s.to_string()).collect()
            }
            "all" => ATTENTION_TARGETS
                .iter()
                .chain(&MLP_TARGETS)
                .chain(&[EXPERTS_TARGET])
                .map(|s| s.to_string())
                .collect(),
            list => list.split(',').map(|s| s.trim().to_string()).collect(),
        };
        let known: Vec<&str> = ATTENTION_TARGETS
            .iter()
            .chain(&MLP_TARGETS)
            .chain(&[EXPERTS_TARGET])
            .copied()
            .collect();
        if let Some(bad) = names.iter().find(|n| !known.contains(&n.as_str())) {
            return Err(DeepSeekError::config(
                "lora targets",
                format!(
                    "unknown target module `{bad}`: choose attn, attn+mlp or names among {}",
                    known.join(", ")
                ),
            ));
        }
        Ok(Self(names))
    }

    /// Whether the routed experts carry adapters.
    pub fn experts(&self) -> bool {
        self.0.iter().any(|t| t == EXPERTS_TARGET)
    }

    /// Whether the projection at checkpoint path `path` is a target.
    pub fn matches(&self, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or(path);
        self.0.iter().any(|t| t == last)
    }
}

/// One adapter, `s · (dropout(x)·A)·B`, for a projection whose weight has rank `R`: one map
/// (`R = 2`), or one adapter per stacked expert (`R = 3`, a leading expert axis on `A` and `B`).
///
/// A stacked projection may fuse `parts` maps along its output (the experts' `gate_up` holds
/// gate and up): each part has its own adapter of rank `r`, laid side by side, part `p`'s `A` in
/// columns `p·r..(p+1)·r` and its `B` in rows `p·r..(p+1)·r`, so that the update of part `p`
/// only reaches its own output columns.
#[derive(Module, Debug)]
pub struct Lora<B: Backend, const R: usize = 2> {
    /// `[in, parts·r]`, or `[E, in, parts·r]` (PEFT's `lora_A.weight` transposed).
    pub a: Param<Tensor<B, R>>,
    /// `[parts·r, out / parts]`, or `[E, parts·r, out / parts]` (`lora_B.weight` transposed).
    pub b: Param<Tensor<B, R>>,
    /// Dropout on the adapter input.
    pub dropout: Dropout,
    /// The scale `s`.
    #[module(skip)]
    pub scale: f64,
    /// Maps fused along the output.
    #[module(skip)]
    pub parts: usize,
}

impl<B: Backend, const R: usize> Lora<B, R> {
    /// The dtype the adapter computes in (f32 for fresh and PEFT-loaded adapters, whatever the
    /// base's dtype).
    pub fn dtype(&self) -> burn::tensor::DType {
        self.a.val().dtype()
    }
}

impl<B: Backend> Lora<B, 2> {
    /// A fresh adapter for a `[d_in] → [d_out]` map: `A ~ U(−1/√in, 1/√in)`, `B = 0`.
    pub fn new(d_in: usize, d_out: usize, settings: &LoraSettings, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::random([d_in, settings.rank], Distribution::Uniform(-bound, bound), device);
        let b = Tensor::zeros([settings.rank, d_out], device);
        Self::from_tensors(a, b, settings.scale(), settings.dropout)
    }

    /// An adapter from its matrices (`a: [in, r]`, `b: [r, out]`).
    pub fn from_tensors(a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64, dropout: f64) -> Self {
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            dropout: DropoutConfig::new(dropout).init(),
            scale,
            parts: 1,
        }
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// The update `s · dropout(x)·A·B`.
    ///
    /// # Shapes
    /// `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = self.dropout.forward(x);
        let down = burn::tensor::module::linear(x, self.a.val(), None); // [..., r]
        burn::tensor::module::linear(down, self.b.val(), None).mul_scalar(self.scale)
    }

    /// `s · A·B`, the update as a `[d_in, d_out]` weight (merging, absorbed attention).
    pub fn delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}

impl<B: Backend> Lora<B, 3> {
    /// Fresh adapters for `experts` stacked `[d_in] → [d_out]` maps fusing `parts` maps along
    /// the output, each part of rank `settings.rank`: `A` drawn as in [`Lora::new`], `B = 0`.
    pub fn stacked(
        experts: usize,
        d_in: usize,
        d_out: usize,
        parts: usize,
        settings: &LoraSettings,
        device: &B::Device,
    ) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let r = settings.rank * parts;
        let a = Tensor::random([experts, d_in, r], Distribution::Uniform(-bound, bound), device);
        let b = Tensor::zeros([experts, r, d_out / parts], device);
        Self::from_stacked(a, b, parts, settings.scale(), settings.dropout)
    }

    /// Adapters from their stacked matrices (`a: [E, in, parts·r]`, `b: [E, parts·r, out/parts]`).
    pub fn from_stacked(
        a: Tensor<B, 3>,
        b: Tensor<B, 3>,
        parts: usize,
        scale: f64,
        dropout: f64,
    ) -> Self {
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            dropout: DropoutConfig::new(dropout).init(),
            scale,
            parts,
        }
    }

    /// Rank `r` of each part.
    pub fn rank(&self) -> usize {
        self.a.dims()[2] / self.parts
    }

    /// Part by part, `z_p · B_p` concatenated along the output: `z` `[..., parts·r]` and `b`
    /// `[..., parts·r, out/parts]` (leading dimensions matching).
    fn up_parts<const D: usize>(&self, z: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
        let r = self.rank();
        let parts = (0..self.parts)
            .map(|p| z.clone().narrow(D - 1, p * r, r).matmul(b.clone().narrow(D - 2, p * r, r)))
            .collect();
        Tensor::cat(parts, D - 1).mul_scalar(self.scale)
    }

    /// Expert `e`'s update of its rows.
    ///
    /// # Shapes
    /// `x`: `[n, d_in]` → `[n, d_out]`.
    pub fn forward_expert(&self, e: usize, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [_, d_in, pr] = self.a.dims();
        let [_, _, d_part] = self.b.dims();
        let a = self.a.val().narrow(0, e, 1).reshape([d_in, pr]); // [in, parts·r]
        let b = self.b.val().narrow(0, e, 1).reshape([pr, d_part]); // [parts·r, out/parts]
        self.up_parts(self.dropout.forward(x).matmul(a), b)
    }

    /// Every expert's update of its own padded block of rows.
    ///
    /// # Shapes
    /// `x`: `[E, cap, d_in]` → `[E, cap, d_out]`.
    pub fn forward_grouped(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.up_parts(self.dropout.forward(x).matmul(self.a.val()), self.b.val())
    }

    /// The updates as stacked weights.
    ///
    /// # Shapes
    /// → `[E, d_in, d_out]`.
    pub fn delta(&self) -> Tensor<B, 3> {
        self.up_parts(self.a.val(), self.b.val())
    }
}
