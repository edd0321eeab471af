//! Autoregressive generation over the latent KV cache: the prompt is prefilled on the naive MLA
//! path, each new token decoded on the absorbed path. Greedy or sampled (temperature, top-k,
//! top-p, seeded), stopping at EOS, a stop sequence or `max_new_tokens`.

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::pool::on_pool;
use deepseek_core::{AttentionPath, DeepSeekModel, LatentCache};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// Highest logit (ties: lowest id).
    Greedy,
    /// Sample from `softmax(logits / temperature)` restricted to the `top_k` most likely tokens
    /// and then to the smallest set whose probability reaches `top_p`.
    Sample { temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64 },
}

impl Decoding {
    /// The decoding the `--temperature`, `--top-k`, `--top-p` and `--seed` flags (or an API
    /// request) ask for: greedy for temperature 0, else sampling. Every value is checked, also
    /// those greedy decoding ignores, so a typo is an error rather than silently dropped.
    pub fn new(
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    ) -> Result<Self> {
        if !(temperature >= 0.0 && temperature.is_finite()) {
            bail!(
                "temperature must be a finite number ≥ 0 (0 decodes greedily), got {temperature}"
            );
        }
        check_filters(top_k, top_p)?;
        if temperature == 0.0 {
            return Ok(Decoding::Greedy);
        }
        Ok(Decoding::Sample { temperature, top_k, top_p, seed })
    }

    /// The decoding of sample `s` of several drawn for one prompt: the seed advanced by `s`
    /// (greedy stays greedy).
    pub fn for_sample(self, s: usize) -> Self {
        match self {
            Decoding::Sample { temperature, top_k, top_p, seed } => {
                Decoding::Sample { temperature, top_k, top_p, seed: seed.wrapping_add(s as u64) }
            }
            greedy => greedy,
        }
    }

    /// Checks the settings (a [`Decoding::Sample`] built by hand may hold any values); every
    /// decoder calls it before the first token.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Decoding::Greedy => Ok(()),
            Decoding::Sample { temperature, top_k, top_p, .. } => {
                if !(temperature > 0.0 && temperature.is_finite()) {
                    bail!("temperature must be a positive number, got {temperature} (use greedy decoding for 0)");
                }
                check_filters(top_k, top_p)
            }
        }
    }
}

fn check_filters(top_k: Option<usize>, top_p: Option<f32>) -> Result<()> {
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("top_p must be in (0, 1], got {p}");
        }
    }
    if top_k == Some(0) {
        bail!("top_k must be at least 1");
    }
    Ok(())
}

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub decoding: Decoding,
    /// Stop after emitting this token (it is kept in the output).
    pub eos_token_id: Option<i64>,
    /// Stop once the output ends with any of these id sequences (kept in the output).
    pub stop_sequences: Vec<Vec<i64>>,
}

/// Generates a continuation of each prompt; returns the new tokens only. Prompts may differ in
/// length: each runs with its own cache, one after the other.
pub fn generate<B: Backend>(
    model: &DeepSeekModel<B>,
    prompts: &[Vec<i64>],
    cfg: &GenerateConfig,
    device: &B::Device,
) -> Result<Vec<Vec<i64>>> {
    generate_streaming(model, prompts, cfg, device, &mut |_, _| Ok(true))
}

/// [`generate`], calling `on_token(prompt_index, token)` as each token is chosen (streaming);
/// the callback returns `false` to end that sequence there (e.g. on a stop string in the text).
pub fn generate_streaming<B: Backend>(
    model: &DeepSeekModel<B>,
    prompts: &[Vec<i64>],
    cfg: &GenerateConfig,
    device: &B::Device,
    on_token: &mut dyn FnMut(usize, i64) -> Result<bool>,
) -> Result<Vec<Vec<i64>>> {
    cfg.decoding.validate()?;
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| generate_one(model, p, cfg, device, i, on_token))
        .collect()
}

fn generate_one<B: Backend>(
    model: &DeepSeekModel<B>,
    prompt: &[i64],
    cfg: &GenerateConfig,
    device: &B::Device,
    index: usize,
    on_token: &mut dyn FnMut(usize, i64) -> Result<bool>,
) -> Result<Vec<i64>> {
    let stream = index as u64;
    let context = model.config.max_position_embeddings;
    if prompt.is_empty() {
        bail!("empty prompt: give at least one token");
    }
    if prompt.len() + cfg.max_new_tokens > context {
        bail!(
            "prompt of {} tokens plus {} new tokens exceeds the model's context of {context} tokens",
            prompt.len(),
            cfg.max_new_tokens
        );
    }
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(prompt.to_vec(), [1, prompt.len()]), device);
    model.check_input(&ids)?;
    let mut cache = LatentCache::new(&model.config, 1, prompt.len() + cfg.max_new_tokens, device)?;
    let mut rng = match cfg.decoding {
        Decoding::Sample { seed, .. } => Some(StdRng::seed_from_u64(seed.wrapping_add(stream))),
        Decoding::Greedy => None,
    };
    let mut out = Vec::with_capacity(cfg.max_new_tokens);
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    // Each forward on the CPU pool's threads (`deepseek_core::pool`).
    let mut logits =
        on_pool::<B, _>(|| model.forward_cached(ids, &mut cache, AttentionPath::Naive))?.logits;
    loop {
        let [_, seq, vocab] = logits.dims();
        let last: Vec<f32> = logits
            .narrow(1, seq - 1, 1)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        debug_assert_eq!(last.len(), vocab);
        let next = match (cfg.decoding, rng.as_mut()) {
            (Decoding::Sample { temperature, top_k, top_p, .. }, Some(rng)) => {
                sample(&last, temperature, top_k, top_p, rng)
            }
            _ => argmax(&last),
        };
        out.push(next);
        let go_on = on_token(index, next)?;
        let stop = !go_on
            || Some(next) == cfg.eos_token_id
            || cfg.stop_sequences.iter().any(|s| !s.is_empty() && out.ends_with(s));
        if stop || out.len() == cfg.max_new_tokens {
            return Ok(out);
        }
        let step = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![next], [1, 1]), device);
        logits =
            on_pool::<B, _>(|| model.forward_cached(step, &mut cache, AttentionPath::Absorbed))?
                .logits;
    }
}

/// Index of the largest logit; the lowest index among equal maxima (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> i64 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as i64
}

/// Samples a token id: temperature, then top-k, then top-p (nucleus) filtering.
pub fn sample(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    rng: &mut impl Rng,
) -> i64 {
    sample_from(&probabilities(logits, temperature, top_k, top_p), rng)
}

/// The distribution sampling draws from: `softmax(logits / temperature)` restricted to the
/// `top_k` most likely tokens, then to the smallest set reaching probability `top_p`,
/// renormalized; zero elsewhere. `[vocab]`.
pub fn probabilities(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
) -> Vec<f64> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]] as f64;
    let mut kept: Vec<f64> =
        order.iter().map(|&i| ((logits[i] as f64 - max) / temperature as f64).exp()).collect();
    let total: f64 = kept.iter().sum();
    kept.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = top_p {
        let mut acc = 0.0;
        let keep = kept.iter().position(|&q| {
            acc += q;
            acc >= p as f64
        });
        let keep = keep.map_or(kept.len(), |i| i + 1);
        order.truncate(keep);
        kept.truncate(keep);
        let total: f64 = kept.iter().sum();
        kept.iter_mut().for_each(|q| *q /= total);
    }
    let mut probs = vec![0.0; logits.len()];
    for (&i, &q) in order.iter().zip(&kept) {
        probs[i] = q;
    }
    probs
}

/// The one-hot distribution of greedy decoding.
pub fn one_hot(logits: &[f32]) -> Vec<f64> {
    let mut probs = vec![0.0; logits.len()];
    probs[argmax(logits) as usize] = 1.0;
    probs
}

/// Draws from a distribution (which sums to 1).
pub fn sample_from(probs: &[f64], rng: &mut impl Rng) -> i64 {
    let mut u: f64 = rng.random();
    let mut last = 0;
    for (i, &q) in probs.iter().enumerate() {
        if q > 0.0 {
            if u < q {
                return i as i64;
            }
            u -= q;
            last = i;
        }
    }
    last as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..20 {
            assert_eq!(sample(&logits, 1.0, Some(1), None, &mut rng), 1);
            assert_eq!(sample(&logits, 1.0, None, Some(1e-6), &mut rng), 1);
        }
    }

    #[test]
    fn sampling_follows_the_softmax_distribution() {
        // Two tokens with logits ln 3 and 0: probabilities 0.75 / 0.25.
        let logits = [3f32.ln(), 0.0];
        let mut rng = StdRng::seed_from_u64(42);
        let n = 20_000;
        let ones = (0..n).filter(|_| sample(&logits, 1.0, None, None, &mut rng) == 1).count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.25).abs() < 0.015, "{freq}");
        // top_p 0.7 keeps only the first token.
        assert!((0..100).all(|_| sample(&logits, 1.0, None, Some(0.7), &mut rng) == 0));
    }

    #[test]
    fn bad_sampling_settings_are_errors_for_every_decoder() {
        for (t, k, p) in [
            (-1.0, None, None),
            (f32::NAN, None, None),
            (0.0, None, Some(2.0)),
            (0.7, None, Some(0.0)),
            (0.7, Some(0), None),
        ] {
            assert!(Decoding::new(t, k, p, 0).is_err(), "{t} {k:?} {p:?}");
        }
        assert_eq!(Decoding::new(0.0, Some(5), Some(0.9), 1).unwrap(), Decoding::Greedy);
        let hand_built = Decoding::Sample { temperature: -0.5, top_k: None, top_p: None, seed: 0 };
        assert!(hand_built.validate().is_err());
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 0.0]), 1);
    }
}
