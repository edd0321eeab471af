//! Speculative decoding with the MTP module as the draft model (DeepSeek-V3 §2.2, §5.4.3): the
//! MTP module proposes the token after next from the main model's last hidden state; one main
//! forward over `[next, draft]` verifies it, and an accepted draft yields two tokens for one
//! main-model step.
//!
//! Acceptance is the speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): with
//! `p` the main model's and `q` the draft's distribution, a draft `d ~ q` is kept with
//! probability `min(1, p(d)/q(d))`, otherwise a token is drawn from `max(0, p − q)` normalized;
//! the output is distributed exactly as sampling from `p`. Greedy decoding is the case of
//! one-hot `p` and `q`: the draft is kept iff it is the main model's argmax, so the output is
//! identical to plain greedy decoding.
//!
//! The MTP block has its own latent cache over the positions the main model has confirmed; a
//! rejected draft only rolls back the main cache by one position.

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::pool::on_pool;
use deepseek_core::{AttentionPath, DeepSeekModel, LatentCache};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::generate::{one_hot, probabilities, sample_from, Decoding};

/// The next-token distribution `decoding` draws from.
fn distribution(logits: &[f32], decoding: Decoding) -> Vec<f64> {
    match decoding {
        Decoding::Greedy => one_hot(logits),
        Decoding::Sample { temperature, top_k, top_p, .. } => {
            probabilities(logits, temperature, top_k, top_p)
        }
    }
}

/// The speculative-sampling rule for one draft: returns the token to emit and whether it is the
/// draft. `p`: target distribution, `q`: draft distribution, `draft` drawn from `q`.
pub fn verify_draft(p: &[f64], q: &[f64], draft: usize, rng: &mut impl Rng) -> (i64, bool) {
    let u: f64 = rng.random();
    if q[draft] > 0.0 && u < p[draft] / q[draft] {
        return (draft as i64, true);
    }
    let mut residual: Vec<f64> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
    let total: f64 = residual.iter().sum();
    if total <= 0.0 {
        // p == q up to rounding: any draw from p is exact.
        return (sample_from(p, rng), false);
    }
    residual.iter_mut().for_each(|r| *r /= total);
    (sample_from(&residual, rng), false)
}

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
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
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
    speculative(model, prompt, max_new_tokens, eos, Decoding::Greedy, device)
}

/// Generation of up to `max_new_tokens` tokens (stopping after `eos`) with MTP drafts, greedy or
/// sampled; distributed exactly as plain decoding with the same settings.
pub fn speculative<B: Backend>(
    model: &DeepSeekModel<B>,
    prompt: &[i64],
    max_new_tokens: usize,
    eos: Option<i64>,
    decoding: Decoding,
    device: &B::Device,
) -> Result<SpeculativeOutput> {
    speculative_streaming(model, prompt, max_new_tokens, eos, decoding, device, &mut |_| Ok(true))
}

/// [`speculative`], calling `on_token` with each token once it is confirmed (one or two per
/// main-model step); returning `false` ends generation there.
pub fn speculative_streaming<B: Backend>(
    model: &DeepSeekModel<B>,
    prompt: &[i64],
    max_new_tokens: usize,
    eos: Option<i64>,
    decoding: Decoding,
    device: &B::Device,
    on_token: &mut dyn FnMut(i64) -> Result<bool>,
) -> Result<SpeculativeOutput> {
    decoding.validate()?;
    // Hands the tokens confirmed since the last call to `on_token`, up to the budget and the
    // first EOS; `false` once generation is over.
    let mut emitted = 0;
    let mut emit = |tokens: &[i64]| -> Result<bool> {
        while emitted < tokens.len().min(max_new_tokens) {
            let t = tokens[emitted];
            emitted += 1;
            if !on_token(t)? || Some(t) == eos {
                return Ok(false);
            }
        }
        Ok(emitted < max_new_tokens)
    };
    let seed = match decoding {
        Decoding::Sample { seed, .. } => seed,
        Decoding::Greedy => 0,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let draw = |logits: &[f32], rng: &mut StdRng| sample_from(&distribution(logits, decoding), rng);
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
    // Each forward on the CPU pool's threads (`deepseek_core::pool`).
    let main =
        on_pool::<B, _>(|| model.forward_cached(prompt_ids, &mut cache, AttentionPath::Naive))?;
    out.main_steps += 1;
    let mut next = draw(&last_row(main.logits, n - 1), &mut rng);
    out.tokens.push(next);
    let mut go_on = emit(&out.tokens)?;
    let mut following: Vec<i64> = prompt[1..].to_vec();
    following.push(next);
    let following = ids::<B>(following, device);
    let draft_logits = on_pool::<B, _>(|| {
        model.forward_mtp_cached(1, main.final_hidden, following, &mut mtp_cache)
    })?
    .logits;
    let mut draft_dist = distribution(&last_row(draft_logits, n - 1), decoding);
    let mut draft = sample_from(&draft_dist, &mut rng);

    while go_on && out.tokens.len() < max_new_tokens && Some(next) != eos {
        // Verify: the main model reads [next, draft]; its prediction after `next` must be `draft`.
        let pos = cache.len();
        let pair = ids::<B>(vec![next, draft], device);
        let verify =
            on_pool::<B, _>(|| model.forward_cached(pair, &mut cache, AttentionPath::Absorbed))?;
        out.main_steps += 1;
        out.drafted += 1;
        let target = distribution(&last_row(verify.logits.clone(), 0), decoding);
        let (after_next, accepted) = verify_draft(&target, &draft_dist, draft as usize, &mut rng);
        let (confirmed_hidden, confirmed_following) = if accepted {
            out.accepted += 1;
            let bonus = draw(&last_row(verify.logits, 1), &mut rng);
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
        go_on = emit(&out.tokens)?;
        if !go_on || out.tokens.len() >= max_new_tokens || out.tokens.last() == eos.as_ref() {
            break;
        }
        let count = confirmed_following.len();
        let following = ids::<B>(confirmed_following, device);
        let draft_logits = on_pool::<B, _>(|| {
            model.forward_mtp_cached(1, confirmed_hidden, following, &mut mtp_cache)
        })?
        .logits;
        draft_dist = distribution(&last_row(draft_logits, count - 1), decoding);
        draft = sample_from(&draft_dist, &mut rng);
    }
    if go_on {
        emit(&out.tokens)?;
    }
    // What the callback ended, or the budget or EOS cut, is not part of the output.
    out.tokens.truncate(emitted.min(max_new_tokens));
    if let Some(e) = eos {
        if let Some(i) = out.tokens.iter().position(|&t| t == e) {
            out.tokens.truncate(i + 1);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speculative_sampling_preserves_the_target_distribution() {
        let p = [0.5, 0.3, 0.15, 0.05, 0.0];
        let q = [0.1, 0.6, 0.1, 0.1, 0.1];
        let mut rng = StdRng::seed_from_u64(3);
        let n = 200_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            let d = sample_from(&q, &mut rng) as usize;
            let (t, _) = verify_draft(&p, &q, d, &mut rng);
            counts[t as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let freq = c as f64 / n as f64;
            assert!((freq - p[i]).abs() < 0.005, "token {i}: {freq} vs {}", p[i]);
        }
    }

    #[test]
    fn greedy_verification_keeps_exactly_the_argmax() {
        let mut rng = StdRng::seed_from_u64(0);
        let p = [0.0, 1.0, 0.0];
        assert_eq!(verify_draft(&p, &[0.0, 1.0, 0.0], 1, &mut rng), (1, true));
        assert_eq!(verify_draft(&p, &[0.0, 0.0, 1.0], 2, &mut rng), (1, false));
    }
}
