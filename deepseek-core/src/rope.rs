//! Rotary position embedding of MLA's decoupled key/query part (DeepSeek-V2 §2.1.3), with YaRN
//! context extension (Peng et al. 2023) as DeepSeek-V3 ships it.
//!
//! Frequencies: `f_i = theta^(-2i/r)` for `i < r/2`. YaRN blends, per dimension, the original
//! frequency and the interpolated `f_i / factor` with a linear ramp between
//! `low = floor(corr_dim(beta_fast))` and `high = ceil(corr_dim(beta_slow))`, where
//! `corr_dim(n) = r·ln(orig_len / (2π·n)) / (2·ln theta)`: fast-rotating (low-index) dimensions
//! keep their frequency, slow ones are interpolated. cos and sin are multiplied by the
//! `attention_factor` (1.0 for V3); the softmax correction `mscale²` lives in the attention
//! scale instead (see [`crate::DeepSeekConfig::softmax_scale`]).
//!
//! DeepSeek's checkpoints rotate interleaved pairs `(x[2i], x[2i+1])`. transformers de-interleaves
//! before rotating halves; q and k are permuted alike, so attention scores are identical.
//!
//! The tables are computed on the fly for the positions of each call: the module holds no state
//! and works for any offset into a KV cache.

use std::f64::consts::PI;

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::config::RopeConfig;

/// Per-dimension frequencies and the cos/sin multiplier of one rotary embedding.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[r/2]` angular frequency of each rotated pair.
    pub inv_freq: Vec<f64>,
    /// Multiplier applied to cos and sin (YaRN's attention factor).
    pub attention_factor: f64,
    /// Interleaved pairs (DeepSeek) or halves.
    pub interleaved: bool,
}

impl RotaryEmbedding {
    /// Frequencies for a rotary part of width `dim` (even).
    pub fn new(rope: &RopeConfig, dim: usize) -> Self {
        let half = dim / 2;
        let base = rope.theta;
        // transformers computes `base ** (arange(0, dim, 2) / dim)` in f32; the same values
        // rounded through f32 keep us within ulps of it at every position we test.
        let original: Vec<f64> = (0..half)
            .map(|i| 1.0 / (base.powf((2 * i) as f64 / dim as f64) as f32 as f64))
            .collect();
        let Some(y) = rope.yarn else {
            return Self { inv_freq: original, attention_factor: 1.0, interleaved: rope.interleaved };
        };
        let corr_dim = |rotations: f64| {
            dim as f64 * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * PI)).ln()
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (corr_dim(y.beta_fast), corr_dim(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(dim as f64 - 1.0);
        let span = if low == high { high + 0.001 - low } else { high - low };
        let inv_freq = original
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                // ramp 0 → keep the original frequency, ramp 1 → interpolate by `factor`.
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                (f / y.factor) * (1.0 - keep) + f * keep
            })
            .collect();
        Self { inv_freq, attention_factor: y.attention_factor, interleaved: rope.interleaved }
    }

    /// cos and sin tables `[seq, r/2]` for positions `start..start + seq`.
    pub fn tables<B: Backend>(&self, start: usize, seq: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for pos in start..start + seq {
            for &f in &self.inv_freq {
                // f32 angle, as transformers computes `inv_freq @ position_ids` in f32.
                let angle = (f as f32 * pos as f32) as f64;
                cos.push((angle.cos() * self.attention_factor) as f32);
                sin.push((angle.sin() * self.attention_factor) as f32);
            }
        }
        let cos = Tensor::from_data(TensorData::new(cos, [seq, half]), device);
        let sin = Tensor::from_data(TensorData::new(sin, [seq, half]), device);
        (cos, sin)
    }

    /// Rotates `x` at positions `start..start + seq`.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, heads, r]` → `[batch, seq, heads, r]` (heads may be 1 for the shared key).
    pub fn apply<B: Backend>(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let [batch, seq, heads, dim] = x.dims();
        let half = dim / 2;
        let (cos, sin) = self.tables::<B>(start, seq, &x.device());
        if self.interleaved {
            let pairs = x.reshape([batch, seq, heads, half, 2]); // [b, s, h, r/2, 2]
            let even = pairs.clone().narrow(4, 0, 1); // [b, s, h, r/2, 1]
            let odd = pairs.narrow(4, 1, 1);
            let cos = cos.reshape([1, seq, 1, half, 1]);
            let sin = sin.reshape([1, seq, 1, half, 1]);
            let rot_even = even.clone() * cos.clone() - odd.clone() * sin.clone();
            let rot_odd = even * sin + odd * cos;
            Tensor::cat(vec![rot_even, rot_odd], 4).reshape([batch, seq, heads, dim])
        } else {
            let first = x.clone().narrow(3, 0, half); // [b, s, h, r/2]
            let second = x.narrow(3, half, half);
            let cos = cos.reshape([1, seq, 1, half]);
            let sin = sin.reshape([1, seq, 1, half]);
            let rot_first = first.clone() * cos.clone() - second.clone() * sin.clone();
            let rot_second = second * cos + first * sin;
            Tensor::cat(vec![rot_first, rot_second], 3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeepSeekConfig;

    #[test]
    fn v3_yarn_ramp_keeps_fast_dims_and_interpolates_slow_ones() {
        let cfg = DeepSeekConfig::v3_671b();
        let rope = RotaryEmbedding::new(&cfg.rope, 64);
        let y = cfg.rope.yarn.unwrap();
        // corr_dim(32) = 64·ln(4096/(64π))/(2·ln 10000) = 10.2 → low 10;
        // corr_dim(1) = 64·ln(4096/(2π))/(2·ln 10000) = 22.5 → high 23.
        for i in 0..32 {
            let original = 1.0 / 10000f64.powf(2.0 * i as f64 / 64.0);
            let ratio = rope.inv_freq[i] / original;
            if i <= 10 {
                assert!((ratio - 1.0).abs() < 1e-6, "dim {i} should keep its frequency: {ratio}");
            } else if i >= 23 {
                assert!((ratio - 1.0 / y.factor).abs() < 1e-6, "dim {i} should be interpolated: {ratio}");
            } else {
                assert!(ratio < 1.0 && ratio > 1.0 / y.factor, "dim {i} should be blended: {ratio}");
            }
        }
    }
}
