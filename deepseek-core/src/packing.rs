//! Packed rows: several documents laid end to end in one row of a batch, as fine-tuning packs
//! short conversations. Each document must see only itself: its RoPE positions restart at 0
//! and its attention is causal within the document (a block-diagonal causal mask), so a packed
//! row computes per token what each document computes alone (the MoE has no capacity limit,
//! so routing is per token too).

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};

use crate::error::{DeepSeekError, Result};

/// Which document every token of a `[batch, seq]` input belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    batch: usize,
    seq: usize,
    /// `[batch·seq]` document index of each token; a row's documents are contiguous runs.
    segments: Vec<u32>,
    /// `[batch·seq]` position of each token inside its document.
    positions: Vec<usize>,
}

impl Packing {
    /// From `[batch·seq]` document ids, row-major. A new document starts wherever the id
    /// changes along a row (and at the start of each row).
    pub fn new(batch: usize, seq: usize, segments: Vec<u32>) -> Result<Self> {
        if segments.len() != batch * seq || batch == 0 || seq == 0 {
            return Err(DeepSeekError::Input(format!(
                "packing of {} document ids for a [{batch}, {seq}] input",
                segments.len()
            )));
        }
        for (r, row) in segments.chunks(seq).enumerate() {
            // The mask compares ids and positions restart where the id changes: a document must
            // be one run, or it would see its earlier part with restarted positions.
            let mut seen = std::collections::HashSet::new();
            for (i, s) in row.iter().enumerate() {
                if (i == 0 || row[i - 1] != *s) && !seen.insert(*s) {
                    return Err(DeepSeekError::Input(format!(
                        "packing: document {s} of row {r} is not contiguous (it resumes at position {i})"
                    )));
                }
            }
        }
        let mut positions = Vec::with_capacity(segments.len());
        for row in segments.chunks(seq) {
            let mut pos = 0;
            for (i, s) in row.iter().enumerate() {
                pos = if i > 0 && row[i - 1] == *s { pos + 1 } else { 0 };
                positions.push(pos);
            }
        }
        Ok(Self { batch, seq, segments, positions })
    }

    /// `[batch, seq]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.batch, self.seq]
    }

    /// The position of every token inside its document, `[batch·seq]` row-major.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// The document of every token, `[batch·seq]` row-major.
    pub fn segments(&self) -> &[u32] {
        &self.segments
    }

    /// The first `len` tokens of every row (the MTP modules run over shorter rows).
    pub fn narrow(&self, len: usize) -> Self {
        let take = |v: &[u32]| -> Vec<u32> {
            v.chunks(self.seq).flat_map(|row| row[..len].iter().copied()).collect()
        };
        let positions =
            self.positions.chunks(self.seq).flat_map(|row| row[..len].iter().copied()).collect();
        Self { batch: self.batch, seq: len, segments: take(&self.segments), positions }
    }

    /// The attention mask, `true` where query `i` may **not** see key `j`: a later position,
    /// or another document.
    ///
    /// # Shapes
    /// `[batch, 1, seq, seq]`.
    pub fn mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4, Bool> {
        let s = self.seq;
        let mut mask = Vec::with_capacity(self.batch * s * s);
        for row in self.segments.chunks(s) {
            for i in 0..s {
                mask.extend((0..s).map(|j| j > i || row[j] != row[i]));
            }
        }
        Tensor::from_data(TensorData::new(mask, [self.batch, 1, s, s]), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_restart_at_every_document_and_every_row() {
        let p = Packing::new(2, 5, vec![0, 0, 1, 1, 1, 3, 3, 3, 4, 4]).unwrap();
        assert_eq!(p.positions(), &[0, 1, 0, 1, 2, 0, 1, 2, 0, 1]);
        let short = p.narrow(3);
        assert_eq!(short.positions(), &[0, 1, 0, 0, 1, 2]);
        assert_eq!(short.segments(), &[0, 0, 1, 3, 3, 3]);
        assert!(Packing::new(2, 5, vec![0; 9]).is_err());
        assert!(Packing::new(1, 4, vec![0, 1, 0, 0]).is_err(), "a document in two pieces");
    }
}
