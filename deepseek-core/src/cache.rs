//! The latent KV cache of MLA (DeepSeek-V2 §2.1.2): per block, only the normalized latent `c_kv`
//! and the rotated shared key `k_rope`, `kv_lora_rank + qk_rope_head_dim` values per token per
//! block (576 for V3, 70 KB per token over 61 blocks in bf16, against about 5 MB for a plain
//! multi-head cache). Buffers are allocated once for the whole context, at the first write and
//! in the dtype the model computes in (bf16 for a bf16 model); running past the context is an
//! error, not a reallocation.

use burn::tensor::{backend::Backend, Tensor};

use crate::config::DeepSeekConfig;
use crate::error::{DeepSeekError, Result};

/// Fails when a cache of `capacity` tokens per sequence exceeds the model's context.
pub(crate) fn check_capacity(cfg: &DeepSeekConfig, capacity: usize) -> Result<()> {
    if capacity > cfg.max_position_embeddings {
        return Err(DeepSeekError::Input(format!(
            "a cache of {capacity} tokens exceeds the model's context of {} (max_position_embeddings)",
            cfg.max_position_embeddings
        )));
    }
    Ok(())
}

/// What attention over a token stores: the normalized latent and the rotated shared key. This is
/// all a latent KV cache keeps.
#[derive(Debug, Clone)]
pub struct LatentKv<B: Backend> {
    /// `[batch, seq, kv_lora_rank]`
    pub c_kv: Tensor<B, 3>,
    /// `[batch, seq, rope]`, already rotated.
    pub k_rope: Tensor<B, 3>,
}

/// `kv_b_proj` split per head for absorbed attention and laid out for its two batched GEMMs
/// (`W_UK` folded into the query, `W_UV` applied after the weighted sum). Deriving them is a
/// reshape, a permutation and a copy of the whole projection, once per block and step if done
/// in the step; the latent caches keep them beside the latents instead (`Mla::forward_cached`),
/// since both hold values of the same weights.
#[derive(Debug, Clone)]
pub struct AbsorbedWeights<B: Backend> {
    /// `[heads, nope, kv_lora]`: `W_UK_hᵀ` per head.
    pub w_uk: Tensor<B, 3>,
    /// `[heads, kv_lora, v]`: `W_UV_h` per head.
    pub w_uv: Tensor<B, 3>,
}

/// One block's buffers and how many positions of them are filled. Attention appends to the slot
/// of its own block; the slot advances itself, so the blocks need no shared counter.
#[derive(Debug, Clone)]
pub struct LatentSlot<B: Backend> {
    /// `[batch, capacity, kv_lora_rank]` (`[batch, 0, kv_lora_rank]` until the first write)
    c_kv: Tensor<B, 3>,
    /// `[batch, capacity, qk_rope_head_dim]` (likewise)
    k_rope: Tensor<B, 3>,
    len: usize,
    capacity: usize,
    /// `W_UK` and `W_UV` of the block that fills this slot, derived at its first absorbed step.
    absorbed: Option<AbsorbedWeights<B>>,
}

impl<B: Backend> LatentSlot<B> {
    /// The absorbed attention weights of this slot's block, `derive`d once. A cache holds values
    /// of one model's weights (its latents, and these); after the weights change, start a new
    /// cache.
    pub fn absorbed_weights(
        &mut self,
        derive: impl FnOnce() -> AbsorbedWeights<B>,
    ) -> &AbsorbedWeights<B> {
        self.absorbed.get_or_insert_with(derive)
    }

    /// Positions cached in this slot (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the latent of positions `len..len + seq`, advances past them and returns the
    /// cached latent of positions `0..len + seq`. The caller checked the room
    /// ([`LatentCache::check_fits`]).
    ///
    /// # Shapes
    /// `new.c_kv`: `[batch, seq, kv_lora]` → `c_kv`: `[batch, len + seq, kv_lora]`.
    pub fn append(&mut self, new: LatentKv<B>) -> LatentKv<B> {
        let [batch, seq, _] = new.c_kv.dims();
        let (start, end) = (self.len, self.len + seq);
        let capacity = self.capacity;
        assert!(end <= capacity, "latent cache overflow: check_fits before the forward pass");
        // Move the buffers out while writing, so the backend sees the only reference and may
        // update them in place rather than copy them whole at every decoding step.
        let write = |slot: &mut Tensor<B, 3>, values: Tensor<B, 3>| {
            let placeholder = Tensor::empty([0, 0, 0], &values.device());
            let mut buffer = std::mem::replace(slot, placeholder);
            // The first write allocates the buffer in the dtype the model computes in; a later
            // write in another dtype is rounded to it.
            let [rows, allocated, width] = buffer.dims();
            if allocated == 0 {
                buffer = Tensor::zeros([rows, capacity, width], (&values.device(), values.dtype()));
            }
            let values = values.cast(buffer.dtype());
            *slot = buffer.slice_assign([0..batch, start..end], values);
        };
        write(&mut self.c_kv, new.c_kv);
        write(&mut self.k_rope, new.k_rope);
        self.len = end;
        LatentKv {
            c_kv: self.c_kv.clone().narrow(1, 0, end),
            k_rope: self.k_rope.clone().narrow(1, 0, end),
        }
    }

    /// Bytes one token of one sequence occupies in this slot's buffers.
    fn bytes_per_token(&self) -> usize {
        self.c_kv.dims()[2] * self.c_kv.dtype().size()
            + self.k_rope.dims()[2] * self.k_rope.dtype().size()
    }
}

/// Latent caches of all main blocks (or of one MTP block), one [`LatentSlot`] each, filled up to
/// [`LatentCache::len`].
#[derive(Debug, Clone)]
pub struct LatentCache<B: Backend> {
    slots: Vec<LatentSlot<B>>,
    capacity: usize,
    batch: usize,
}

impl<B: Backend> LatentCache<B> {
    /// Room for `capacity` tokens of `batch` sequences (allocated at the first write); `capacity`
    /// may not exceed the model's `max_position_embeddings`.
    pub fn new(
        cfg: &DeepSeekConfig,
        batch: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Result<Self> {
        Self::with_blocks(cfg, cfg.num_hidden_layers, batch, capacity, device)
    }

    /// A cache for the one block of an MTP module (speculative drafting keeps one per module).
    pub fn for_mtp(
        cfg: &DeepSeekConfig,
        batch: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Result<Self> {
        Self::with_blocks(cfg, 1, batch, capacity, device)
    }

    fn with_blocks(
        cfg: &DeepSeekConfig,
        blocks: usize,
        batch: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Result<Self> {
        check_capacity(cfg, capacity)?;
        let slots = (0..blocks)
            .map(|_| LatentSlot {
                c_kv: Tensor::empty([batch, 0, cfg.kv_lora_rank], device),
                k_rope: Tensor::empty([batch, 0, cfg.qk_rope_head_dim], device),
                len: 0,
                capacity,
                absorbed: None,
            })
            .collect();
        Ok(Self { slots, capacity, batch })
    }

    /// Tokens cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.slots.first().map_or(0, LatentSlot::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens the buffers can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Blocks the cache holds slots for.
    pub fn blocks(&self) -> usize {
        self.slots.len()
    }

    /// The per-block slots, in block order: block `l`'s attention appends to slot `l`.
    pub fn slots_mut(&mut self) -> &mut [LatentSlot<B>] {
        &mut self.slots
    }

    /// Bytes one token occupies in the allocated buffers, over all blocks, for one sequence.
    /// Measured from the buffers themselves (shape and dtype), not from the config; the buffers
    /// take the model's dtype at the first write, so measure after one.
    pub fn bytes_per_token(&self) -> usize {
        self.slots.iter().map(LatentSlot::bytes_per_token).sum()
    }

    /// Fails unless `new_tokens` more tokens of a `batch`-sequence input fit this cache.
    pub fn check_fits(&self, batch: usize, new_tokens: usize) -> Result<()> {
        if batch != self.batch {
            return Err(DeepSeekError::Input(format!(
                "batch of {batch} sequences for a cache built for {}",
                self.batch
            )));
        }
        self.check_room(new_tokens)
    }

    /// Fails unless `new_tokens` more fit.
    pub fn check_room(&self, new_tokens: usize) -> Result<()> {
        if self.len() + new_tokens > self.capacity {
            return Err(DeepSeekError::Input(format!(
                "context full: {} cached + {new_tokens} new tokens exceed the cache of {} tokens",
                self.len(),
                self.capacity
            )));
        }
        Ok(())
    }

    /// Forgets everything after the first `len` tokens (speculative decoding rolls back this way;
    /// the stale values are overwritten by the next append).
    pub fn truncate(&mut self, len: usize) {
        for slot in &mut self.slots {
            slot.len = slot.len.min(len);
        }
    }
}
