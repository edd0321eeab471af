//! One latent KV cache shared by several sequences of different lengths, for batched decoding
//! with sequences that join and leave at any step (continuous batching).
//!
//! Every block keeps, per sequence, its latent `c_kv` and rotated shared key `k_rope` (see
//! [`crate::cache`]) in pages of [`PAGE`] positions, allocated as the sequence grows. The sequences
//! in use always occupy rows `0..active`: a joining sequence takes row `active`, and a leaving one
//! is replaced by the last row (its pages move, nothing is copied), so a decoding step runs over
//! one contiguous `[active, ..]` batch with ragged lengths and never over free rows.
//!
//! Why pages rather than one preallocated `[slots, capacity, ..]` buffer: writing one token into a
//! tensor copies the whole tensor on backends without in-place slice assignment (Flex 0.21 copies
//! on every `slice_assign`), so a write must touch a small tensor. A page write copies `PAGE`
//! positions of one sequence; reading the batch for attention gathers the pages once per step,
//! which costs what attention's own pass over the keys costs. Memory grows with the tokens
//! actually held, not with `slots × capacity`.

use burn::tensor::{backend::Backend, DType, Tensor};

use crate::cache::{check_capacity, AbsorbedWeights, LatentKv};
use crate::config::DeepSeekConfig;
use crate::error::{DeepSeekError, Result};

/// Positions per page.
pub const PAGE: usize = 64;

/// One block's pages: `c_kv[row][page]` is `[1, PAGE, kv_lora_rank]`, `k_rope[row][page]` is
/// `[1, PAGE, rope]`.
#[derive(Debug, Clone)]
pub struct SlotBuffers<B: Backend> {
    c_kv: Vec<Vec<Tensor<B, 3>>>,
    k_rope: Vec<Vec<Tensor<B, 3>>>,
    kv_lora: usize,
    rope: usize,
    device: B::Device,
    /// The dtype of the pages: that of the latents written, which is the model's (f32 until
    /// the first write).
    dtype: DType,
    /// `W_UK` and `W_UV` of this block, derived at its first decoding step.
    absorbed: Option<AbsorbedWeights<B>>,
}

/// Writes `values` `[1, seq, width]` into one row's `pages` at positions `at..at + seq`,
/// allocating pages as needed.
fn write_pages<B: Backend>(
    pages: &mut Vec<Tensor<B, 3>>,
    at: usize,
    values: Tensor<B, 3>,
    width: usize,
    at_device: (&B::Device, DType),
) {
    let [_, seq, _] = values.dims();
    let mut done = 0;
    while done < seq {
        let pos = at + done;
        let (page, offset) = (pos / PAGE, pos % PAGE);
        while pages.len() <= page {
            pages.push(Tensor::zeros([1, PAGE, width], at_device));
        }
        let n = (PAGE - offset).min(seq - done);
        let part = if n == seq { values.clone() } else { values.clone().narrow(1, done, n) };
        pages[page] = pages[page].clone().slice_assign([0..1, offset..offset + n], part);
        done += n;
    }
}

/// Rows `0..rows` of `pages`, positions `0..len`, as one `[rows, len, width]` tensor (rows
/// shorter than `len` are padded with zero pages).
fn gather<B: Backend>(
    pages: &mut [Vec<Tensor<B, 3>>],
    rows: usize,
    len: usize,
    width: usize,
    at_device: (&B::Device, DType),
) -> Tensor<B, 3> {
    let n_pages = len.div_ceil(PAGE).max(1);
    let per_row: Vec<Tensor<B, 3>> = pages[..rows]
        .iter_mut()
        .map(|row| {
            while row.len() < n_pages {
                row.push(Tensor::zeros([1, PAGE, width], at_device));
            }
            Tensor::cat(row[..n_pages].to_vec(), 1)
        })
        .collect();
    Tensor::cat(per_row, 0).narrow(1, 0, len)
}

impl<B: Backend> SlotBuffers<B> {
    /// The absorbed attention weights of this block, `derive`d once (the cache serves one
    /// model, whose weights it must not outlive unchanged; see `LatentSlot::absorbed_weights`).
    pub fn absorbed_weights(
        &mut self,
        derive: impl FnOnce() -> AbsorbedWeights<B>,
    ) -> &AbsorbedWeights<B> {
        self.absorbed.get_or_insert_with(derive)
    }

    /// Writes one sequence's latents `new` (`[1, seq, ..]`) into `row` from position `at`.
    pub fn write(&mut self, row: usize, at: usize, new: LatentKv<B>) {
        if self.c_kv.iter().all(Vec::is_empty) {
            self.dtype = new.c_kv.dtype();
        }
        let at_device = (&self.device, self.dtype);
        let (c_kv, k_rope) = (new.c_kv.cast(self.dtype), new.k_rope.cast(self.dtype));
        write_pages(&mut self.c_kv[row], at, c_kv, self.kv_lora, at_device);
        write_pages(&mut self.k_rope[row], at, k_rope, self.rope, at_device);
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
    pub fn read(&mut self, rows: usize, len: usize) -> LatentKv<B> {
        let at_device = (&self.device, self.dtype);
        LatentKv {
            c_kv: gather(&mut self.c_kv, rows, len, self.kv_lora, at_device),
            k_rope: gather(&mut self.k_rope, rows, len, self.rope, at_device),
        }
    }

    /// Adds an empty row at the end.
    fn push_row(&mut self) {
        self.c_kv.push(Vec::new());
        self.k_rope.push(Vec::new());
    }

    /// Removes `row`; the last row takes its place.
    fn swap_remove_row(&mut self, row: usize) {
        self.c_kv.swap_remove(row);
        self.k_rope.swap_remove(row);
    }

    fn clear(&mut self) {
        self.c_kv.clear();
        self.k_rope.clear();
    }

    fn bytes_per_token(&self) -> usize {
        (self.kv_lora + self.rope) * self.dtype.size()
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
    /// A cache for up to `slots` sequences of up to `capacity` tokens each (at most the model's
    /// `max_position_embeddings`); pages are allocated as the sequences grow.
    pub fn new(
        cfg: &DeepSeekConfig,
        slots: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Result<Self> {
        check_capacity(cfg, capacity)?;
        if slots == 0 || capacity == 0 {
            return Err(DeepSeekError::Input(format!(
                "a slot cache needs at least one slot and one position, got {slots} × {capacity}"
            )));
        }
        let blocks = (0..cfg.num_hidden_layers)
            .map(|_| SlotBuffers {
                c_kv: Vec::new(),
                k_rope: Vec::new(),
                kv_lora: cfg.kv_lora_rank,
                rope: cfg.qk_rope_head_dim,
                device: device.clone(),
                dtype: Tensor::<B, 1>::empty([0], device).dtype(),
                absorbed: None,
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
        self.blocks.iter_mut().for_each(SlotBuffers::push_row);
        Ok(self.lens.len() - 1)
    }

    /// Takes the next free row for a copy of the sequence in `row` (its length and latents):
    /// sequences with one prompt share its prefill. Pages are immutable tensors, so the copy
    /// shares them until either row writes (a write replaces the page it touches). Returns the
    /// new row.
    pub fn duplicate(&mut self, row: usize) -> Result<usize> {
        assert!(row < self.lens.len(), "slot {row} is not in use");
        if self.is_full() {
            return Err(DeepSeekError::Input(format!("all {} cache slots are taken", self.slots)));
        }
        self.lens.push(self.lens[row]);
        for b in &mut self.blocks {
            let (c_kv, k_rope) = (b.c_kv[row].clone(), b.k_rope[row].clone());
            b.c_kv.push(c_kv);
            b.k_rope.push(k_rope);
        }
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

    /// Frees `row`: the last active row moves into it (its pages move; nothing is copied).
    /// Returns the old index of the row that moved, if one did, so callers can follow it.
    pub fn remove(&mut self, row: usize) -> Option<usize> {
        assert!(row < self.lens.len(), "slot {row} is not in use");
        let last = self.lens.len() - 1;
        self.lens.swap_remove(row);
        self.blocks.iter_mut().for_each(|b| b.swap_remove_row(row));
        (row != last).then_some(last)
    }

    /// Forgets every sequence.
    pub fn clear(&mut self) {
        self.lens.clear();
        self.blocks.iter_mut().for_each(SlotBuffers::clear);
    }
}
