//! Rollouts: `G` sampled completions per prompt from the batched engine, each with its trace
//! (log-probs and experts), scored; and the training rows a micro-batch of them becomes.
//!
//! A completion `o` of prompt `q` trains on the input `q ++ o[..|o|−1]`: position
//! `|q| − 1 + t` predicts `o_t`. Its recorded experts cover exactly those positions (the
//! prompt's from the prefill, then one decoding step per generated token but the last).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::DeepSeekModel;
use deepseek_infer::chat::ChatTemplate;
use deepseek_infer::engine::{generate_traced, Finish, Request, Trace};
use deepseek_infer::generate::Decoding;
use deepseek_infer::tokenizer::TextTokenizer;

use crate::error::{Result, TrainError};
use crate::grpo::reward::Rewards;
use crate::grpo::task::{mix, TaskItem};

/// One sampled completion.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub prompt: Vec<i64>,
    /// The generated tokens, the end-of-turn token included (the policy learns to stop).
    pub completion: Vec<i64>,
    /// Its text without the end-of-turn token.
    pub text: String,
    pub reward: f64,
    /// Whether the exact-answer checker accepts it.
    pub correct: bool,
    pub finish: Option<Finish>,
    pub trace: Trace,
}

/// How prompts become token ids and completions become text.
pub struct Prompting<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub template: &'a ChatTemplate,
    /// The end-of-turn token (the template's EOS, else the model's).
    pub eos: Option<i64>,
}

impl Prompting<'_> {
    /// The generation prompt of `item` as token ids.
    pub fn encode(&self, item: &TaskItem) -> Result<Vec<i64>> {
        deepseek_infer::pipeline::encode_chat_with(self.template, self.tokenizer, &item.messages)
            .map_err(|e| TrainError::Data(format!("{e:#}")))
    }

    /// The text of a completion, its end-of-turn token dropped.
    pub fn text(&self, completion: &[i64]) -> Result<String> {
        let ids = match (self.eos, completion.last()) {
            (Some(e), Some(&l)) if e == l => &completion[..completion.len() - 1],
            _ => completion,
        };
        self.tokenizer
            .decode(&ids.iter().map(|&t| t as u32).collect::<Vec<_>>())
            .map_err(|e| TrainError::Data(format!("{e:#}")))
    }
}

/// Checks that every prompt fits the context with `max_new_tokens`, before anything runs.
pub fn check_prompts(
    prompting: &Prompting,
    items: &[TaskItem],
    max_new_tokens: usize,
    context: usize,
) -> Result<()> {
    for (i, item) in items.iter().enumerate() {
        let len = prompting.encode(item)?.len();
        if len + max_new_tokens > context {
            return Err(TrainError::Data(format!(
                "prompt {i} has {len} tokens; with --max-new-tokens {max_new_tokens} that exceeds the model's context of {context} tokens (max_position_embeddings): shorten it or lower --max-new-tokens"
            )));
        }
    }
    Ok(())
}

/// Samples `group` completions of each item (sample `g` of the `p`-th prompt of the step at
/// `position` draws from the seed `mix(seed, position + p, g)`, so a resumed run samples the
/// same), decoding `batch` sequences together, and scores them.
#[allow(clippy::too_many_arguments)]
pub fn sample_groups<B: Backend>(
    model: &DeepSeekModel<B>,
    prompting: &Prompting,
    rewards: &Rewards,
    items: &[&TaskItem],
    group: usize,
    decoding: (f32, Option<f32>),
    max_new_tokens: usize,
    seed: u64,
    position: u64,
    batch: usize,
    device: &B::Device,
) -> Result<Vec<Rollout>> {
    let (temperature, top_p) = decoding;
    let mut prompts = Vec::with_capacity(items.len());
    let mut requests = Vec::with_capacity(items.len() * group);
    for (p, item) in items.iter().enumerate() {
        let prompt = prompting.encode(item)?;
        for g in 0..group {
            let sample_seed = mix(seed ^ mix((position + p as u64) << 16 | g as u64));
            requests.push(Request {
                prompt: prompt.clone(),
                max_new_tokens,
                decoding: Decoding::Sample { temperature, top_k: None, top_p, seed: sample_seed },
                stop_tokens: prompting.eos.into_iter().collect(),
                stop_sequences: vec![],
            });
        }
        prompts.push(prompt);
    }
    let outputs = generate_traced(model, requests, batch, device, &mut |_, _| Ok(true))
        .map_err(|e| TrainError::Data(format!("rollout: {e:#}")))?;
    let mut out = Vec::with_capacity(outputs.len());
    for (i, generated) in outputs.into_iter().enumerate() {
        let (item, prompt) = (items[i / group], &prompts[i / group]);
        let text = prompting.text(&generated.tokens)?;
        let reward = rewards.score(&text, item)?;
        out.push(Rollout {
            prompt: prompt.clone(),
            correct: deepseek_infer::checker::is_correct(&text, &item.answer),
            completion: generated.tokens,
            text,
            reward,
            finish: generated.finish,
            trace: generated.trace.expect("a traced rollout"),
        });
    }
    Ok(out)
}

/// A micro-batch of completions as training tensors, right-padded to the longest.
pub struct Rows<B: Backend> {
    /// `[n, seq]` prompt and completion but its last token (padding: token 0).
    pub input: Tensor<B, 2, Int>,
    /// `[n, seq]` the next token of every position (0 off the completion).
    pub targets: Tensor<B, 2, Int>,
    /// `[n, seq]` the loss weight of each completion token (0 elsewhere).
    pub weights: Tensor<B, 2>,
    /// `[n, seq]` 1 on completion tokens.
    pub mask: Tensor<B, 2>,
    /// `[n, seq]` the rollout's log-probs of the completion tokens (0 elsewhere).
    pub rollout_logp: Tensor<B, 2>,
    /// `[n]`
    pub advantages: Tensor<B, 1>,
    /// Per MoE block `[n·seq, K]`: the rollout's experts (padding: experts `0..K`).
    pub replay: Vec<Tensor<B, 2, Int>>,
    /// The rollout's experts on the host, per MoE block `[n·seq·K]`, and the real length of
    /// each row (what the routing comparison reads).
    pub host_experts: Vec<Vec<i32>>,
    pub lens: Vec<usize>,
}

/// The rows of `rollouts` with their advantages and per-token weights `weight(len)`.
pub fn rows<B: Backend>(
    rollouts: &[&Rollout],
    advantages: &[f64],
    weight: impl Fn(usize) -> f64,
    top_k: usize,
    device: &B::Device,
) -> Rows<B> {
    let n = rollouts.len();
    let lens: Vec<usize> =
        rollouts.iter().map(|r| r.prompt.len() + r.completion.len() - 1).collect();
    let seq = *lens.iter().max().expect("a non-empty micro-batch");
    let blocks = rollouts[0].trace.experts.len();
    let mut input = vec![0i64; n * seq];
    let mut targets = vec![0i64; n * seq];
    let mut weights = vec![0f32; n * seq];
    let mut mask = vec![0f32; n * seq];
    let mut old = vec![0f32; n * seq];
    let pad: Vec<i32> = (0..top_k as i32).collect();
    let mut experts: Vec<Vec<i32>> = vec![Vec::with_capacity(n * seq * top_k); blocks];
    for (i, r) in rollouts.iter().enumerate() {
        let full: Vec<i64> = r.prompt.iter().chain(&r.completion).copied().collect();
        let (p, c) = (r.prompt.len(), r.completion.len());
        input[i * seq..i * seq + lens[i]].copy_from_slice(&full[..lens[i]]);
        let w = weight(c) as f32;
        for t in 0..c {
            let at = i * seq + p - 1 + t;
            targets[at] = r.completion[t];
            weights[at] = w;
            mask[at] = 1.0;
            old[at] = r.trace.logprobs[t];
        }
        for (b, e) in experts.iter_mut().enumerate() {
            let recorded = &r.trace.experts[b];
            debug_assert_eq!(recorded.len(), lens[i] * top_k, "experts of every fed position");
            e.extend_from_slice(recorded);
            for _ in lens[i]..seq {
                e.extend_from_slice(&pad);
            }
        }
    }
    let float = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [n, seq]), device);
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [n, seq]), device);
    Rows {
        input: int(input),
        targets: int(targets),
        weights: float(weights),
        mask: float(mask),
        rollout_logp: float(old),
        advantages: Tensor::from_data(
            TensorData::new(advantages.iter().map(|&a| a as f32).collect(), [n]),
            device,
        ),
        replay: experts
            .iter()
            .map(|e| Tensor::from_data(TensorData::new(e.clone(), [n * seq, top_k]), device))
            .collect(),
        host_experts: experts,
        lens,
    }
}

/// Positions (of `lens[i]` real ones per row of `seq`) where the experts `given` differ from
/// `recorded` as sets in any MoE block, and the positions compared.
pub fn routing_mismatch(
    recorded: &[Vec<i32>],
    given: &[Vec<i32>],
    lens: &[usize],
    seq: usize,
    top_k: usize,
) -> (usize, usize) {
    let (mut differ, mut total) = (0, 0);
    for (i, &len) in lens.iter().enumerate() {
        for t in 0..len {
            let at = (i * seq + t) * top_k;
            let differs = recorded.iter().zip(given).any(|(r, g)| {
                let mut a = r[at..at + top_k].to_vec();
                let mut b = g[at..at + top_k].to_vec();
                a.sort_unstable();
                b.sort_unstable();
                a != b
            });
            differ += differs as usize;
            total += 1;
        }
    }
    (differ, total)
}
