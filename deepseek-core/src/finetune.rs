//! Fine-tuning a whole model: the projections that may carry LoRA adapters, by checkpoint path;
//! attaching adapters on a frozen base, freezing the routers, merging adapters into the weights
//! ([`crate::lora`] holds the adapter itself).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;

use crate::block::FeedForward;
use crate::checkpoint::{table, Target};
use crate::error::{DeepSeekError, Result};
use crate::lora::{Lora, LoraSettings, LoraTargets};
use crate::model::DeepSeekModel;
use crate::moe::RoutedExperts;
use crate::projection::{Projection, Weight};

/// The checkpoint names of the maps each stacked expert projection fuses, in column order:
/// `gate_up` holds gate then up, `down` holds down.
pub const GATE_UP_PARTS: [&str; 2] = ["gate_proj", "up_proj"];
/// See [`GATE_UP_PARTS`].
pub const DOWN_PARTS: [&str; 1] = ["down_proj"];

/// Calls `f` with the checkpoint path (`model.layers.3.self_attn.kv_b_proj`) and the projection
/// of every adaptable map of the main model, in checkpoint-table order: attention, dense MLPs
/// and shared experts. Not the head, the routed experts (stacked) or the MTP modules, which
/// transformers' model (and so PEFT) does not have.
pub fn for_each_adaptable<B: Backend>(
    model: &mut DeepSeekModel<B>,
    mut f: impl FnMut(&str, &mut Projection<B>) -> Result<()>,
) -> Result<()> {
    let main_layers = model.config.num_hidden_layers;
    for row in table::<B>(&model.config) {
        let Target::Linear(get) = row.target else { continue };
        let Some(path) = row.name.strip_suffix(".weight") else { continue };
        let in_main_layer = path
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n < main_layers);
        if in_main_layer && !path.ends_with("eh_proj") {
            f(path, get(model, row.index))?;
        }
    }
    Ok(())
}

/// Calls `f` with the checkpoint prefix of the routed experts (`model.layers.3.mlp.experts`;
/// expert `e`'s maps are `<prefix>.e.gate_proj` and so on) and the stacked experts of every MoE
/// block of the main model.
pub fn for_each_routed_experts<B: Backend>(
    model: &mut DeepSeekModel<B>,
    mut f: impl FnMut(&str, &mut RoutedExperts<B>) -> Result<()>,
) -> Result<()> {
    for (l, layer) in model.layers.iter_mut().enumerate() {
        if let FeedForward::Moe(moe) = &mut layer.mlp {
            f(&format!("model.layers.{l}.mlp.experts"), &mut moe.experts)?;
        }
    }
    Ok(())
}

impl<B: Backend> DeepSeekModel<B> {
    /// This model with fresh adapters on every projection `targets` names (and, with the
    /// `experts` target, one per routed expert of rank `settings.expert_rank`), the rest of the
    /// weights frozen (no gradients, so no optimizer state). Fails if no projection matches.
    pub fn with_lora(mut self, targets: &LoraTargets, settings: &LoraSettings) -> Result<Self> {
        settings.validate()?;
        let mut model = self.freeze();
        let device = model.embed_tokens.weight.device();
        let mut attached = 0;
        for_each_adaptable(&mut model, |path, projection| {
            if targets.matches(path) {
                let [d_in, d_out] = projection.dims();
                projection.lora = Some(Lora::new(d_in, d_out, settings, &device));
                attached += 1;
            }
            Ok(())
        })?;
        if targets.experts() {
            let experts = LoraSettings { rank: settings.expert_rank, ..*settings };
            for_each_routed_experts(&mut model, |_, routed| {
                for (projection, parts) in
                    [(&mut routed.gate_up, GATE_UP_PARTS.len()), (&mut routed.down, 1)]
                {
                    let [e, d_in, d_out] = projection.dims();
                    projection.lora = Some(Lora::stacked(e, d_in, d_out, parts, &experts, &device));
                    attached += 1;
                }
                Ok(())
            })?;
        }
        if attached == 0 {
            return Err(DeepSeekError::config(
                "lora targets",
                format!("no projection of this model is named any of {:?}", targets.0),
            ));
        }
        self = model;
        Ok(self)
    }

    /// Every parameter frozen (no gradients), adapters excepted.
    pub fn freeze(self) -> Self {
        fn thaw<B: Backend, const R: usize>(projection: &mut Projection<B, R>) {
            if let Some(lora) = projection.lora.take() {
                let (a, b) = (lora.a.set_require_grad(true), lora.b.set_require_grad(true));
                projection.lora = Some(Lora { a, b, ..lora });
            }
        }
        let mut model = self.no_grad();
        let _ = for_each_adaptable(&mut model, |_, projection| {
            thaw(projection);
            Ok(())
        });
        let _ = for_each_routed_experts(&mut model, |_, routed| {
            thaw(&mut routed.gate_up);
            thaw(&mut routed.down);
            Ok(())
        });
        model
    }

    /// Every router's gate weight frozen (fine-tuning with a frozen router; the correction
    /// bias never has a gradient).
    pub fn freeze_routers(mut self) -> Self {
        for block in self.blocks_mut() {
            if let crate::block::FeedForward::Moe(moe) = &mut block.mlp {
                moe.gate.weight = moe.gate.weight.clone().set_require_grad(false);
            }
        }
        self
    }

    /// This model with every adapter removed: the base model the adapters were attached to
    /// (PEFT's `disable_adapter`). Its weights are the same tensors, not copies, so a frozen
    /// LoRA base doubles as the reference model of a KL penalty at no memory cost.
    pub fn without_adapters(mut self) -> Self {
        let _ = for_each_adaptable(&mut self, |_, projection| {
            projection.lora = None;
            Ok(())
        });
        let _ = for_each_routed_experts(&mut self, |_, routed| {
            routed.gate_up.lora = None;
            routed.down.lora = None;
            Ok(())
        });
        self
    }

    /// This model with every adapter folded into its weight, `W ← W + s·A·B` (PEFT's
    /// `merge_and_unload`), and removed.
    pub fn merge_adapters(mut self) -> Self {
        let _ = for_each_adaptable(&mut self, |_, projection| {
            if let Some(lora) = projection.lora.take() {
                let merged = projection.weight() + lora.delta();
                projection.weight = Weight::Dense(Param::from_tensor(merged));
            }
            Ok(())
        });
        let _ = for_each_routed_experts(&mut self, |_, routed| {
            for projection in [&mut routed.gate_up, &mut routed.down] {
                if let Some(lora) = projection.lora.take() {
                    let merged = projection.weight() + lora.delta();
                    projection.weight = Weight::Dense(Param::from_tensor(merged));
                }
            }
            Ok(())
        });
        self
    }
}
