//! One latent KV cache shared by several sequences of different lengths, for batched decoding
//! with sequences that join and leave at any step (continuous batching).
//!
//! Every block holds buffers of `slots` rows: row `r` caches sequence `r`'s latent `c_kv` and
//! rotated shared key `k_rope` (see [`crate::cache`]), filled to its own length. The sequences
//! in use always occupy rows `0..active`: a joining sequence takes row `active`, and a leaving
//! one is replaced by the last row (one row copy per block), so a decoding step runs over one
//! contiguous `[active, ..]` batch with ragged lengths and never over free rows.

use burn::tensor::{backend::Backend, Tensor};

use crate::cache::LatentKv;
use crate::config::DeepSeekConfig;
use crate::error::{DeepSeekError, Result};

/// One block's buffers: `[slots, capacity, kv_lora_rank]` and `[slots, capacity, rope]`.
#[derive(Debug, Clone)]
pub struct SlotBuffers<B: Backend> {
    c_kv: Tensor<B, 3>,
    k_rope: Tensor<B, 3>,
}

/// Writes `values` `[1, seq, width]` into `buffer` at row `row`, positions `at..at + seq`. The
/// buffer is moved out while writing, so the backend sees the only reference and may update it
/// in place rather than copy it whole.
fn write_row<B: Backend>(buffer: &mut Tensor<B, 3>, row: usize, at: usize, values: Tensor<B, 3>) {
    let [_, seq, _] = values.dims();
    let placeholder = Tensor::empty([0, 0, 0], &values.device());
    let whole = std::mem::replace(buffer, placeholder);
    *buffer = whole.slice_assign([row..row + 1, at..at + seq], values);
}

impl<B: Backend> SlotBuffers<B> {
    /// Writes one sequence's latents `new` (`[1, seq, ..]`) into `row` from position `at`.
    pub fn write(&mut self, row: usize, at: usize, new: LatentKv<B>) {
        write_row(&mut self.c_kv, row, at, new.c_kv);
        write_row(&mut self.k_rope, row, at, new.k_rope);
    }

    /// Writes the latent of one new token per row: row `i` of `new` (`[rows, 1, ..]`) at
    /// position `positions[i]`.
    pub fn write_step(&mut self, positions: &[usize], new: LatentKv<B>) {
        for (row, &at) in positions.iter().enumerate() {
            let one = LatentKv {
                c_kv: new.c_kv.clone().narrow(0, row, 1),
                k_rope: new.k_rope.clone().narrow(0, row, 1),
            };
            self.write(row, at, one);
        }
    }

    /// The cached latents of rows `0..rows`, positions `0..len` (positions past a row's own
    /// length hold stale or zero values: attention masks them).
    ///
    /// # Shapes
    /// → `c_kv`: `[rows, len, kv_lora]`, `k_rope`: `[rows, len, rope]`.
    pub fn read(&self, rows: usize, len: usize) -> LatentKv<B> {
        LatentKv {
            c_kv: self.c_kv.clone().narrow(0, 0, rows).narrow(1, 0, len),
            k_rope: self.k_rope.clone().narrow(0, 0, rows).narrow(1, 0, len),
        }
    }

    /// Copies positions `0..len` of row `from` into row `to`.
    fn copy_row(&mut self, from: usize, to: usize, len: usize) {
        let moved = LatentKv {
            c_kv: self.c_kv.clone().narrow(0, from, 1).narrow(1, 0, len),
            k_rope: self.k_rope.clone().narrow(0, from, 1).narrow(1, 0, len),
        };
        self.write(to, 0, moved);
    }

    fn bytes_per_token(&self) -> usize {
        self.c_kv.dims()[2] * self.c_kv.dtype().size()
            + self.k_rope.dims()[2] * self.k_rope.dtype().size()
    }
}

/// Latent caches of all main blocks for up to `slots` sequences, each with its own length.
#[derive(Debug, Clone)]
pub struct SlotCache<B: Backend> {
    blocks: Vec<SlotBuffers<B>>,
    /// Cached positions of the sequences in rows `0..lens.len()`.
    lens: Vec<usize>,
    slots: usize,
    capacity: usize,
}

impl<B: Backend> SlotCache<B> {
    /// Preallocates `slots` rows of `capacity` tokens for every block; `capacity` may not exceed
    /// the model's `max_position_embeddings`.
    pub fn new(
        cfg: &DeepSeekConfig,
        slots: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Result<Self> {
        if capacity > cfg.max_position_embeddings {
            return Err(DeepSeekError::Input(format!(
                "a cache of {capacity} tokens exceeds the model's context of {} (max_position_embeddings)",
                cfg.max_position_embeddings
            )));
        }
        if slots == 0 || capacity == 0 {
            return Err(DeepSeekError::Input(format!(
                "a slot cache needs at least one slot and one position, got {slots} × {capacity}"
            )));
        }
        let blocks = (0..cfg.num_hidden_layers)
            .map(|_| SlotBuffers {
                c_kv: Tensor::zeros([slots, capacity, cfg.kv_lora_rank], device),
                k_rope: Tensor::zeros([slots, capacity, cfg.qk_rope_head_dim], device),
            })
            .collect();
        Ok(Self { blocks, lens: Vec::new(), slots, capacity })
    }

    /// Rows the buffers hold (the most sequences at once).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Tokens one row can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sequences in the cache; they occupy rows `0..active()`.
    pub fn active(&self) -> usize {
        self.lens.len()
    }

    /// Whether every row is taken.
    pub fn is_full(&self) -> bool {
        self.lens.len() == self.slots
    }

    /// Cached positions of each sequence, in row order (the position of its next token).
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Blocks the cache holds buffers for.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The per-block buffers, in block order.
    pub fn blocks_mut(&mut self) -> &mut [SlotBuffers<B>] {
        &mut self.blocks
    }

    /// Bytes one token of one sequence occupies, over all blocks.
    pub fn bytes_per_token(&self) -> usize {
        self.blocks.iter().map(SlotBuffers::bytes_per_token).sum()
    }

    /// Takes the next free row for a sequence whose first `len` tokens are about to be written;
    /// returns the row. Fails when every row is taken or `len` exceeds the capacity.
    pub fn open(&mut self, len: usize) -> Result<usize> {
        if self.is_full() {
            return Err(DeepSeekError::Input(format!("all {} cache slots are taken", self.slots)));
        }
        if len > self.capacity {
            return Err(DeepSeekError::Input(format!(
                "a prompt of {len} tokens exceeds the cache of {} tokens per sequence",
                self.capacity
            )));
        }
        self.lens.push(len);
        Ok(self.lens.len() - 1)
    }

    /// Fails unless every active sequence has room for one more token.
    pub fn check_step(&self) -> Result<()> {
        if let Some((row, _)) = self.lens.iter().enumerate().find(|(_, &l)| l >= self.capacity) {
            return Err(DeepSeekError::Input(format!(
                "context full: the sequence in slot {row} holds {} tokens, the cache's capacity",
                self.capacity
            )));
        }
        Ok(())
    }

    /// Records one decoded token in every active row (after the step wrote it).
    pub fn advance(&mut self) {
        self.lens.iter_mut().for_each(|l| *l += 1);
    }

    /// Frees `row`: the last active row moves into it (its latents copied in every block).
    /// Returns the old index of the row that moved, if one did, so callers can follow it.
    pub fn remove(&mut self, row: usize) -> Option<usize> {
        assert!(row < self.lens.len(), "slot {row} is not in use");
        let last = self.lens.len() - 1;
        self.lens.swap_remove(row);
        if row == last {
            return None;
        }
        let len = self.lens[row];
        if len > 0 {
            for block in &mut self.blocks {
                block.copy_row(last, row, len);
            }
        }
        Some(last)
    }

    /// Forgets every sequence.
    pub fn clear(&mut self) {
        self.lens.clear();
    }
}
