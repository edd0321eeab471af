//! AdamW (Loshchilov & Hutter 2019) with DeepSeek-V3's settings (β1 0.9, β2 0.95, weight decay
//! 0.1) and clipping by the **global** gradient norm.
//!
//! Our own rather than Burn's: Burn's `AdamW` decays every parameter and its
//! `GradientClipping::Norm` clips each parameter by its own norm. Here weight decay applies to
//! parameters of rank ≥ 2 (projections, embeddings, stacked experts, router weights) and not to
//! RMSNorm gains; the balancing bias has no gradient and is never touched. Clipping scales every
//! gradient by `min(1, max_norm / ‖g‖)` with `‖g‖` over all parameters at once.
//!
//! Update of a parameter `p` with gradient `g` at step `t` (1-based):
//! `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p − lr·(m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε) − lr·λ·p`.
//!
//! The moments are kept per parameter in module visiting order, flattened, so that they can be
//! saved and restored exactly.
//!
//! **Mixed precision** (DeepSeek-V3 §3.3): a parameter held in bf16 or f16 gets an f32 master
//! copy here, beside its f32 moments. Its gradient is widened to f32, the update runs on the
//! master, and the parameter becomes the master rounded to its dtype. Updates smaller than half
//! a bf16 step (2⁻⁹ relative) would otherwise vanish: with lr 1e-3 most of them are.

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, FloatDType, Tensor, TensorData};
use deepseek_core::checkpoint::NamedTensor;
use deepseek_core::dtype::round_to;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Optimizer settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay λ for parameters of rank ≥ 2.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    /// DeepSeek-V3 §4.2: β1 0.9, β2 0.95, weight decay 0.1, gradient clipping norm 1.0.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, max_grad_norm: Some(1.0) }
    }
}

struct Moments<B: Backend> {
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    /// The f32 master weights of a parameter held in bf16 or f16.
    master: Option<Tensor<B, 1>>,
}

impl<B: Backend> Moments<B> {
    fn to_device(&self, device: &B::Device) -> Self {
        Self {
            m: self.m.clone().to_device(device),
            v: self.v.clone().to_device(device),
            master: self.master.clone().map(|w| w.to_device(device)),
        }
    }
}

/// The optimizer state: step count and first/second moments per parameter.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    moments: Vec<Option<Moments<B>>>,
    /// ZeRO-1: the parameters (visiting order) this rank updates and keeps moments for;
    /// `None`: all of them.
    owned: Option<Vec<bool>>,
}

impl<B: Backend> AdamW<B> {
    /// A copy of the state on `device` (another data-parallel rank's).
    pub fn to_device(&self, device: &B::Device) -> Self {
        let moments =
            self.moments.iter().map(|m| m.as_ref().map(|m| m.to_device(device))).collect();
        Self { config: self.config, step: self.step, moments, owned: self.owned.clone() }
    }

    /// The share of this state that a ZeRO-1 rank keeps: the moments of the `owned` parameters,
    /// on `device`. Its steps update those parameters only.
    pub fn shard(&self, owned: Vec<bool>, device: &B::Device) -> Self {
        let moments = self
            .moments
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.as_ref()
                    .filter(|_| owned.get(i).copied().unwrap_or(false))
                    .map(|m| m.to_device(device))
            })
            .collect();
        Self { config: self.config, step: self.step, moments, owned: Some(owned) }
    }

    /// The parameters this state updates (`None`: all).
    pub fn owned(&self) -> Option<&[bool]> {
        self.owned.as_deref()
    }

    /// The moments `(m, v)` of parameter `index` (visiting order), if this state holds them.
    pub fn moments(&self, index: usize) -> Option<(Tensor<B, 1>, Tensor<B, 1>)> {
        self.moments.get(index)?.as_ref().map(|m| (m.m.clone(), m.v.clone()))
    }

    /// The f32 master weights of parameter `index` (one held in bf16 or f16), if this state
    /// holds them.
    pub fn master(&self, index: usize) -> Option<Tensor<B, 1>> {
        self.moments.get(index)?.as_ref()?.master.clone()
    }
}

/// What one optimizer step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, step: 0, moments: Vec::new(), owned: None }
    }

    /// The global L2 norm of `grads` over the parameters of `module`.
    pub fn global_norm<AB, M>(module: &M, grads: &GradientsParams) -> f64
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        struct SumSquares<'a, B: Backend> {
            grads: &'a GradientsParams,
            parts: Vec<Tensor<B, 1>>,
        }
        impl<AB: AutodiffBackend> ModuleVisitor<AB> for SumSquares<'_, AB::InnerBackend> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
                if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
                    self.parts.push(g.powi_scalar(2).sum());
                }
            }
        }
        let mut visitor = SumSquares::<B> { grads, parts: Vec::new() };
        module.visit(&mut visitor);
        if visitor.parts.is_empty() {
            return 0.0;
        }
        // One host read for the whole model.
        let total: f64 = Tensor::cat(visitor.parts, 0).sum().into_scalar().elem();
        total.sqrt()
    }

    /// Clips, then applies one AdamW update with learning rate `lr` to every parameter of
    /// `module` that has a gradient in `grads`.
    pub fn step<AB, M>(&mut self, lr: f64, module: M, grads: GradientsParams) -> (M, StepStats)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let grad_norm = Self::global_norm::<AB, M>(&module, &grads);
        self.step_with_norm::<AB, M>(lr, module, grads, grad_norm)
    }

    /// [`AdamW::step`] with the global norm already computed by [`AdamW::global_norm`].
    pub fn step_with_norm<AB, M>(
        &mut self,
        lr: f64,
        module: M,
        mut grads: GradientsParams,
        grad_norm: f64,
    ) -> (M, StepStats)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let clip_scale = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let mut mapper = Update::<B> {
            grads: &mut grads,
            moments: &mut self.moments,
            owned: self.owned.as_deref(),
            index: 0,
            lr,
            clip_scale,
            config: self.config,
            correction1: 1.0 - self.config.beta1.powi(t),
            correction2: 1.0 - self.config.beta2.powi(t),
        };
        let module = module.map(&mut mapper);
        (module, StepStats { grad_norm, clip_scale })
    }

    /// The moments as named f32 tensors (`m.{i}`, `v.{i}`, `i` = parameter visiting order), and
    /// the master weights of mixed-precision parameters (`w.{i}`).
    pub fn state_tensors(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for (i, slot) in self.moments.iter().enumerate() {
            if let Some(Moments { m, v, master }) = slot {
                for (kind, t) in
                    [("m", m), ("v", v)].into_iter().chain(master.iter().map(|w| ("w", w)))
                {
                    let values: Vec<f32> =
                        t.to_data().convert::<f32>().into_vec().expect("f32 moments");
                    out.push(NamedTensor {
                        name: format!("{kind}.{i}"),
                        shape: vec![values.len()],
                        values,
                    });
                }
            }
        }
        out
    }

    /// Restores the state written by [`AdamW::state_tensors`] for a model whose parameters, in
    /// visiting order, have `sizes` elements.
    pub fn load_state(
        &mut self,
        step: u64,
        tensors: Vec<NamedTensor>,
        sizes: &[usize],
        device: &B::Device,
    ) -> Result<()> {
        let mut moments: Vec<Option<Moments<B>>> = (0..sizes.len()).map(|_| None).collect();
        // Parameter index → (first moment, second moment, master weights), until all are read.
        type Parts = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);
        let mut pending: std::collections::HashMap<usize, Parts> = Default::default();
        for t in tensors {
            let bad =
                || TrainError::config("optimizer state", format!("unexpected tensor `{}`", t.name));
            let (kind, index) = t.name.split_once('.').ok_or_else(bad)?;
            let index: usize = index.parse().map_err(|_| bad())?;
            let size = *sizes.get(index).ok_or_else(|| {
                TrainError::config(
                    "optimizer state",
                    format!("moment for parameter {index}, but the model has {}", sizes.len()),
                )
            })?;
            if t.values.len() != size {
                return Err(TrainError::config(
                    "optimizer state",
                    format!("`{}` has {} values, the parameter has {size}: the checkpoint is for another model", t.name, t.values.len()),
                ));
            }
            let entry = pending.entry(index).or_default();
            match kind {
                "m" => entry.0 = Some(t.values),
                "v" => entry.1 = Some(t.values),
                "w" => entry.2 = Some(t.values),
                _ => return Err(bad()),
            }
        }
        for (index, parts) in pending {
            let (Some(m), Some(v), master) = parts else {
                return Err(TrainError::config(
                    "optimizer state",
                    format!("parameter {index} lacks one of its two moments"),
                ));
            };
            let n = m.len();
            let tensor = |values: Vec<f32>| Tensor::from_data(TensorData::new(values, [n]), device);
            moments[index] =
                Some(Moments { m: tensor(m), v: tensor(v), master: master.map(tensor) });
        }
        self.moments = moments;
        self.step = step;
        Ok(())
    }
}

/// Element counts of the float parameters of `module`, in visiting order.
pub fn param_sizes<B: Backend, M: burn::module::Module<B>>(module: &M) -> Vec<usize> {
    struct Sizes(Vec<usize>);
    impl<B: Backend> ModuleVisitor<B> for Sizes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.shape().num_elements());
        }
    }
    let mut sizes = Sizes(Vec::new());
    module.visit(&mut sizes);
    sizes.0
}

/// `t` in f32 (unchanged when it is).
fn f32<B: Backend>(t: Tensor<B, 1>) -> Tensor<B, 1> {
    match t.dtype() {
        DType::F32 => t,
        _ => t.cast(FloatDType::F32),
    }
}

struct Update<'a, B: Backend> {
    grads: &'a mut GradientsParams,
    moments: &'a mut Vec<Option<Moments<B>>>,
    owned: Option<&'a [bool]>,
    index: usize,
    lr: f64,
    clip_scale: f64,
    config: AdamWConfig,
    correction1: f64,
    correction2: f64,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Update<'_, AB::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let index = self.index;
        self.index += 1;
        let (id, tensor, mapper) = param.consume();
        let owned = self.owned.is_none_or(|o| o.get(index).copied().unwrap_or(false));
        let grad = self.grads.remove::<AB::InnerBackend, D>(id);
        let Some(grad) = grad.filter(|_| owned) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let value = tensor.inner();
        let (shape, dtype) = (value.shape(), value.dtype());
        let n = shape.num_elements();
        let c = self.config;
        let mut g = f32(grad.reshape([n]));
        if self.clip_scale != 1.0 {
            g = g.mul_scalar(self.clip_scale);
        }
        if self.moments.len() <= index {
            self.moments.resize_with(index + 1, || None);
        }
        let (m, v, master) = match self.moments[index].take() {
            Some(Moments { m, v, master }) => (m, v, master),
            None => (g.zeros_like(), g.zeros_like(), None),
        };
        // A half-precision parameter is updated through its f32 master (taken from the
        // parameter on the first step: widening is exact).
        let mixed = dtype != DType::F32;
        let mut flat = match master {
            Some(w) if mixed => w,
            _ => f32(value.reshape([n])),
        };
        let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
        let v = v.mul_scalar(c.beta2) + g.powi_scalar(2).mul_scalar(1.0 - c.beta2);
        let update = m.clone().div_scalar(self.correction1)
            / v.clone().div_scalar(self.correction2).sqrt().add_scalar(c.eps);
        if D >= 2 && c.weight_decay > 0.0 {
            flat = flat.mul_scalar(1.0 - self.lr * c.weight_decay);
        }
        flat = flat - update.mul_scalar(self.lr);
        let (value, master) = match mixed {
            true => (round_to(flat.clone(), FloatDType::from(dtype)), Some(flat)),
            false => (flat, None),
        };
        self.moments[index] = Some(Moments { m, v, master });
        let mut out = Tensor::from_inner(value.reshape(shape));
        if require_grad {
            out = out.require_grad();
        }
        Param::from_mapped_value(id, out, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};

    type AB = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Tiny<B: Backend> {
        lin: Linear<B>,
        gain: Param<Tensor<B, 1>>,
    }

    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
        t.into_data().convert::<f64>().into_vec().unwrap()
    }

    /// Scalar AdamW on one value, the reference.
    fn reference(
        p: f64,
        grads: &[f64],
        lr: f64,
        c: AdamWConfig,
        decay: bool,
        scales: &[f64],
    ) -> f64 {
        let (mut p, mut m, mut v) = (p, 0.0, 0.0);
        for (t, (&g, &s)) in grads.iter().zip(scales).enumerate() {
            let g = g * s;
            let t = t as i32 + 1;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let update =
                (m / (1.0 - c.beta1.powi(t))) / ((v / (1.0 - c.beta2.powi(t))).sqrt() + c.eps);
            if decay {
                p *= 1.0 - lr * c.weight_decay;
            }
            p -= lr * update;
        }
        p
    }

    #[test]
    fn matches_scalar_adamw_with_decay_on_matrices_only_and_global_clipping() {
        let device = Default::default();
        let lin: Linear<AB> = LinearConfig::new(2, 2).with_bias(false).init(&device);
        let mut model =
            Tiny { lin, gain: Param::from_tensor(Tensor::from_floats([1.0, 2.0], &device)) };
        let w0 = values(model.lin.weight.val());
        let g0 = values(model.gain.val());
        let config = AdamWConfig { max_grad_norm: Some(0.5), ..Default::default() };
        let mut opt = AdamW::<Flex>::new(config);
        let lr = 0.01;
        // loss = Σ x·W (a fixed input) + Σ 3·gain²: known gradients, large enough to be clipped.
        let x = Tensor::<AB, 2>::from_floats([[1.0, -2.0]], &device);
        let mut grad_log: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
        let mut scales = Vec::new();
        for _ in 0..3 {
            let loss = model.lin.forward(x.clone()).sum()
                + model.gain.val().powi_scalar(2).mul_scalar(3.0).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let gw = values(grads.get::<Flex, 2>(model.lin.weight.id).unwrap());
            let gg = values(grads.get::<Flex, 1>(model.gain.id).unwrap());
            let norm = gw.iter().chain(&gg).map(|g| g * g).sum::<f64>().sqrt();
            let (next, stats) = opt.step::<AB, _>(lr, model, grads);
            assert!((stats.grad_norm - norm).abs() < 1e-4 * norm, "{} vs {norm}", stats.grad_norm);
            scales.push(0.5 / (norm + 1e-6));
            grad_log.push((gw, gg));
            model = next;
        }
        let w = values(model.lin.weight.val());
        let g = values(model.gain.val());
        for i in 0..4 {
            let gs: Vec<f64> = grad_log.iter().map(|(gw, _)| gw[i]).collect();
            let expected = reference(w0[i], &gs, lr, config, true, &scales);
            assert!((w[i] - expected).abs() < 1e-5, "weight {i}: {} vs {expected}", w[i]);
        }
        for i in 0..2 {
            let gs: Vec<f64> = grad_log.iter().map(|(_, gg)| gg[i]).collect();
            let expected = reference(g0[i], &gs, lr, config, false, &scales);
            assert!((g[i] - expected).abs() < 1e-5, "gain {i}: {} vs {expected}", g[i]);
        }
        // The state round-trips through its named tensors.
        let saved = opt.state_tensors();
        let mut restored = AdamW::<Flex>::new(config);
        restored.load_state(opt.step, saved.clone(), &param_sizes(&model), &device).unwrap();
        assert_eq!(restored.state_tensors(), saved);
        let err = restored.load_state(3, saved, &[4, 3], &device).err().unwrap().to_string();
        assert!(err.contains("another model"), "{err}");
    }

    #[derive(Module, Debug)]
    struct Weights<B: Backend> {
        w: Param<Tensor<B, 2>>,
    }

    #[test]
    fn a_bf16_parameter_takes_updates_below_its_rounding_step_through_its_f32_master() {
        let device = Default::default();
        let start = [1.0f64, -0.5];
        let w = Tensor::<AB, 2>::from_data(
            TensorData::new(start.map(|v| v as f32).to_vec(), [1, 2]),
            (&device, DType::BF16),
        );
        let mut model = Weights { w: Param::from_tensor(w.require_grad()) };
        let config = AdamWConfig { max_grad_norm: None, ..Default::default() };
        let mut opt = AdamW::<Flex>::new(config);
        // Gradients (1, -1) every step: each update is about lr = 2e-4, a tenth of half a bf16
        // step at 1.0 (2⁻⁸ below it): rounded into the weight alone, none would ever land.
        let (lr, steps) = (2e-4, 60);
        let sign = Tensor::<AB, 2>::from_floats([[1.0, -1.0]], &device).cast(FloatDType::BF16);
        for _ in 0..steps {
            let loss = (model.w.val() * sign.clone()).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = opt.step::<AB, _>(lr, model, grads).0;
        }
        assert_eq!(model.w.val().dtype(), DType::BF16, "the weight stays bf16");
        let master = values(opt.master(0).expect("an f32 master for the bf16 weight"));
        let held = values(model.w.val());
        for i in 0..2 {
            let g = if i == 0 { 1.0 } else { -1.0 };
            let expected = reference(start[i], &[g; 60], lr, config, true, &[1.0; 60]);
            assert!((master[i] - expected).abs() < 1e-6, "master {i}: {} vs {expected}", master[i]);
            let rounded = half::bf16::from_f32(master[i] as f32).to_f64();
            assert_eq!(held[i], rounded, "weight {i} is its master rounded to bf16");
            assert_ne!(held[i], start[i], "weight {i} moved");
        }
        // The master weights round-trip through the saved state.
        let saved = opt.state_tensors();
        assert!(saved.iter().any(|t| t.name == "w.0"), "{:?}", saved.iter().map(|t| &t.name));
        let mut restored = AdamW::<Flex>::new(config);
        restored.load_state(opt.step, saved.clone(), &param_sizes(&model), &device).unwrap();
        assert_eq!(restored.state_tensors(), saved);
    }
}
