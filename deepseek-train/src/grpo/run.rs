//! One GRPO run end to end (`deepseek-train grpo`): the model (LoRA on a frozen base, or every
//! weight), the task, then per step a rollout and `iterations` updates; held-out accuracy at
//! the start, on schedule and at the end; checkpoints with exact resume; `metrics.jsonl` and
//! `grpo.png`; the adapter (PEFT layout) or the whole model at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use deepseek_core::device::{BackendTask, DeviceKind};
use deepseek_core::{DeepSeekConfig, DeepSeekModel, ForwardOptions};
use deepseek_infer::engine::{generate_all, Request};
use deepseek_infer::generate::Decoding;
use deepseek_infer::tokenizer::TextTokenizer;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainState};
use crate::config::{NonFinitePolicy, TrainConfig};
use crate::error::{Result, TrainError};
use crate::grpo::objective::{advantages, objective, token_weight, ClipSettings};
use crate::grpo::reward::Rewards;
use crate::grpo::rollout::{
    check_prompts, routing_mismatch, rows, sample_groups, Prompting, Rollout,
};
use crate::grpo::task::{Task, TaskItem};
use crate::grpo::GrpoConfig;
use crate::metrics::MetricsWriter;
use crate::optim::AdamW;

/// The plot's file name in the run directory.
pub const PLOT_FILE: &str = "grpo.png";

/// What a GRPO run needs besides the recipe in `train` (whose `finetune` names the base model
/// and LoRA or full, and whose `grpo` is the algorithm's settings).
#[derive(Debug, Clone)]
pub struct GrpoArgs {
    pub out: PathBuf,
    pub resume: bool,
    pub device: DeviceKind,
    pub progress: bool,
    pub train: TrainConfig,
}

/// One GRPO step in `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoStepRecord {
    pub step: usize,
    /// The objective (mean over the step's iterations).
    pub loss: f64,
    /// Mean reward of the step's completions.
    pub reward: f64,
    /// Share of completions the exact-answer checker accepts.
    pub accuracy: f64,
    /// Mean over groups of the reward's standard deviation within the group.
    pub reward_std: f64,
    /// Share of groups whose rewards are all equal: zero advantages, no learning signal.
    pub zero_std_groups: f64,
    /// Mean KL (k3) to the reference per completion token, when `beta > 0`.
    pub kl: Option<f64>,
    /// Share of completion tokens where the clip cut the gradient.
    pub clip_fraction: f64,
    /// Mean ratio π_θ / π_old over completion tokens.
    pub ratio: f64,
    /// Mean entropy (nats) of the policy at the completion tokens, first iteration.
    pub entropy: f64,
    /// Mean completion length in tokens.
    pub completion_len: f64,
    /// Mean |log π_train − log π_rollout| of the completion tokens with the rollout's weights:
    /// how far the training forward is from what the engine sampled with.
    pub logprob_gap: f64,
    /// Without routing replay: share of positions some MoE block routes to other experts in
    /// the training forward than in the rollout (over all iterations).
    pub routing_mismatch: Option<f64>,
    pub lr: f64,
    /// Global gradient norm before clipping (last iteration).
    pub grad_norm: f64,
    pub rollout_s: f64,
    pub train_s: f64,
    /// Generated tokens per second of the rollout.
    pub rollout_tokens_per_s: f64,
    /// Trained tokens (prompt and completion) per second, over all iterations.
    pub train_tokens_per_s: f64,
    /// Completion tokens trained on so far.
    pub tokens: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// A held-out evaluation in `metrics.jsonl` (greedy decoding, exact answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoEvalRecord {
    pub step: usize,
    pub heldout_accuracy: f64,
    pub heldout_prompts: usize,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct GrpoSummary {
    pub steps: usize,
    pub wall_s: f64,
    /// Time in rollouts and in training, over the steps this invocation ran.
    pub rollout_s: f64,
    pub train_s: f64,
    /// Held-out accuracy at step 0 (a fresh run) and at the end.
    pub heldout_before: Option<f64>,
    pub heldout_after: Option<f64>,
    pub last_step: Option<GrpoStepRecord>,
    /// `DIR/adapter` (LoRA) or `DIR/hf` (full).
    pub output: PathBuf,
    pub metrics: PathBuf,
    pub plot: PathBuf,
}

impl std::fmt::Display for GrpoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "steps: {}", self.steps)?;
        writeln!(f, "wall_time_s: {:.1}", self.wall_s)?;
        let total = (self.rollout_s + self.train_s).max(1e-9);
        writeln!(
            f,
            "rollout_s: {:.1} ({:.0}%), train_s: {:.1} ({:.0}%)",
            self.rollout_s,
            100.0 * self.rollout_s / total,
            self.train_s,
            100.0 * self.train_s / total
        )?;
        if let Some(a) = self.heldout_before {
            writeln!(f, "heldout_accuracy_before: {a:.4}")?;
        }
        if let Some(a) = self.heldout_after {
            writeln!(f, "heldout_accuracy_after: {a:.4}")?;
        }
        if let Some(s) = &self.last_step {
            writeln!(f, "reward: {:.4}", s.reward)?;
            writeln!(f, "completion_len: {:.1}", s.completion_len)?;
        }
        writeln!(f, "metrics: {}", self.metrics.display())?;
        writeln!(f, "plot: {}", self.plot.display())?;
        write!(f, "output: {}", self.output.display())
    }
}

/// Runs `args` with the standard rewards (exact answer, plus `format_reward`).
pub fn grpo(args: &GrpoArgs) -> Result<GrpoSummary> {
    let weight = args.train.grpo.as_ref().map_or(0.0, |g| g.format_reward);
    grpo_with(args, &Rewards::standard(weight))
}

/// Runs `args` with `rewards` on the chosen backend.
pub fn grpo_with(args: &GrpoArgs, rewards: &Rewards) -> Result<GrpoSummary> {
    struct Run<'a>(&'a GrpoArgs, &'a Rewards);
    impl BackendTask for Run<'_> {
        type Output = Result<GrpoSummary>;
        fn run<B: Backend>(self, devices: Vec<B::Device>) -> Result<GrpoSummary> {
            run::<burn::backend::Autodiff<B>>(self.0, self.1, &devices[0])
        }
    }
    deepseek_core::device::run_on(args.device, &[], Run(args, rewards))?
}

/// The recipe a run trains with: the given one for a new run; for `--resume` the checkpoint's
/// with the given run settings, after checking the base model, adapters and GRPO settings are
/// the ones the run started with.
fn recipe(args: &GrpoArgs) -> Result<TrainConfig> {
    let given = &args.train;
    if given.finetune.is_none() || given.grpo.is_none() {
        return Err(TrainError::config("grpo", "a GRPO run needs `finetune` and `grpo` set"));
    }
    if !args.resume {
        return Ok(given.clone());
    }
    let Some((_, dir)) = checkpoint::latest(&args.out) else {
        return Err(TrainError::checkpoint(
            &args.out,
            "no checkpoint to resume from (run without --resume to start)",
        ));
    };
    let saved = checkpoint::read_state(&dir)?.train;
    let differs = |what: &str| {
        TrainError::checkpoint(
            &dir,
            format!("--resume continues the run as it started, but {what} differs: repeat the run's flags, or start a new --out"),
        )
    };
    if saved.grpo.is_none() {
        return Err(TrainError::checkpoint(&dir, "it holds another kind of run, not GRPO"));
    }
    let (s, g) = (
        saved.finetune.as_ref().expect("GRPO runs fine-tune"),
        given.finetune.as_ref().expect("checked"),
    );
    if s.base_model != g.base_model {
        return Err(differs("--model"));
    }
    if s.lora != g.lora {
        return Err(differs("the adapters (--full, --lora-*)"));
    }
    if saved.grpo != given.grpo {
        return Err(differs("a GRPO setting (task, group, sampling, clip, β, iterations, ...)"));
    }
    Ok(saved.with_run_settings(given.run_settings()))
}

/// Greedy exact-answer accuracy on `items` (at most `limit`; 0: all).
pub fn heldout_accuracy<B: Backend>(
    model: &DeepSeekModel<B>,
    prompting: &Prompting,
    items: &[TaskItem],
    limit: usize,
    max_new_tokens: usize,
    batch: usize,
    device: &B::Device,
) -> Result<(f64, usize)> {
    let items = if limit == 0 { items } else { &items[..limit.min(items.len())] };
    if items.is_empty() {
        return Ok((0.0, 0));
    }
    let requests = items
        .iter()
        .map(|item| {
            Ok(Request {
                prompt: prompting.encode(item)?,
                max_new_tokens,
                decoding: Decoding::Greedy,
                stop_tokens: prompting.eos.into_iter().collect(),
                stop_sequences: vec![],
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let outputs = generate_all(model, requests, batch, device, &mut |_, _| Ok(true))
        .map_err(|e| TrainError::Data(format!("evaluation: {e:#}")))?;
    let mut right = 0;
    for (item, out) in items.iter().zip(outputs) {
        right += deepseek_infer::checker::is_correct(&prompting.text(&out.tokens)?, &item.answer)
            as usize;
    }
    Ok((right as f64 / items.len() as f64, items.len()))
}

/// What stays fixed over a run's steps.
struct Setup<'a, AB: AutodiffBackend> {
    config: &'a TrainConfig,
    grpo: &'a GrpoConfig,
    task: &'a Task,
    prompting: &'a Prompting<'a>,
    rewards: &'a Rewards,
    /// The frozen reference of a full fine-tune's KL term (LoRA: the base, adapters off).
    reference: Option<&'a DeepSeekModel<AB::InnerBackend>>,
    lora: bool,
    device: &'a AB::Device,
}

/// Sums over a step's forwards.
#[derive(Default)]
struct Sums {
    loss: f64,
    clipped: f64,
    kl: f64,
    ratio: f64,
    entropy: f64,
    gap: f64,
    differ: usize,
    compared: usize,
}

impl<AB: AutodiffBackend> Setup<'_, AB> {
    /// One GRPO step: a rollout of `G` completions for each of the step's prompts, then
    /// `iterations` optimizer steps over them.
    fn step(
        &self,
        mut model: DeepSeekModel<AB>,
        optim: &mut AdamW<AB::InnerBackend>,
        step: usize,
    ) -> Result<(DeepSeekModel<AB>, GrpoStepRecord)> {
        let (cfg, g) = (self.config, self.grpo);
        let t0 = Instant::now();
        let position = (step * g.prompts_per_step) as u64;
        let items = self.task.batch(cfg.seed, position, g.prompts_per_step);
        let sampler = model.valid();
        let inner_device = sampler.embed_tokens.weight.device();
        let rollouts = sample_groups(
            &sampler,
            self.prompting,
            self.rewards,
            &items,
            g.group,
            (g.temperature, g.top_p),
            g.max_new_tokens,
            cfg.seed,
            position,
            g.rollout_batch,
            &inner_device,
        )?;
        drop(sampler);
        let rollout_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();

        let rewards: Vec<f64> = rollouts.iter().map(|r| r.reward).collect();
        let adv = advantages(&rewards, g.group, g.scale_rewards);
        let n = rollouts.len();
        let completion_tokens: usize = rollouts.iter().map(|r| r.completion.len()).sum();
        let trained_tokens: usize =
            rollouts.iter().map(|r| r.prompt.len() + r.completion.len() - 1).sum();
        let weight = |len: usize| token_weight(g.loss_norm, len, completion_tokens, n);
        let clip =
            ClipSettings { epsilon_low: g.epsilon, epsilon_high: g.epsilon_high(), beta: g.beta };
        let top_k = model.config.num_experts_per_tok;
        let lr = cfg.schedule().lr(step);
        let mut sums = Sums::default();
        let mut grad_norm = 0.0;
        let mut skipped = false;
        for iteration in 0..g.iterations {
            let mut accumulator = GradientsAccumulator::<DeepSeekModel<AB>>::new();
            let mut loss = 0.0;
            for start in (0..n).step_by(g.micro_batch) {
                let end = (start + g.micro_batch).min(n);
                let batch: Vec<&Rollout> = rollouts[start..end].iter().collect();
                let r = rows::<AB>(&batch, &adv[start..end], weight, top_k, self.device);
                if self.lora
                    && cfg
                        .finetune
                        .as_ref()
                        .and_then(|f| f.lora.as_ref())
                        .is_some_and(|l| l.dropout > 0.0)
                {
                    // LoRA dropout draws from the backend's generator: seeded from the step and
                    // the rows, a resumed run draws the same masks.
                    AB::seed(
                        self.device,
                        cfg.seed
                            ^ crate::grpo::task::mix(
                                ((step * g.iterations + iteration) * n + start) as u64,
                            ),
                    );
                }
                let out = if g.routing_replay {
                    model.forward_replayed(r.input.clone(), &r.replay)?
                } else {
                    model.forward_with(r.input.clone(), ForwardOptions::default())
                };
                let [rows_n, seq, _] = out.logits.dims();
                let logp_all = log_softmax(out.logits.div_scalar(g.temperature as f64), 2); // [n, seq, V]
                let logp: Tensor<AB, 2> = logp_all
                    .clone()
                    .gather(2, r.targets.clone().unsqueeze_dim::<3>(2))
                    .squeeze_dim::<2>(2); // [n, seq]
                                          // One update per rollout: the ratio is 1 and only its gradient matters (TRL);
                                          // several: against the log-probs the rollout sampled with.
                let old =
                    if g.iterations == 1 { logp.clone().detach() } else { r.rollout_logp.clone() };
                let reference = match (g.beta > 0.0, self.lora, self.reference) {
                    (false, _, _) => None,
                    (true, true, _) => {
                        Some(self.reference_logp(&model.valid().without_adapters(), &r, g)?)
                    }
                    (true, false, Some(reference)) => Some(self.reference_logp(reference, &r, g)?),
                    (true, false, None) => {
                        unreachable!("a full fine-tune with β > 0 holds a reference")
                    }
                };
                let obj = objective(
                    logp.clone(),
                    old,
                    reference,
                    r.advantages.clone(),
                    r.weights.clone(),
                    clip,
                );
                let mut grads = GradientsParams::from_grads(obj.loss.backward(), &model);
                // Summed over micro-batches in f32 ([`crate::precision`]).
                grads = crate::precision::widen_gradients(&model, grads, 1.0);
                accumulator.accumulate(&model, grads);
                loss += obj.loss.into_scalar().elem::<f64>();
                sums.clipped += obj.clipped.into_scalar().elem::<f64>();
                sums.kl += obj.kl.into_scalar().elem::<f64>();
                sums.ratio += obj.ratio.into_scalar().elem::<f64>();
                if iteration == 0 {
                    let logp_all = logp_all.detach();
                    let entropy =
                        (logp_all.clone().exp() * logp_all).sum_dim(2).reshape([rows_n, seq]).neg();
                    sums.entropy += (entropy * r.mask.clone()).sum().into_scalar().elem::<f64>();
                    let gap = (logp.detach() - r.rollout_logp.clone()).abs() * r.mask.clone();
                    sums.gap += gap.sum().into_scalar().elem::<f64>();
                }
                if !g.routing_replay {
                    let given = out
                        .routing
                        .iter()
                        .map(|routing| host_ids(routing.indices.clone()))
                        .collect::<Result<Vec<_>>>()?;
                    let (d, c) = routing_mismatch(&r.host_experts, &given, &r.lens, seq, top_k);
                    sums.differ += d;
                    sums.compared += c;
                }
            }
            sums.loss += loss;
            let grads = accumulator.grads();
            grad_norm = AdamW::<AB::InnerBackend>::global_norm::<AB, _>(&model, &grads);
            if let Some((what, value)) = [("loss", loss), ("gradient norm", grad_norm)]
                .into_iter()
                .find(|(_, v)| !v.is_finite())
            {
                if cfg.on_nonfinite == NonFinitePolicy::Stop {
                    return Err(TrainError::NonFinite { step: step + 1, what, value });
                }
                skipped = true;
                continue;
            }
            model = optim.step_with_norm::<AB, _>(lr, model, grads, grad_norm).0;
        }
        let train_s = t1.elapsed().as_secs_f64();
        let k = g.iterations as f64;
        let tokens_all = completion_tokens as f64;
        let groups: Vec<&[f64]> = rewards.chunks(g.group).collect();
        let std = |r: &[f64]| {
            let m = r.iter().sum::<f64>() / r.len() as f64;
            (r.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (r.len() - 1) as f64).sqrt()
        };
        let record = GrpoStepRecord {
            step: step + 1,
            loss: sums.loss / k,
            reward: rewards.iter().sum::<f64>() / n as f64,
            accuracy: rollouts.iter().filter(|r| r.correct).count() as f64 / n as f64,
            reward_std: groups.iter().map(|r| std(r)).sum::<f64>() / groups.len() as f64,
            zero_std_groups: groups.iter().filter(|r| r.iter().all(|v| *v == r[0])).count() as f64
                / groups.len() as f64,
            kl: (g.beta > 0.0).then(|| sums.kl / (k * tokens_all)),
            clip_fraction: sums.clipped / (k * tokens_all),
            ratio: sums.ratio / (k * tokens_all),
            entropy: sums.entropy / tokens_all,
            completion_len: tokens_all / n as f64,
            logprob_gap: sums.gap / tokens_all,
            routing_mismatch: (!g.routing_replay)
                .then(|| sums.differ as f64 / sums.compared.max(1) as f64),
            lr,
            grad_norm,
            rollout_s,
            train_s,
            rollout_tokens_per_s: tokens_all / rollout_s.max(1e-9),
            train_tokens_per_s: k * trained_tokens as f64 / train_s.max(1e-9),
            tokens: completion_tokens as u64, // this step's; the caller keeps the total
            skipped,
        };
        Ok((model, record))
    }

    /// The reference model's log-probs of the rows' tokens (routed as the training forward is).
    fn reference_logp(
        &self,
        reference: &DeepSeekModel<AB::InnerBackend>,
        r: &crate::grpo::rollout::Rows<AB>,
        g: &GrpoConfig,
    ) -> Result<Tensor<AB, 2>> {
        let input = r.input.clone().inner();
        let out = if g.routing_replay {
            let replay: Vec<_> = r.replay.iter().map(|t| t.clone().inner()).collect();
            reference.forward_replayed(input, &replay)?
        } else {
            reference.forward_with(input, ForwardOptions::default())
        };
        let logp = log_softmax(out.logits.div_scalar(g.temperature as f64), 2)
            .gather(2, r.targets.clone().inner().unsqueeze_dim::<3>(2))
            .squeeze_dim::<2>(2);
        Ok(Tensor::from_inner(logp))
    }
}

fn host_ids<B: Backend>(t: Tensor<B, 2, Int>) -> Result<Vec<i32>> {
    t.into_data()
        .convert::<i32>()
        .into_vec()
        .map_err(|e| TrainError::Data(format!("reading the routing: {e:?}")))
}

fn run<AB: AutodiffBackend>(
    args: &GrpoArgs,
    rewards: &Rewards,
    device: &AB::Device,
) -> Result<GrpoSummary> {
    let start_time = Instant::now();
    let config = recipe(args)?;
    let finetune = config.finetune.clone().expect("checked by recipe");
    let grpo = config.grpo.clone().expect("checked by recipe");
    grpo.validate()?;
    if config.dtype == deepseek_core::WeightDtype::F16 {
        return Err(TrainError::config(
            "dtype",
            "GRPO has no loss scaling for f16 gradients: use --dtype bf16",
        ));
    }
    if config.steps == 0 {
        return Err(TrainError::config("steps", "must be at least 1"));
    }
    if !(config.lr > 0.0 && config.lr.is_finite()) {
        return Err(TrainError::config("lr", format!("must be positive, got {}", config.lr)));
    }
    let base = &finetune.base_model;
    let model_cfg = DeepSeekConfig::from_hf_file(base)?;
    let data = |e: anyhow::Error| TrainError::Data(format!("{e:#}"));
    let tok = TextTokenizer::from_file(&base.join(crate::data::TOKENIZER_FILE)).map_err(data)?;
    tok.check_vocab(model_cfg.vocab_size).map_err(data)?;
    let (template, _) = crate::sft_data::model_template(base)?;
    let prompting = Prompting {
        tokenizer: &tok,
        template: &template,
        eos: template.end_of_turn(&tok, model_cfg.eos_token_id),
    };
    let task = grpo.task.load(config.seed)?;
    let context = model_cfg.max_position_embeddings;
    check_prompts(&prompting, &task.train, grpo.max_new_tokens, context)?;
    check_prompts(&prompting, &task.heldout, grpo.max_new_tokens, context)?;

    let out = &args.out;
    let (mut model, mut optim, mut step, mut tokens, elapsed_before) = if args.resume {
        let (_, dir) = checkpoint::latest(out).expect("recipe found one");
        let loaded = checkpoint::load::<AB>(&dir, &model_cfg, device)?;
        let s = loaded.state;
        (loaded.model, loaded.optim, s.step, s.tokens, s.elapsed_s)
    } else {
        if let Some((step, dir)) = checkpoint::latest(out) {
            return Err(TrainError::checkpoint(&dir, format!("{} already holds a run (checkpoint at step {step}): pass --resume to continue it, or choose another --out", out.display())));
        }
        let model = crate::sft::prepare_model::<AB>(&finetune, config.dtype, config.seed, device)?;
        (model, AdamW::new(config.optim), 0, 0, 0.0)
    };
    deepseek_core::register_autodiff::<AB::InnerBackend>();
    let lora = finetune.lora.is_some();
    let reference = (grpo.beta > 0.0 && !lora)
        .then(|| {
            let inner = model.valid().embed_tokens.weight.device();
            deepseek_core::load_model::<AB::InnerBackend>(base, &inner, Default::default())
        })
        .transpose()?;
    let setup = Setup::<AB> {
        config: &config,
        grpo: &grpo,
        task: &task,
        prompting: &prompting,
        rewards,
        reference: reference.as_ref(),
        lora,
        device,
    };
    // Nothing is written before the first step has run: bad input (a reward that returns NaN,
    // a rollout that fails) leaves no run behind.
    let mut metrics = Metrics { writer: None, pending: Vec::new() };
    let resume_step = args.resume.then_some(step);
    let evaluate = |model: &DeepSeekModel<AB>, step: usize| -> Result<GrpoEvalRecord> {
        let m = model.valid();
        let inner = m.embed_tokens.weight.device();
        let (acc, count) = heldout_accuracy(
            &m,
            &prompting,
            &task.heldout,
            grpo.eval_prompts,
            grpo.max_new_tokens,
            grpo.rollout_batch,
            &inner,
        )?;
        Ok(GrpoEvalRecord { step, heldout_accuracy: acc, heldout_prompts: count })
    };
    let mut heldout_before = None;
    let has_heldout = !task.heldout.is_empty();
    if step == 0 && has_heldout {
        let e = evaluate(&model, 0)?;
        heldout_before = Some(e.heldout_accuracy);
        metrics.write(&e)?;
    }
    let bar = crate::trainer::step_bar(args.progress, config.steps, step);
    let (mut rollout_s, mut train_s) = (0.0, 0.0);
    let mut last_step = None;
    let mut heldout_after = None;
    let run_start = Instant::now();
    while step < config.steps {
        let (next, mut record) = setup.step(model, &mut optim, step)?;
        model = next;
        step += 1;
        tokens += record.tokens;
        record.tokens = tokens;
        if metrics.writer.is_none() {
            std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
            let mut writer = MetricsWriter::open(out, resume_step)?;
            for line in metrics.pending.drain(..) {
                writer.write(&line)?;
            }
            metrics.writer = Some(writer);
        }
        metrics.write(&record)?;
        rollout_s += record.rollout_s;
        train_s += record.train_s;
        let last = step == config.steps;
        if has_heldout
            && (last || (config.eval_every > 0 && step.is_multiple_of(config.eval_every)))
        {
            let e = evaluate(&model, step)?;
            heldout_after = Some(e.heldout_accuracy);
            metrics.write(&e)?;
        }
        bar.set_position(step as u64);
        bar.set_message(format!(
            "reward {:.3} acc {:.2} held-out {} len {:.1} clip {:.3}",
            record.reward,
            record.accuracy,
            heldout_after.map_or("-".into(), |a| format!("{a:.3}")),
            record.completion_len,
            record.clip_fraction,
        ));
        last_step = Some(record);
        if last || (config.checkpoint_every > 0 && step.is_multiple_of(config.checkpoint_every)) {
            let state = TrainState {
                step,
                adam_step: optim.step,
                position: (step * grpo.prompts_per_step) as u64,
                tokens,
                seed: config.seed,
                elapsed_s: elapsed_before + run_start.elapsed().as_secs_f64(),
                train: config.clone(),
                data: Default::default(),
                loss_scale: None,
            };
            checkpoint::save(out, &model, &optim, &state, config.keep_checkpoints)?;
        }
    }
    bar.finish_and_clear();
    let inner = model.valid();
    let output = crate::sft::export(&inner, &finetune, out)?;
    let metrics_path = out.join(crate::metrics::METRICS_FILE);
    let plot = out.join(PLOT_FILE);
    plot_grpo(&metrics_path, &plot)?;
    Ok(GrpoSummary {
        steps: step,
        wall_s: start_time.elapsed().as_secs_f64(),
        rollout_s,
        train_s,
        heldout_before,
        heldout_after,
        last_step,
        output,
        metrics: metrics_path,
        plot,
    })
}

/// `metrics.jsonl`, opened once the first step has run; records before that wait.
struct Metrics {
    writer: Option<MetricsWriter>,
    pending: Vec<serde_json::Value>,
}

impl Metrics {
    fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        match &mut self.writer {
            Some(w) => w.write(record),
            None => {
                self.pending.push(serde_json::to_value(record).expect("records serialize"));
                Ok(())
            }
        }
    }
}

/// The step and evaluation records of a GRPO `metrics.jsonl`.
pub fn read_grpo_metrics(path: &Path) -> Result<(Vec<GrpoStepRecord>, Vec<GrpoEvalRecord>)> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let (mut steps, mut evals) = (Vec::new(), Vec::new());
    for line in text.lines() {
        if let Ok(r) = serde_json::from_str::<GrpoStepRecord>(line) {
            steps.push(r);
        } else if let Ok(r) = serde_json::from_str::<GrpoEvalRecord>(line) {
            evals.push(r);
        }
    }
    Ok((steps, evals))
}

/// Draws `png` (1200×500): the mean reward per step (and its 10-step moving average) with the
/// held-out accuracy on the left; completion length and clip fraction on the right.
pub fn plot_grpo(metrics: &Path, png: &Path) -> Result<()> {
    let (steps, evals) = read_grpo_metrics(metrics)?;
    let smooth: Vec<(f64, f64)> = steps
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let from = i.saturating_sub(9);
            let w = &steps[from..=i];
            (r.step as f64, w.iter().map(|s| s.reward).sum::<f64>() / w.len() as f64)
        })
        .collect();
    let left = vec![
        crate::metrics::Series::line(
            "reward",
            steps.iter().map(|r| (r.step as f64, r.reward)).collect(),
        ),
        crate::metrics::Series::bold("reward (10-step mean)", smooth),
        crate::metrics::Series::points(
            "held-out accuracy",
            evals.iter().map(|e| (e.step as f64, e.heldout_accuracy)).collect(),
        ),
    ];
    let right = vec![
        crate::metrics::Series::line(
            "completion length (tokens)",
            steps.iter().map(|r| (r.step as f64, r.completion_len)).collect(),
        ),
        crate::metrics::Series::line(
            "clip fraction × 100",
            steps.iter().map(|r| (r.step as f64, 100.0 * r.clip_fraction)).collect(),
        ),
    ];
    crate::metrics::plot_panels(
        png,
        ("reward and held-out accuracy", &left),
        ("completions", &right),
    )
}
