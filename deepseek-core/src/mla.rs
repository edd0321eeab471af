//! Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).
//!
//! Keys and values are compressed jointly into a latent `c_kv` of width `kv_lora_rank`
//! (`kv_a_proj_with_mqa`, then `kv_a_layernorm`), from which `kv_b_proj` expands per-head
//! `k_nope` and `v`. Position information rides on a separate, decoupled rotary part: a key
//! `k_rope` of width `qk_rope_head_dim` shared by all heads (it comes out of `kv_a_proj_with_mqa`
//! next to the latent) and a per-head `q_rope`. Queries are optionally compressed too
//! (`q_a_proj` → `q_a_layernorm` → `q_b_proj`, or a direct `q_proj` when `q_lora_rank` is null).
//!
//! `scores = [q_nope, q_rope] · [k_nope, k_rope]ᵀ · scale`, causal softmax in f32,
//! `o = o_proj(softmax(scores) · v)`. This file holds the naive path (K and V expanded per head),
//! used for prefill and training, and the absorbed path (`attend_absorbed`), which attends over
//! the latent directly and suits decoding from a latent KV cache. Both take the same inputs and
//! agree to f32 rounding (a test checks it).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Bool, FloatDType, Tensor, TensorData};

use crate::cache::{AbsorbedWeights, LatentKv, LatentSlot};
use crate::fp8::GemmPrecision;
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::packing::Packing;
use crate::projection::Projection;
use crate::rope::{Positions, RotaryEmbedding};
use crate::slot_cache::SlotBuffers;

/// Builds an [`Mla`].
#[derive(Config, Debug)]
pub struct MlaConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Heads `n_h`.
    pub n_heads: usize,
    /// Query compression rank; `None` for a direct `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// KV latent width.
    pub kv_lora_rank: usize,
    /// Per-head query/key width without rotation.
    pub qk_nope_head_dim: usize,
    /// Width of the rotary query/key part.
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// Epsilon of the latent norms.
    pub rms_norm_eps: f64,
    /// Softmax scale, `d_qk^-0.5 · mscale²` (see `DeepSeekConfig::softmax_scale`).
    pub softmax_scale: f64,
}

impl MlaConfig {
    /// A fresh attention layer (weights drawn lazily, as Burn's `Linear` draws them).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mla<B> {
        let linear = |i, o| Projection::new(i, o, device);
        let qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim;
        let q = match self.q_lora_rank {
            None => QueryProj::Direct(linear(self.d_model, self.n_heads * qk_head_dim)),
            Some(rank) => QueryProj::LowRank(LowRankQuery {
                q_a_proj: linear(self.d_model, rank),
                q_a_layernorm: RmsNormConfig::new(rank).with_eps(self.rms_norm_eps).init(device),
                q_b_proj: linear(rank, self.n_heads * qk_head_dim),
            }),
        };
        Mla {
            q,
            kv_a_proj_with_mqa: linear(self.d_model, self.kv_lora_rank + self.qk_rope_head_dim),
            kv_a_layernorm: RmsNormConfig::new(self.kv_lora_rank)
                .with_eps(self.rms_norm_eps)
                .init(device),
            kv_b_proj: linear(
                self.kv_lora_rank,
                self.n_heads * (self.qk_nope_head_dim + self.v_head_dim),
            ),
            o_proj: linear(self.n_heads * self.v_head_dim, self.d_model),
            n_heads: self.n_heads,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
            softmax_scale: self.softmax_scale,
        }
    }
}

/// The two query projections a checkpoint may carry.
// One per block, built once (see `FeedForward`).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum QueryProj<B: Backend> {
    /// `q_proj`: `[d] → [n_h·d_qk]` (V2-Lite).
    Direct(Projection<B>),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))` (V3).
    LowRank(LowRankQuery<B>),
}

/// Low-rank query compression.
#[derive(Module, Debug)]
pub struct LowRankQuery<B: Backend> {
    /// `[d] → [q_lora_rank]`
    pub q_a_proj: Projection<B>,
    /// Norm of the compressed query.
    pub q_a_layernorm: RmsNorm<B>,
    /// `[q_lora_rank] → [n_h·d_qk]`
    pub q_b_proj: Projection<B>,
}

impl<B: Backend> QueryProj<B> {
    fn forward(&self, x: Tensor<B, 3>, gemm: GemmPrecision) -> Tensor<B, 3> {
        match self {
            QueryProj::Direct(q_proj) => q_proj.forward(x, gemm),
            QueryProj::LowRank(q) => {
                q.q_b_proj.forward(q.q_a_layernorm.forward(q.q_a_proj.forward(x, gemm)), gemm)
            }
        }
    }
}

/// Which MLA path a cached forward pass takes; both give the same result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// Expand per-head keys and values from the latent (prefill).
    Naive,
    /// Attend over the latent with absorbed projections (decode).
    Absorbed,
}

/// Multi-head latent attention; weights named as in the checkpoints.
#[derive(Module, Debug)]
pub struct Mla<B: Backend> {
    /// The query projection, direct or low-rank.
    pub q: QueryProj<B>,
    /// `[d] → [kv_lora_rank + rope]`: the latent and the shared rotary key.
    pub kv_a_proj_with_mqa: Projection<B>,
    /// Norm of the latent (what the cache stores is after it).
    pub kv_a_layernorm: RmsNorm<B>,
    /// `[kv_lora_rank] → [n_h·(nope + v)]`: per-head `k_nope` and `v` (`W_UK`, `W_UV`).
    pub kv_b_proj: Projection<B>,
    /// `[n_h·v] → [d]`
    pub o_proj: Projection<B>,
    /// Heads `n_h`.
    #[module(skip)]
    pub n_heads: usize,
    /// Latent width.
    #[module(skip)]
    pub kv_lora_rank: usize,
    /// Per-head width of the non-rotated query/key part.
    #[module(skip)]
    pub qk_nope_head_dim: usize,
    /// Width of the rotated query/key part.
    #[module(skip)]
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    #[module(skip)]
    pub v_head_dim: usize,
    /// `d_qk^-0.5 · mscale²`.
    #[module(skip)]
    pub softmax_scale: f64,
}

/// Per-head queries, split into the part matched against `k_nope` and the rotated part.
pub struct Queries<B: Backend> {
    /// `[batch, seq, heads, nope]`
    pub nope: Tensor<B, 4>,
    /// `[batch, seq, heads, rope]`, already rotated.
    pub rope: Tensor<B, 4>,
}

impl<B: Backend> Mla<B> {
    /// `W_UK` and `W_UV` of this block's `kv_b_proj` (its adapter folded in), each contiguous.
    pub fn absorbed_weights(&self) -> AbsorbedWeights<B> {
        let [kv_lora, _] = self.kv_b_proj.dims();
        let (heads, nope, v_dim) = (self.n_heads, self.qk_nope_head_dim, self.v_head_dim);
        // kv_b_proj weight in Burn layout [kv_lora, heads·(nope + v)].
        let w = self.kv_b_proj.effective_weight().reshape([kv_lora, heads, nope + v_dim]); // [c, h, nope + v]
                                                                                           // Reshaping a permuted view through its flat size makes the copy contiguous.
        let w_uk = w.clone().narrow(2, 0, nope).permute([1, 2, 0]); // [h, nope, c]
        let w_uv = w.narrow(2, nope, v_dim).swap_dims(0, 1); // [h, c, v]
        AbsorbedWeights {
            w_uk: w_uk.reshape([heads * nope * kv_lora]).reshape([heads, nope, kv_lora]),
            w_uv: w_uv.reshape([heads * kv_lora * v_dim]).reshape([heads, kv_lora, v_dim]),
        }
    }

    /// Causal self-attention over `x` from position 0, or, with `packing`, over each packed
    /// document on its own (positions restarting at 0, no attention across documents); the
    /// projections' GEMMs at `gemm` precision.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        packing: Option<&Packing>,
        gemm: GemmPrecision,
    ) -> Tensor<B, 3> {
        let (at, visible) = match packing {
            None => (Positions::From(0), Visible::Causal { start: 0 }),
            Some(p) => (Positions::PerToken(p.positions()), Visible::Packed(p)),
        };
        let q = self.queries_at(x.clone(), rope, at, gemm);
        let kv = self.latent_at(x, rope, at, gemm);
        self.attend_expanded(q, kv, visible, gemm)
    }

    /// Attention of new positions `slot.len()..` over everything cached in this block's `slot`,
    /// after appending their latents to it.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        slot: &mut LatentSlot<B>,
        path: AttentionPath,
        gemm: GemmPrecision,
    ) -> Tensor<B, 3> {
        let start = slot.len();
        let q = self.queries(x.clone(), rope, start, gemm);
        let kv = slot.append(self.latent(x, rope, start, gemm));
        match path {
            AttentionPath::Naive => self.attend_naive(q, kv, start, gemm),
            AttentionPath::Absorbed => {
                let batch = q.nope.dims()[0];
                let weights = slot.absorbed_weights(|| self.absorbed_weights());
                self.attend_absorbed_with(q, kv, &vec![start; batch], weights, gemm)
            }
        }
    }

    /// Prefill of one sequence (`batch` 1, from position 0) whose latents go to row `row` of a
    /// shared slot cache; the naive path, as [`Mla::forward_cached`] prefills.
    ///
    /// # Shapes
    /// `x`: `[1, seq, d_model]` → `[1, seq, d_model]`.
    pub fn forward_prefill_slot(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        buffers: &mut SlotBuffers<B>,
        row: usize,
        gemm: GemmPrecision,
    ) -> Tensor<B, 3> {
        let q = self.queries(x.clone(), rope, 0, gemm);
        let kv = self.latent(x, rope, 0, gemm);
        buffers.write(row, 0, kv.clone());
        self.attend_naive(q, kv, 0, gemm)
    }

    /// One decoding step of rows `0..rows` of a shared slot cache at once: row `i`'s new token
    /// sits at position `positions[i]` and attends over that row's cached positions
    /// `0..=positions[i]` (absorbed path; the rows' lengths differ, the mask keeps each to its
    /// own). Each row computes what [`Mla::forward_cached`] computes for it alone.
    ///
    /// The rows' tokens come side by side in one row, `[1, rows, d]`, so every projection is one
    /// GEMM of `rows` rows rather than `rows` GEMMs of one (a `[rows, 1, d]` batch runs as that on
    /// Flex, and multiplies wrongly on wgpu).
    ///
    /// # Shapes
    /// `x`: `[1, rows, d_model]` → `[1, rows, d_model]`.
    pub fn forward_decode_slots(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        buffers: &mut SlotBuffers<B>,
        positions: &[usize],
        gemm: GemmPrecision,
    ) -> Tensor<B, 3> {
        let [one, rows, d_model] = x.dims();
        assert_eq!((one, rows), (1, positions.len()), "the rows' tokens side by side");
        let at = Positions::PerToken(positions);
        let q = self.queries_at(x.clone(), rope, at, gemm); // [1, rows, h, ·]
        let kv = self.latent_at(x, rope, at, gemm); // [1, rows, ·]
        let as_rows = |t: Tensor<B, 3>| {
            let width = t.dims()[2];
            t.reshape([rows, 1, width])
        };
        buffers
            .write_step(positions, LatentKv { c_kv: as_rows(kv.c_kv), k_rope: as_rows(kv.k_rope) });
        let as_rows4 = |t: Tensor<B, 4>| {
            let [_, _, heads, width] = t.dims();
            t.reshape([rows, 1, heads, width])
        };
        let q = Queries { nope: as_rows4(q.nope), rope: as_rows4(q.rope) };
        let len = positions.iter().max().map_or(0, |p| p + 1);
        let kv = buffers.read(rows, len);
        let weights = buffers.absorbed_weights(|| self.absorbed_weights());
        self.attend_absorbed_with(q, kv, positions, weights, gemm).reshape([1, rows, d_model])
    }

    /// Projects and rotates the queries.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, d_model]`.
    pub fn queries(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        start: usize,
        gemm: GemmPrecision,
    ) -> Queries<B> {
        self.queries_at(x, rope, Positions::From(start), gemm)
    }

    fn queries_at(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        at: Positions,
        gemm: GemmPrecision,
    ) -> Queries<B> {
        let [batch, seq, _] = x.dims();
        let q = self.q.forward(x, gemm).reshape([
            batch,
            seq,
            self.n_heads,
            self.qk_nope_head_dim + self.qk_rope_head_dim,
        ]); // [b, s, h, d_qk]
        let nope = q.clone().narrow(3, 0, self.qk_nope_head_dim); // [b, s, h, nope]
        let q_rope = q.narrow(3, self.qk_nope_head_dim, self.qk_rope_head_dim); // [b, s, h, rope]
        Queries { nope, rope: rope.apply_at(q_rope, at) }
    }

    /// Compresses `x` into the cached latent and the rotated shared key.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, d_model]`.
    pub fn latent(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        start: usize,
        gemm: GemmPrecision,
    ) -> LatentKv<B> {
        self.latent_at(x, rope, Positions::From(start), gemm)
    }

    fn latent_at(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        at: Positions,
        gemm: GemmPrecision,
    ) -> LatentKv<B> {
        let [batch, seq, _] = x.dims();
        let kv = self.kv_a_proj_with_mqa.forward(x, gemm); // [b, s, kv_lora + rope]
        let c_kv = self.kv_a_layernorm.forward(kv.clone().narrow(2, 0, self.kv_lora_rank)); // [b, s, kv_lora]
        let k_rope = kv.narrow(2, self.kv_lora_rank, self.qk_rope_head_dim).reshape([
            batch,
            seq,
            1,
            self.qk_rope_head_dim,
        ]); // [b, s, 1, rope]
        let k_rope = rope.apply_at(k_rope, at).reshape([batch, seq, self.qk_rope_head_dim]); // [b, s, rope]
        LatentKv { c_kv, k_rope }
    }

    /// Naive attention: expands the latent into per-head keys and values, then attends.
    /// `kv` covers positions `0..kv_len`; the queries cover `start..start + q_len` with
    /// `start + q_len == kv_len`.
    ///
    /// # Shapes
    /// `q.nope`: `[batch, q_len, heads, nope]`, `kv.c_kv`: `[batch, kv_len, kv_lora]` →
    /// `[batch, q_len, d_model]`.
    pub fn attend_naive(
        &self,
        q: Queries<B>,
        kv: LatentKv<B>,
        start: usize,
        gemm: GemmPrecision,
    ) -> Tensor<B, 3> {
        self.attend_expanded(q, kv, Visible::Causal { start }, gemm)
    }

    fn attend_expanded(
        &self,
        q: Queries<B>,
        kv: LatentKv<B>,
        visible: Visible,
        gemm: GemmPrecision,
    ) -> Tensor<B, 3> {
        let [batch, q_len, heads, _] = q.nope.dims();
        let [_, kv_len, _] = kv.c_kv.dims();
        let kv_b = self.kv_b_proj.forward(kv.c_kv, gemm).reshape([
            batch,
            kv_len,
            heads,
            self.qk_nope_head_dim + self.v_head_dim,
        ]); // [b, t, h, nope + v]
        let k_nope = kv_b.clone().narrow(3, 0, self.qk_nope_head_dim); // [b, t, h, nope]
        let v = kv_b.narrow(3, self.qk_nope_head_dim, self.v_head_dim).swap_dims(1, 2); // [b, h, t, v]
        let k_rope = kv.k_rope.reshape([batch, kv_len, 1, self.qk_rope_head_dim]).expand([
            batch,
            kv_len,
            heads,
            self.qk_rope_head_dim,
        ]); // [b, t, h, rope]
        let k = Tensor::cat(vec![k_nope, k_rope], 3).swap_dims(1, 2); // [b, h, t, d_qk]
        let q = Tensor::cat(vec![q.nope, q.rope], 3).swap_dims(1, 2); // [b, h, s, d_qk]
        let o = match visible {
            Visible::Causal { start } => causal_attention(q, k, v, start, self.softmax_scale),
            Visible::Packed(packing) => packed_attention(q, k, v, packing, self.softmax_scale),
        }; // [b, h, s, v]
        let o = o.swap_dims(1, 2).reshape([batch, q_len, heads * self.v_head_dim]); // [b, s, h·v]
        self.o_proj.forward(o, gemm)
    }

    /// Absorbed attention over the latent (DeepSeek-V2 §2.1.2, "absorb" trick): `W_UK` is folded
    /// into the query and `W_UV` applied after the weighted sum, so per-head keys and values are
    /// never materialized. Per head h, with `W_UK_h [kv_lora, nope]` and `W_UV_h [kv_lora, v]`
    /// the slices of `kv_b_proj`:
    /// `scores = (q_nope·W_UK_hᵀ)·c_kvᵀ + q_rope·k_ropeᵀ`, `o_h = (softmax(scores)·c_kv)·W_UV_h`.
    /// Same contract and result as [`Mla::attend_naive`]; cheaper when few queries attend to a
    /// long cached context (decode).
    ///
    /// # Shapes
    /// `q.nope`: `[batch, q_len, heads, nope]`, `kv.c_kv`: `[batch, kv_len, kv_lora]` →
    /// `[batch, q_len, d_model]`.
    pub fn attend_absorbed(
        &self,
        q: Queries<B>,
        kv: LatentKv<B>,
        start: usize,
        gemm: GemmPrecision,
    ) -> Tensor<B, 3> {
        let batch = q.nope.dims()[0];
        self.attend_absorbed_rows(q, kv, &vec![start; batch], gemm)
    }

    /// [`Mla::attend_absorbed`] with a start per row: row `b`'s queries sit at positions
    /// `starts[b]..` and see keys `0..=starts[b] + i` (keys past that are masked, whatever they
    /// hold).
    ///
    /// # Shapes
    /// `q.nope`: `[batch, q_len, heads, nope]`, `kv.c_kv`: `[batch, kv_len, kv_lora]`,
    /// `starts`: `[batch]` → `[batch, q_len, d_model]`.
    pub fn attend_absorbed_rows(
        &self,
        q: Queries<B>,
        kv: LatentKv<B>,
        starts: &[usize],
        gemm: GemmPrecision,
    ) -> Tensor<B, 3> {
        self.attend_absorbed_with(q, kv, starts, &self.absorbed_weights(), gemm)
    }

    /// [`Mla::attend_absorbed_rows`] with `W_UK` and `W_UV` derived beforehand.
    ///
    /// # Shapes
    /// `q.nope`: `[batch, q_len, heads, nope]`, `kv.c_kv`: `[batch, kv_len, kv_lora]`,
    /// `starts`: `[batch]` → `[batch, q_len, d_model]`.
    fn attend_absorbed_with(
        &self,
        q: Queries<B>,
        kv: LatentKv<B>,
        starts: &[usize],
        weights: &AbsorbedWeights<B>,
        gemm: GemmPrecision,
    ) -> Tensor<B, 3> {
        let [batch, q_len, heads, _] = q.nope.dims();
        let [_, _, kv_lora] = kv.c_kv.dims();
        let (nope, v_dim) = (self.qk_nope_head_dim, self.v_head_dim);
        let (w_uk, w_uv) = (weights.w_uk.clone(), weights.w_uv.clone()); // [h, nope, c], [h, c, v]
                                                                         // Per head one GEMM over all batch rows and positions (not one per row).
        let tokens = batch * q_len;
        let q_nope = q.nope.reshape([tokens, heads, nope]).swap_dims(0, 1); // [h, b·s, nope]
        let q_latent = q_nope.matmul(w_uk).reshape([heads, batch, q_len, kv_lora]).swap_dims(0, 1); // [b, h, s, c]
        let q = Tensor::cat(vec![q_latent, q.rope.swap_dims(1, 2)], 3); // [b, h, s, c + rope]

        // One key/value "head" shared by all query heads, as in multi-query attention.
        let k = Tensor::cat(vec![kv.c_kv.clone(), kv.k_rope], 2); // [b, t, c + rope]
        let o_latent = shared_kv_attention(q, k, kv.c_kv, starts, self.softmax_scale); // [b, h, s, c]
        let o_latent = o_latent.swap_dims(0, 1).reshape([heads, tokens, kv_lora]); // [h, b·s, c]
        let o = o_latent.matmul(w_uv).reshape([heads, batch, q_len, v_dim]); // [h, b, s, v]
        let o = o.permute([1, 2, 0, 3]).reshape([1, tokens, heads * v_dim]); // [1, b·s, h·v]
        let d_model = self.o_proj.dims()[1];
        self.o_proj.forward(o, gemm).reshape([batch, q_len, d_model])
    }
}

/// Which keys each query sees.
#[derive(Clone, Copy)]
enum Visible<'a> {
    /// Query `i` at absolute position `start + i` sees keys `0..=start + i`.
    Causal { start: usize },
    /// Causal within each packed document, nothing across documents.
    Packed(&'a Packing),
}

/// [`causal_attention`] over packed rows: the block-diagonal causal mask of `packing`.
///
/// # Shapes
/// `q`: `[batch, heads, seq, d_qk]`, `k`: `[batch, heads, seq, d_qk]`,
/// `v`: `[batch, heads, seq, d_v]` → `[batch, heads, seq, d_v]`.
pub fn packed_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    packing: &Packing,
    scale: f64,
) -> Tensor<B, 4> {
    let [batch, heads, seq, _] = q.dims();
    let dtype = q.dtype();
    let f32 = |t: Tensor<B, 4>| t.cast(FloatDType::F32);
    let mask = packing.mask::<B>(&q.device()).expand([batch, heads, seq, seq]);
    let options = AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: false };
    attention(f32(q), f32(k), f32(v), Some(mask), None, options).cast(dtype)
}

/// [`causal_attention`] for keys and values shared by all heads (multi-query form, as in
/// absorbed MLA): the heads are folded into the query rows, `[b, h·s, d]` against `[b, t, d]`,
/// so keys and values are never copied per head.
///
/// # Shapes
/// `q`: `[batch, heads, q_len, d]`, `k`: `[batch, kv_len, d]`, `v`: `[batch, kv_len, d_v]` →
/// `[batch, heads, q_len, d_v]`.
pub fn shared_kv_causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    start: usize,
    scale: f64,
) -> Tensor<B, 4> {
    let batch = q.dims()[0];
    shared_kv_attention(q, k, v, &vec![start; batch], scale)
}

/// [`shared_kv_causal_attention`] with a start per batch row (sequences of different lengths
/// decoding together): query `i` of row `b` sits at position `starts[b] + i` and sees keys
/// `0..=starts[b] + i`.
///
/// # Shapes
/// `q`: `[batch, heads, q_len, d]`, `k`: `[batch, kv_len, d]`, `v`: `[batch, kv_len, d_v]`,
/// `starts`: `[batch]` → `[batch, heads, q_len, d_v]`.
pub fn shared_kv_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    starts: &[usize],
    scale: f64,
) -> Tensor<B, 4> {
    let [batch, heads, q_len, d] = q.dims();
    let [_, kv_len, d_v] = v.dims();
    assert_eq!(starts.len(), batch, "one start per batch row");
    let dtype = q.dtype();
    let rows = heads * q_len;
    let q = q.reshape([batch, 1, rows, d]).cast(FloatDType::F32); // [b, 1, h·s, d]
    let k = k.unsqueeze_dim::<4>(1).cast(FloatDType::F32); // [b, 1, t, d]
    let v = v.unsqueeze_dim::<4>(1).cast(FloatDType::F32); // [b, 1, t, d_v]

    // Row r is query position r % q_len of head r / q_len.
    let row_mask =
        |start: usize| (0..rows).flat_map(move |r| (0..kv_len).map(move |j| j > start + r % q_len));
    let device = q.device();
    let mask = if starts.iter().all(|&s| s == starts[0]) {
        let mask: Vec<bool> = row_mask(starts[0]).collect();
        Tensor::<B, 2, Bool>::from_data(TensorData::new(mask, [rows, kv_len]), &device)
            .reshape([1, 1, rows, kv_len])
            .expand([batch, 1, rows, kv_len])
    } else {
        let mask: Vec<bool> = starts.iter().flat_map(|&s| row_mask(s)).collect();
        Tensor::<B, 4, Bool>::from_data(TensorData::new(mask, [batch, 1, rows, kv_len]), &device)
    };
    let options = AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: false };
    attention(q, k, v, Some(mask), None, options).reshape([batch, heads, q_len, d_v]).cast(dtype)
}

/// `softmax(q·kᵀ · scale) · v` in f32 with future positions masked: query `i` (absolute position
/// `start + i`) sees keys `0..=start + i`. Goes through Burn's attention op, which backends
/// implement as one fused kernel where they can.
///
/// # Shapes
/// `q`: `[batch, heads, q_len, d_qk]`, `k`: `[batch, heads, kv_len, d_qk]`,
/// `v`: `[batch, heads, kv_len, d_v]` → `[batch, heads, q_len, d_v]`.
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    start: usize,
    scale: f64,
) -> Tensor<B, 4> {
    let [batch, heads, q_len, _] = q.dims();
    let [_, _, kv_len, _] = k.dims();
    let dtype = q.dtype();
    let f32 = |t: Tensor<B, 4>| t.cast(FloatDType::F32);
    // A prefill from position 0 is the plain causal case; otherwise the queries sit at the end
    // of the keys and the mask says so explicitly.
    let from_origin = start == 0 && q_len == kv_len;
    let mask = (!from_origin).then(|| {
        let mask: Vec<bool> =
            (0..q_len).flat_map(|i| (0..kv_len).map(move |j| j > start + i)).collect();
        Tensor::<B, 2, Bool>::from_data(TensorData::new(mask, [q_len, kv_len]), &q.device())
            .reshape([1, 1, q_len, kv_len]) // [1, 1, s, t]
            .expand([batch, heads, q_len, kv_len])
    });
    let options =
        AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: from_origin };
    attention(f32(q), f32(k), f32(v), mask, None, options).cast(dtype)
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    #[test]
    fn queries_at_an_offset_see_the_same_keys_as_in_a_full_causal_pass() {
        let device = Default::default();
        let (b, h, t, d, dv) = (2, 3, 9, 8, 5);
        let rand = |shape: [usize; 4]| {
            Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let (q, k, v) = (rand([b, h, t, d]), rand([b, h, t, d]), rand([b, h, t, dv]));
        let full = causal_attention(q.clone(), k.clone(), v.clone(), 0, 0.3);
        for start in [1, 5, 8] {
            let tail = causal_attention(
                q.clone().narrow(2, start, t - start),
                k.clone(),
                v.clone(),
                start,
                0.3,
            );
            let expected = full.clone().narrow(2, start, t - start);
            let diff = (tail - expected).abs().max().into_scalar();
            assert!(diff < 1e-5, "start {start}: {diff}");
        }
        // The first query sees only the first key: its output is v[0].
        let first = full.narrow(2, 0, 1);
        let diff = (first - v.narrow(2, 0, 1)).abs().max().into_scalar();
        assert!(diff < 1e-6, "{diff}");
    }
}
