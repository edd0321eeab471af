//! SwiGLU feed-forward network (Shazeer 2020): `down(silu(gate(x)) ⊙ up(x))`. Used for the dense
//! blocks, for every routed expert and for the shared experts.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{activation::silu, backend::Backend, Tensor};

use crate::fp8::GemmPrecision;
use crate::projection::Projection;

/// Builds an [`Mlp`].
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Hidden width of the gated layer.
    pub d_hidden: usize,
}

impl MlpConfig {
    /// A fresh MLP (weights drawn lazily, as Burn's `Linear` draws them).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mlp<B> {
        Mlp {
            gate_proj: Projection::new(self.d_model, self.d_hidden, device),
            up_proj: Projection::new(self.d_model, self.d_hidden, device),
            down_proj: Projection::new(self.d_hidden, self.d_model, device),
        }
    }
}

/// Gated MLP with SiLU activation.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[d] → [hidden]`, through SiLU.
    pub gate_proj: Projection<B>,
    /// `[d] → [hidden]`, the gated branch.
    pub up_proj: Projection<B>,
    /// `[hidden] → [d]`
    pub down_proj: Projection<B>,
}

impl<B: Backend> Mlp<B> {
    /// The MLP with its three GEMMs at `gemm` precision.
    ///
    /// # Shapes
    /// `x`: `[..., d_model]` → `[..., d_model]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, gemm: GemmPrecision) -> Tensor<B, D> {
        let plain =
            [&self.gate_proj, &self.up_proj, &self.down_proj].iter().all(|p| p.lora.is_none());
        if plain && gemm == GemmPrecision::Full {
            // A few rows (decoding) on Flex: the whole MLP in one pass.
            let params = (self.gate_proj.param(), self.up_proj.param(), self.down_proj.param());
            if let (Some(gate), Some(up), Some(down)) = params {
                if let Some(y) = crate::few_rows::swiglu(&x, &gate.val(), &up.val(), &down.val()) {
                    return y;
                }
            }
        }
        let gate = silu(self.gate_proj.forward(x.clone(), gemm));
        self.down_proj.forward(gate * self.up_proj.forward(x, gemm), gemm)
    }
}
