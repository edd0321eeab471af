//! Mixed-precision training (DeepSeek-V3 §3.3, the BF16 recipe it starts from): the weights
//! and the activations between them in bf16 or f16, forward and backward, while the loss, the
//! norms, the router and the attention softmax stay f32 ([`deepseek_core::dtype`]), and the
//! optimizer keeps f32 master weights and f32 moments ([`crate::optim`]).
//!
//! Gradients leave the backward pass in the weights' dtype and are widened to f32 at once
//! ([`widen_gradients`]), so that the sums over micro-batches and over data-parallel ranks run in
//! f32, as Megatron's `main_grad` buffers do.
//!
//! f16 has 5 exponent bits: gradients below 2⁻²⁴ flush to zero and above 65504 overflow. Dynamic
//! loss scaling (Micikevicius et al. 2018, PyTorch's `GradScaler`) multiplies the loss by `S`
//! before the backward pass and the gradients by `1/S` after it; a step whose gradients
//! overflow is skipped and halves `S`, and `growth_interval` clean steps in a row double it.
//! bf16 has f32's exponent range and needs no scaling.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The loss-scaling settings of an f16 run (PyTorch's `GradScaler` defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossScaling {
    /// The first scale.
    pub initial: f64,
    /// Clean steps in a row after which the scale doubles.
    pub growth_interval: usize,
}

impl Default for LossScaling {
    fn default() -> Self {
        Self { initial: 65536.0, growth_interval: 2000 }
    }
}

impl LossScaling {
    pub fn validate(&self) -> Result<()> {
        if !(self.initial.is_finite() && self.initial >= 1.0) {
            return Err(TrainError::config(
                "loss_scaling.initial",
                format!("{} (a finite scale of at least 1)", self.initial),
            ));
        }
        if self.growth_interval == 0 {
            return Err(TrainError::config("loss_scaling.growth_interval", "0 (at least 1)"));
        }
        Ok(())
    }
}

/// The loss scale of an f16 run as it stands; saved in checkpoints so that a resumed run
/// continues with the same scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: usize,
}

/// The largest scale: beyond it the scaled loss itself nears f16's range.
const MAX_SCALE: f64 = 16_777_216.0; // 2^24

impl LossScale {
    pub fn new(config: &LossScaling) -> Self {
        Self { scale: config.initial, clean_steps: 0 }
    }

    /// After a step whose gradients were finite: doubles the scale every `growth_interval`.
    pub fn grow(&mut self, config: &LossScaling) {
        self.clean_steps += 1;
        if self.clean_steps >= config.growth_interval {
            self.scale = (self.scale * 2.0).min(MAX_SCALE);
            self.clean_steps = 0;
        }
    }

    /// After a step whose gradients overflowed: halves the scale, or fails once it would fall
    /// below 1 (the unscaled gradients themselves overflow f16: the run diverges).
    pub fn back_off(&mut self, step: usize) -> Result<()> {
        if self.scale <= 1.0 {
            return Err(TrainError::NonFinite {
                step,
                what: "f16 gradient at loss scale 1",
                value: f64::INFINITY,
            });
        }
        self.scale = (self.scale / 2.0).max(1.0);
        self.clean_steps = 0;
        Ok(())
    }
}

/// The gradients of `module`'s parameters in f32 and multiplied by `unscale` (`1/S` of loss
/// scaling; 1 otherwise). f32 gradients with `unscale` 1 are returned untouched, so every
/// trainer calls this whatever its dtype.
pub fn widen_gradients<AB, M>(module: &M, grads: GradientsParams, unscale: f64) -> GradientsParams
where
    AB: AutodiffBackend,
    M: AutodiffModule<AB>,
{
    struct Widen<'a> {
        grads: &'a mut GradientsParams,
        unscale: f64,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Widen<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            let Some(g) = self.grads.remove::<AB::InnerBackend, D>(param.id) else { return };
            let mut g = match g.dtype() {
                DType::F32 => g,
                _ => g.cast(FloatDType::F32),
            };
            if self.unscale != 1.0 {
                g = g.mul_scalar(self.unscale);
            }
            self.grads.register::<AB::InnerBackend, D>(param.id, g);
        }
    }
    let mut grads = grads;
    module.visit(&mut Widen { grads: &mut grads, unscale });
    grads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_halves_on_overflow_doubles_after_clean_steps_and_stops_at_one() {
        let config = LossScaling { initial: 8.0, growth_interval: 3 };
        let mut s = LossScale::new(&config);
        s.grow(&config);
        s.grow(&config);
        assert_eq!((s.scale, s.clean_steps), (8.0, 2));
        s.back_off(1).unwrap();
        assert_eq!((s.scale, s.clean_steps), (4.0, 0));
        for _ in 0..3 {
            s.grow(&config);
        }
        assert_eq!((s.scale, s.clean_steps), (8.0, 0));
        for _ in 0..3 {
            s.back_off(1).unwrap();
        }
        assert_eq!(s.scale, 1.0);
        assert!(s.back_off(7).unwrap_err().to_string().contains("loss scale 1"));
        assert!(LossScaling { initial: 0.5, ..config }.validate().is_err());
        assert!(LossScaling { growth_interval: 0, ..config }.validate().is_err());
    }
}
