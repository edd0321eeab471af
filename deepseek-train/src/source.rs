//! What the training loop reads: batches of token rows from a [`TrainingData`], in a seeded
//! order that is a pure function of `(seed, position)` (so a checkpoint's position is the whole
//! data state). Pretraining serves fixed windows of a token file ([`crate::data::Dataset`]);
//! fine-tuning serves rendered conversations with per-token loss weights and, when packed,
//! several conversations per row ([`crate::sft_data::SftData`]).

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use deepseek_core::Packing;

use crate::data::{Dataset, Windows};
use crate::error::Result;

/// Rows of token ids on the host, ready to become a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Rows.
    pub rows: usize,
    /// Tokens per row, `seq + 1`: inputs are the first `seq`, targets the last `seq`.
    pub len: usize,
    /// `[rows, len]` token ids.
    pub ids: Vec<i64>,
    /// `[rows, len - 1]` weight of each target (1 trains it, 0 skips it); `None`: all train.
    pub weights: Option<Vec<f32>>,
    /// `[rows, len]` document of each token when rows pack several documents.
    pub segments: Option<Vec<u32>>,
    /// Input tokens that are not padding (for throughput and the token count).
    pub tokens: usize,
    /// `[rows, len - 1]` 1 for an input token, 0 for padding; `None`: no padding. Padding is
    /// left out of the expert loads (balancing, MaxVio).
    pub real: Option<Vec<i64>>,
}

impl HostBatch {
    /// Unweighted rows of one document each (pretraining windows).
    pub fn plain(rows: usize, len: usize, ids: Vec<i64>) -> Self {
        let tokens = rows * (len - 1);
        Self { rows, len, ids, weights: None, segments: None, tokens, real: None }
    }

    /// Weighted targets in this batch.
    pub fn target_weight(&self) -> f64 {
        match &self.weights {
            Some(w) => w.iter().map(|&v| v as f64).sum(),
            None => (self.rows * (self.len - 1)) as f64,
        }
    }

    /// The batch on `device`.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> Batch<B> {
        let seq = self.len - 1;
        let ids =
            Tensor::from_data(TensorData::new(self.ids.clone(), [self.rows, self.len]), device);
        let weights = self
            .weights
            .as_ref()
            .map(|w| Tensor::from_data(TensorData::new(w.clone(), [self.rows, seq]), device));
        let segments = self.segments.as_ref().map(|s| Segments {
            tokens: s.clone(),
            inputs: Packing::new(
                self.rows,
                seq,
                s.chunks(self.len).flat_map(|row| row[..seq].iter().copied()).collect(),
            )
            .expect("one segment per input token"),
        });
        let real = self
            .real
            .as_ref()
            .map(|r| Tensor::from_data(TensorData::new(r.clone(), [self.rows, seq]), device));
        Batch { ids, weights, segments, real }
    }
}

/// The documents of a packed batch.
#[derive(Debug, Clone)]
pub struct Segments {
    /// `[rows, len]` document of every token, targets included.
    pub tokens: Vec<u32>,
    /// The packing of the `[rows, seq]` inputs.
    pub inputs: Packing,
}

/// A batch on the device.
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    /// `[rows, seq + 1]` token ids.
    pub ids: Tensor<B, 2, Int>,
    /// `[rows, seq]` target weights; `None`: every target counts.
    pub weights: Option<Tensor<B, 2>>,
    /// Packed documents, if rows pack several.
    pub segments: Option<Segments>,
    /// `[rows, seq]` 1 for an input token, 0 for padding; `None`: no padding.
    pub real: Option<Tensor<B, 2, Int>>,
}

/// A source of training and validation batches.
pub trait TrainingData: Sync {
    /// A reader of the shuffled training order for rows of `seq + 1` tokens (each rank opens
    /// its own). Fails when the data cannot fill one row.
    fn reader(&self, seq: usize) -> Result<Box<dyn BatchReader + '_>>;

    /// The validation split in file order, as batches of at most `batch` rows, the first
    /// `limit` of them (0: all).
    fn validation(&self, seq: usize, batch: usize, limit: usize) -> Result<Vec<HostBatch>>;
}

/// Reads rows of the training order (`Send`: a training step may run on another thread).
pub trait BatchReader: Send {
    /// Rows `first..first + rows` of the order drawn from `seed`.
    fn rows(&mut self, seed: u64, first: u64, rows: usize) -> HostBatch;
}

struct WindowReader<'a>(Windows<'a>);

impl BatchReader for WindowReader<'_> {
    fn rows(&mut self, seed: u64, first: u64, rows: usize) -> HostBatch {
        let ids: Vec<i64> = (0..rows as u64)
            .flat_map(|i| self.0.shuffled(seed, first + i))
            .map(i64::from)
            .collect();
        let len = ids.len() / rows.max(1);
        HostBatch::plain(rows, len, ids)
    }
}

impl TrainingData for Dataset {
    fn reader(&self, seq: usize) -> Result<Box<dyn BatchReader + '_>> {
        Ok(Box::new(WindowReader(Windows::new(&self.train, seq)?)))
    }

    fn validation(&self, seq: usize, batch: usize, limit: usize) -> Result<Vec<HostBatch>> {
        let windows = Windows::new(&self.val, seq)?;
        let available = windows.count().div_ceil(batch);
        let batches = if limit == 0 { available } else { limit.min(available) };
        Ok((0..batches)
            .map(|b| {
                let first = b * batch;
                let size = batch.min(windows.count() - first);
                let ids: Vec<i64> =
                    (first..first + size).flat_map(|i| windows.window(i)).map(i64::from).collect();
                HostBatch::plain(size, seq + 1, ids)
            })
            .collect())
    }
}
