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
            return Self {
                inv_freq: original,
                attention_factor: 1.0,
                interleaved: rope.interleaved,
            };
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
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        seq: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let half = self.inv_freq.len();
        let (cos, sin) = self.pair_values(start, seq);
        let cos = Tensor::from_data(TensorData::new(cos, [seq, half]), device);
        let sin = Tensor::from_data(TensorData::new(sin, [seq, half]), device);
        (cos, sin)
    }

    /// Host values of [`RotaryEmbedding::tables`], `[seq, r/2]` row-major, times the attention
    /// factor.
    fn pair_values(&self, start: usize, seq: usize) -> (Vec<f32>, Vec<f32>) {
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
        (cos, sin)
    }

    /// Rotates `x` at positions `start..start + seq`.
    ///
    /// Written as `x ⊙ C + (x·R) ⊙ S`, where `C` and `S` hold each pair's cos and sin at both of
    /// its positions and `R` is the signed permutation taking a pair `(a, b)` to `(−b, a)`. Every
    /// operation is then contiguous (a small matmul and two same-shape products) instead of a
    /// strided 5-D view: several times faster on CPU backends.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, heads, r]` → `[batch, seq, heads, r]` (heads may be 1 for the shared key).
    pub fn apply<B: Backend>(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        self.apply_at(x, Positions::From(start))
    }

    /// Rotates `x` at `positions` (consecutive from a start, or one per token for packed rows).
    ///
    /// # Shapes
    /// `x`: `[batch, seq, heads, r]` → `[batch, seq, heads, r]`.
    pub fn apply_at<B: Backend>(&self, x: Tensor<B, 4>, positions: Positions) -> Tensor<B, 4> {
        let [batch, seq, heads, dim] = x.dims();
        let device = x.device();
        // The tables are computed in f32 and rounded to the activations' dtype, as transformers
        // does; the rotation matrix holds only 0 and ±1, exact in any dtype.
        let at = (&device, x.dtype());
        let (cos, sin) = self.full_tables(positions, batch, seq, heads);
        let cos = Tensor::<B, 4>::from_data(TensorData::new(cos, [batch, seq, heads, dim]), at);
        let sin = Tensor::<B, 4>::from_data(TensorData::new(sin, [batch, seq, heads, dim]), at);
        let r = Tensor::<B, 2>::from_data(TensorData::new(self.rotation(dim), [dim, dim]), at);
        let rotated = x
            .clone()
            .reshape([batch * seq * heads, dim])
            .matmul(r)
            .reshape([batch, seq, heads, dim]); // [b, s, h, r]
        x * cos + rotated * sin
    }

    /// Index of the partner of pair `i`'s first element, and of its second.
    fn pair(&self, i: usize, dim: usize) -> (usize, usize) {
        if self.interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + dim / 2)
        }
    }

    /// `R` `[r, r]` with `(x·R)[a] = −x[b]`, `(x·R)[b] = x[a]` for every pair `(a, b)`.
    fn rotation(&self, dim: usize) -> Vec<f32> {
        let mut r = vec![0f32; dim * dim];
        for i in 0..dim / 2 {
            let (a, b) = self.pair(i, dim);
            r[b * dim + a] = -1.0; // column a takes −x[b]
            r[a * dim + b] = 1.0; // column b takes x[a]
        }
        r
    }

    /// cos and sin tables laid out exactly like `x` `[batch, seq, heads, r]`, each pair's value
    /// at both of its positions.
    fn full_tables(
        &self,
        positions: Positions,
        batch: usize,
        seq: usize,
        heads: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        // One table row per distinct position: `start..start + seq`, or `0..=max` when packed.
        let (start, rows) = match positions {
            Positions::From(start) => (start, seq),
            Positions::PerToken(p) => {
                assert_eq!(p.len(), batch * seq, "one position per token");
                (0, p.iter().max().map_or(0, |m| m + 1))
            }
        };
        let (cos, sin) = self.pair_values(start, rows);
        let mut cos_row = vec![0f32; rows * dim];
        let mut sin_row = vec![0f32; rows * dim];
        for p in 0..rows {
            for i in 0..half {
                let (a, b) = self.pair(i, dim);
                let (c, s) = (cos[p * half + i], sin[p * half + i]);
                cos_row[p * dim + a] = c;
                cos_row[p * dim + b] = c;
                sin_row[p * dim + a] = s;
                sin_row[p * dim + b] = s;
            }
        }
        let tile = |row: &[f32]| {
            let mut out = Vec::with_capacity(batch * seq * heads * dim);
            for b in 0..batch {
                for i in 0..seq {
                    let p = match positions {
                        Positions::From(_) => i,
                        Positions::PerToken(p) => p[b * seq + i],
                    };
                    for _ in 0..heads {
                        out.extend_from_slice(&row[p * dim..(p + 1) * dim]);
                    }
                }
            }
            out
        };
        (tile(&cos_row), tile(&sin_row))
    }
}

/// The positions of the tokens a rotation applies to.
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// `start..start + seq` in every row.
    From(usize),
    /// One per token, `[batch·seq]` row-major (packed rows, see [`crate::packing`]).
    PerToken(&'a [usize]),
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
                assert!(
                    (ratio - 1.0 / y.factor).abs() < 1e-6,
                    "dim {i} should be interpolated: {ratio}"
                );
            } else {
                assert!(
                    ratio < 1.0 && ratio > 1.0 / y.factor,
                    "dim {i} should be blended: {ratio}"
                );
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod flex_tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    /// Direct rotation of each pair, the textbook form, as the reference.
    fn rotate_pairs(
        rope: &RotaryEmbedding,
        x: &[f32],
        [b, s, h, d]: [usize; 4],
        start: usize,
    ) -> Vec<f32> {
        let mut out = x.to_vec();
        for bi in 0..b {
            for p in 0..s {
                for hi in 0..h {
                    let base = ((bi * s + p) * h + hi) * d;
                    for (i, &f) in rope.inv_freq.iter().enumerate() {
                        let angle = (f as f32 * (start + p) as f32) as f64;
                        let (c, sn) = (
                            angle.cos() * rope.attention_factor,
                            angle.sin() * rope.attention_factor,
                        );
                        let (ia, ib) = rope.pair(i, d);
                        let (xa, xb) = (x[base + ia] as f64, x[base + ib] as f64);
                        out[base + ia] = (xa * c - xb * sn) as f32;
                        out[base + ib] = (xa * sn + xb * c) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn apply_rotates_each_pair_by_its_angle() {
        let device = Default::default();
        for interleaved in [true, false] {
            let mut cfg = crate::config::DeepSeekConfig::tiny().rope;
            cfg.interleaved = interleaved;
            let rope = RotaryEmbedding::new(&cfg, 8);
            let shape = [2, 5, 3, 8];
            let x = Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let values: Vec<f32> = x.to_data().into_vec().unwrap();
            let got: Vec<f32> = rope.apply(x, 7).into_data().into_vec().unwrap();
            let want = rotate_pairs(&rope, &values, shape, 7);
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, |m, d| {
                if d.is_nan() {
                    f32::INFINITY
                } else {
                    m.max(d)
                }
            });
            assert!(diff < 1e-5, "interleaved={interleaved}: {diff}");
        }
    }
}
