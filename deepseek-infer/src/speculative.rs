//! Speculative decoding with the MTP module as the draft model (DeepSeek-V3 §2.2, §5.4.3): the
//! MTP module proposes the token after next from the main model's last hidden state; one main
//! forward over `[next, draft]` verifies it. Greedy acceptance (the draft must equal the main
//! model's argmax) keeps the output identical to plain greedy decoding, and an accepted draft
//! yields two tokens for one main-model step.
//!
//! The MTP block has its own latent cache over the positions the main model has confirmed; a
//! rejected draft only rolls back the main cache by one position.

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::{AttentionPath, DeepSeekModel, LatentCache};

use crate::generate::argmax;

/// Output of [`speculative_greedy`].
#[derive(Debug, Clone, PartialEq)]
pub struct SpeculativeOutput {
    /// The new tokens (same as greedy decoding).
    pub tokens: Vec<i64>,
    /// Drafts proposed and verified.
    pub drafted: usize,
    /// Drafts the main model agreed with.
    pub accepted: usize,
    /// Main-model forward passes (prefill included).
    pub main_steps: usize,
}

impl SpeculativeOutput {
    /// Share of drafts accepted.
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 { 0.0 } else { self.accepted as f64 / self.drafted as f64 }
    }
}

fn last_row<B: Backend>(logits: Tensor<B, 3>, row: usize) -> Vec<f32> {
    logits.narrow(1, row, 1).into_data().convert::<f32>().into_vec().expect("float data")
}

fn ids<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 2, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [1, n]), device)
}

/// Greedy generation of up to `max_new_tokens` tokens (stopping after `eos`) with MTP drafts.
pub fn speculative_greedy<B: Backend>(
    model: &DeepSeekModel<B>,
    prompt: &[i64],
    max_new_tokens: usize,
    eos: Option<i64>,
    device: &B::Device,
) -> Result<SpeculativeOutput> {
    if model.mtp.is_empty() {
        bail!("speculative decoding drafts with the MTP module, and this model has none (num_nextn_predict_layers = 0 or MTP weights missing)");
    }
    if prompt.is_empty() {
        bail!("empty prompt: give at least one token");
    }
    let context = model.config.max_position_embeddings;
    // +1: a verification may run one position past the last token that is kept.
    let capacity = prompt.len() + max_new_tokens + 1;
    if capacity > context {
        bail!("prompt of {} tokens plus {max_new_tokens} new tokens exceeds the model's context of {context} tokens", prompt.len());
    }
    let prompt_ids = ids::<B>(prompt.to_vec(), device);
    model.check_input(&prompt_ids)?;
    let mut out = SpeculativeOutput { tokens: Vec::new(), drafted: 0, accepted: 0, main_steps: 0 };
    if max_new_tokens == 0 {
        return Ok(out);
    }
    let mut cache = LatentCache::new(&model.config, 1, capacity, device)?;
    let mut mtp_cache = LatentCache::for_mtp(&model.config, 1, capacity, device)?;

    // Prefill: the main model's prediction for the first new token, then the MTP module over
    // every prompt position (position i pairs h_i with the token at i + 1).
    let n = prompt.len();
    let main = model.forward_cached(prompt_ids, &mut cache, AttentionPath::Naive)?;
    out.main_steps += 1;
    let mut next = argmax(&last_row(main.logits, n - 1));
    out.tokens.push(next);
    let mut following: Vec<i64> = prompt[1..].to_vec();
    following.push(next);
    let draft_logits = model.forward_mtp_cached(1, main.final_hidden, ids::<B>(following, device), &mut mtp_cache)?.logits;
    let mut draft = argmax(&last_row(draft_logits, n - 1));

    while out.tokens.len() < max_new_tokens && Some(next) != eos {
        // Verify: the main model reads [next, draft]; its prediction after `next` must be `draft`.
        let pos = cache.len();
        let verify = model.forward_cached(ids::<B>(vec![next, draft], device), &mut cache, AttentionPath::Absorbed)?;
        out.main_steps += 1;
        out.drafted += 1;
        let after_next = argmax(&last_row(verify.logits.clone(), 0));
        let (confirmed_hidden, confirmed_following) = if after_next == draft {
            out.accepted += 1;
            let bonus = argmax(&last_row(verify.logits, 1));
            out.tokens.push(draft);
            if out.tokens.len() < max_new_tokens && Some(draft) != eos {
                out.tokens.push(bonus);
            }
            // Positions pos and pos + 1 are confirmed; their successors are draft and bonus.
            let confirmed = vec![draft, bonus];
            next = bonus;
            (verify.final_hidden, confirmed)
        } else {
            out.tokens.push(after_next);
            cache.truncate(pos + 1); // forget the rejected draft
            next = after_next;
            (verify.final_hidden.narrow(1, 0, 1), vec![after_next])
        };
        if out.tokens.len() >= max_new_tokens || out.tokens.last() == eos.as_ref() {
            break;
        }
        let count = confirmed_following.len();
        let draft_logits = model.forward_mtp_cached(1, confirmed_hidden, ids::<B>(confirmed_following, device), &mut mtp_cache)?.logits;
        draft = argmax(&last_row(draft_logits, count - 1));
    }
    out.tokens.truncate(max_new_tokens);
    if let Some(e) = eos {
        if let Some(i) = out.tokens.iter().position(|&t| t == e) {
            out.tokens.truncate(i + 1);
        }
    }
    Ok(out)
}
