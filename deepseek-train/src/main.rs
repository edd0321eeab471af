//! `deepseek-train`: pretraining DeepSeek-V3-style models.
//!
//! ```sh
//! deepseek-train pretrain --preset small --steps 2000 --out runs/small
//! deepseek-train pretrain --preset small --steps 4000 --out runs/small --resume
//! deepseek-train pretrain --init-from runs/small/hf --corpus my.txt --steps 500 --out runs/ft
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use deepseek_core::moe::NodeLimit;
use deepseek_train::distributed::{Layout, Nodes, Transport};
use deepseek_train::pretrain::{pretrain, DeviceKind, PretrainArgs};

#[derive(Parser)]
#[command(
    name = "deepseek-train",
    version,
    about = "Pretrain DeepSeek-V3-style models (MLA, DeepSeekMoE with auxiliary-loss-free balancing, MTP)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from scratch (or from --init-from) and export it in Hugging Face layout.
    Pretrain(Box<PretrainCli>),
    /// Fine-tune an HF-layout model on chat data (JSONL: messages, alpaca or ShareGPT) with LoRA
    /// adapters that PEFT reads, or every weight with --full.
    Sft(Box<SftCli>),
    /// Distillation by rejection sampling: a teacher answers each prompt K times, the answers
    /// the checker verifies become `messages` JSONL for `sft`.
    Distill(Box<DistillCli>),
    /// Reinforcement learning with verifiable rewards (GRPO): sample a group of answers per
    /// prompt, score them with the checker, push the policy toward the better ones.
    Grpo(Box<GrpoCli>),
    /// Simulate a pipeline schedule: the timeline (text and PNG), memory per device and the
    /// bubble, in the units of the chunk times given.
    Schedule(ScheduleCli),
    /// Draw the loss and MaxVio curves of a metrics.jsonl (also while a run is going).
    Plot {
        /// A run directory or its metrics.jsonl.
        metrics: PathBuf,
        /// Output PNG (default: loss.png beside the metrics).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Draw this loss floor (e.g. the corpus entropy).
        #[arg(long)]
        floor: Option<f64>,
    },
}

#[derive(Args)]
struct ScheduleCli {
    /// Pipeline stages (ranks).
    #[arg(long)]
    pp: usize,
    /// Micro-batches per step.
    #[arg(long)]
    micro_batches: usize,
    /// 1f1b, zb1p or dualpipe.
    #[arg(long, default_value = "dualpipe")]
    schedule: deepseek_train::pipeline::ScheduleKind,
    /// Time of a forward chunk.
    #[arg(long, default_value_t = 1.0)]
    f: f64,
    /// Time of a full backward chunk (input and weight gradients).
    #[arg(long, default_value_t = 2.0)]
    b: f64,
    /// Time of the weight-gradient part of a backward.
    #[arg(long, default_value_t = 1.0)]
    w: f64,
    /// Time of an overlapped forward-and-backward pair (default F + B: no overlap).
    #[arg(long)]
    fb: Option<f64>,
    /// Where to draw the timeline (default: schedule-<kind>-pp<P>-m<M>.png).
    #[arg(long)]
    png: Option<PathBuf>,
}

/// `deepseek-train schedule`: simulate, print, draw.
fn run_schedule(cli: ScheduleCli) -> Result<()> {
    use deepseek_train::pipeline::{paper_bubble, simulate, Costs, Schedule};
    let schedule =
        Schedule::new(cli.schedule, cli.pp, cli.micro_batches).map_err(anyhow::Error::msg)?;
    let costs = Costs::new(cli.f, cli.b, cli.w, cli.fb).map_err(anyhow::Error::msg)?;
    let timeline = simulate(&schedule, &costs).map_err(anyhow::Error::msg)?;
    let png = cli.png.unwrap_or_else(|| {
        PathBuf::from(format!("schedule-{}-pp{}-m{}.png", cli.schedule, cli.pp, cli.micro_batches))
    });
    let title = format!(
        "{} PP={} M={} (F={} B={} W={} F&B={})",
        cli.schedule, cli.pp, cli.micro_batches, costs.f, costs.b, costs.w, costs.fb
    );
    timeline.plot(schedule.ranks, &title, &png).map_err(anyhow::Error::msg)?;
    print!("{}", timeline.text(schedule.ranks));
    println!("makespan: {}", timeline.makespan);
    println!("paper_bubble: {}", paper_bubble(&schedule, &costs));
    println!("parameters_per_device: {}x", timeline.parameter_copies);
    println!(
        "activations_per_device: {} (micro-batch chunks, the most any rank holds)",
        timeline.peak_activations.iter().max().copied().unwrap_or(0)
    );
    println!("plot: {}", png.display());
    println!("bubble: {}", timeline.bubble);
    Ok(())
}

#[derive(Args)]
struct PretrainCli {
    /// Model preset: tiny, small, v2-lite-16b, v3-671b (ignored with --init-from).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Total optimizer steps (with --resume: the new total).
    #[arg(long)]
    steps: Option<usize>,
    /// Run directory: data, metrics.jsonl, plot, checkpoints, hf/.
    #[arg(long)]
    out: PathBuf,
    /// `builtin` (the grammar corpus, no download) or one or more text files.
    #[arg(long, num_args = 1.., default_value = "builtin")]
    corpus: Vec<String>,
    /// HF tokenizer.json for --corpus files (default: train a byte-level BPE of the model's vocabulary size).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Load balancing: aux-free (DeepSeek-V3), aux-loss (classic auxiliary loss) or none.
    #[arg(long)]
    balance: Option<String>,
    /// Number of MTP modules (0 disables MTP).
    #[arg(long)]
    mtp_depth: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Start from an HF-layout model directory (continued pretraining, fine-tuning).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// With --init-from: extend the context with YaRN by this factor (sets max_position_embeddings).
    #[arg(long)]
    yarn_factor: Option<f64>,
    /// flex (CPU), wgpu or cuda; a list of devices for several ranks: cuda:0,cuda:1
    /// (ranks are placed on it round-robin).
    #[arg(long, default_value = "flex", value_parser = parse_devices)]
    device: (DeviceKind, Vec<usize>),
    /// Ranks in this process, one thread each (data parallel size: ranks / expert-parallel).
    /// The global batch (--batch-size) is split over all ranks.
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// Expert-parallel group size: the routed experts of each MoE layer are spread over this
    /// many ranks (must divide --ranks and the number of routed experts).
    #[arg(long, default_value_t = 1)]
    expert_parallel: usize,
    /// Seconds a rank waits for a peer before the run stops with an error.
    #[arg(long, default_value_t = 600)]
    rank_timeout: u64,
    /// Shard the AdamW state over the ranks (ZeRO-1): each keeps its moments for 1/R of the
    /// parameters and the updated weights are gathered after each step. Checkpoints hold the
    /// whole state (any rank count resumes them).
    #[arg(long)]
    zero1: bool,
    /// Pipeline stages: the decoder blocks split into this many contiguous stages, one rank
    /// each (must divide --ranks; the other ranks split the batch and the experts per stage).
    /// Micro-batches are --grad-accum. See docs/pipeline.md.
    #[arg(long, default_value_t = 1)]
    pipeline_parallel: usize,
    /// The pipeline schedule: 1f1b, zb1p or dualpipe (DeepSeek-V3 §3.2.1).
    #[arg(long, default_value = "1f1b")]
    schedule: deepseek_train::pipeline::ScheduleKind,
    /// Blocks per pipeline stage, e.g. 1,2,2,1 (default: balanced by parameter count).
    #[arg(long, value_delimiter = ',')]
    stage_layers: Option<Vec<usize>>,
    /// Processes (nodes) in a multi-node run; each runs --ranks ranks.
    #[arg(long, env = "DEEPSEEK_NODES")]
    nodes: Option<usize>,
    /// This process's index among --nodes.
    #[arg(long, env = "DEEPSEEK_NODE_RANK")]
    node_rank: Option<usize>,
    /// host:port of node 0's rendezvous (node 0 listens there).
    #[arg(long, env = "DEEPSEEK_MASTER")]
    master: Option<String>,
    /// How the processes exchange data: tcp, or nccl between CUDA GPUs.
    #[arg(long, default_value = "tcp")]
    transport: Transport,
    /// Train the weights and activations in f32, bf16 or f16: mixed precision, with f32 master
    /// weights and moments in the optimizer and the loss, norms, router and softmax in f32; f16
    /// adds dynamic loss scaling. A resumed run keeps its own.
    #[arg(long)]
    dtype: Option<deepseek_core::WeightDtype>,
    /// TOML file with any of the hyperparameters below (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bytes of built-in corpus text to generate.
    #[arg(long)]
    builtin_bytes: Option<usize>,
    /// Fraction of user text held out for validation.
    #[arg(long)]
    val_fraction: Option<f64>,
    #[command(flatten)]
    hyper: Hyper,
}

#[derive(Args)]
struct DistillCli {
    /// The teacher: an HF-layout model directory (tokenizer.json, chat template).
    #[arg(long)]
    teacher: PathBuf,
    /// `{prompt | question | messages, answer}` JSONL.
    #[arg(long)]
    prompts: PathBuf,
    /// Answers per prompt.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// The traces file to write.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature (0: greedy, then --samples must be 1).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// best (the shortest correct answer of each prompt) or all-correct.
    #[arg(long, default_value = "all-correct")]
    keep: deepseek_train::distill::Keep,
    /// Keep only answers of at most this many tokens.
    #[arg(long)]
    max_len: Option<usize>,
    /// Answers the teacher decodes together (continuous batching; the answers do not change).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value = "flex")]
    device: DeviceKind,
}

#[derive(Args)]
struct SftCli {
    /// The model to fine-tune: an HF-layout directory (config.json, safetensors, tokenizer.json,
    /// optionally tokenizer_config.json with the chat template).
    #[arg(long)]
    model: PathBuf,
    /// Training conversations, JSONL.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Validation conversations (default: the last 5% of --data, at least one).
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    /// Run directory: metrics.jsonl, plot, checkpoints, adapter/ (LoRA) or hf/ (--full).
    #[arg(long)]
    out: PathBuf,
    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// LoRA alpha (scale alpha/r, or alpha/√r with --rslora).
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// attn (the five MLA projections), attn+mlp (plus the dense MLP and shared experts), all
    /// (plus every routed expert), or a comma-separated list of module names.
    #[arg(long, default_value = "attn")]
    lora_targets: String,
    /// Rank-stabilized LoRA: scale alpha/√r.
    #[arg(long)]
    rslora: bool,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Rank of the routed experts' adapters (with --lora-targets all): one adapter per expert,
    /// so E times the memory of one.
    #[arg(long, default_value_t = 4)]
    expert_lora_rank: usize,
    /// Train every weight instead of adapters.
    #[arg(long)]
    full: bool,
    /// Hold the frozen base in f32, bf16 or f16 (LoRA: the adapters and their optimizer state
    /// stay f32); with --full, train the weights in it (mixed precision: f32 master weights and
    /// moments in the optimizer, dynamic loss scaling for f16).
    #[arg(long, default_value = "f32")]
    dtype: deepseek_core::WeightDtype,
    /// Longest conversation in tokens (longer ones are skipped and counted).
    #[arg(long, default_value_t = 1024)]
    max_len: usize,
    /// A conversation longer than --max-len is an error instead of being skipped.
    #[arg(long)]
    strict_length: bool,
    /// Pack several conversations per row of --max-len tokens (attention and positions stay
    /// inside each conversation).
    #[arg(long)]
    pack: bool,
    /// Passes over the data (default 1 unless --steps is given).
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<f64>,
    /// Total optimizer steps (with --resume: the new total).
    #[arg(long)]
    steps: Option<usize>,
    /// Train on the prompt tokens too (default: assistant turns only).
    #[arg(long)]
    train_on_prompt: bool,
    /// frozen (gate and bias unchanged) or bias-update (aux-free bias updates on).
    #[arg(long, default_value = "frozen")]
    router: deepseek_train::config::RouterMode,
    #[arg(long)]
    seed: Option<u64>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// flex (CPU), wgpu or cuda; a list of devices for several ranks.
    #[arg(long, default_value = "flex", value_parser = parse_devices)]
    device: (DeviceKind, Vec<usize>),
    /// Ranks in this process, one thread each.
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// Expert-parallel group size.
    #[arg(long, default_value_t = 1)]
    expert_parallel: usize,
    /// Shard the AdamW state over the ranks (ZeRO-1): each keeps 1/R of it.
    #[arg(long)]
    zero1: bool,
    /// Seconds a rank waits for a peer before the run stops with an error.
    #[arg(long, default_value_t = 600)]
    rank_timeout: u64,
    /// TOML file with any of the hyperparameters (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    hyper: Hyper,
}

#[derive(Args)]
struct GrpoCli {
    /// The policy's starting point: an HF-layout directory (config.json, safetensors,
    /// tokenizer.json, tokenizer_config.json with the chat template).
    #[arg(long)]
    model: PathBuf,
    /// Continue training this LoRA adapter (PEFT layout) instead of fresh adapters.
    #[arg(long, conflicts_with = "full")]
    adapter: Option<PathBuf>,
    /// `arithmetic` (generated `a plus b` problems) or a JSONL file of
    /// `{prompt | question | messages, answer}`.
    #[arg(long, default_value = "arithmetic")]
    task: String,
    /// Held-out prompts of a task file (default: its last 5%).
    #[arg(long)]
    heldout: Option<PathBuf>,
    /// Arithmetic: operands below this.
    #[arg(long, default_value_t = 20)]
    difficulty: u32,
    /// Arithmetic: operations, comma-separated (plus, minus, times).
    #[arg(long, default_value = "plus")]
    ops: String,
    /// Run directory: metrics.jsonl, grpo.png, checkpoints, adapter/ (LoRA) or hf/ (--full).
    #[arg(long)]
    out: PathBuf,
    /// Completions per prompt G (at least 2).
    #[arg(long, default_value_t = 8)]
    group: usize,
    #[arg(long, default_value_t = 8)]
    prompts_per_step: usize,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long)]
    top_p: Option<f32>,
    /// ε of the clip (low side; and high unless --epsilon-high).
    #[arg(long, default_value_t = 0.2)]
    epsilon: f64,
    /// ε of the clip's high side (DAPO's clip-higher, e.g. 0.28).
    #[arg(long)]
    epsilon_high: Option<f64>,
    /// β of the KL (k3) to the reference (the base; with LoRA the adapters off).
    #[arg(long, default_value_t = 0.0)]
    beta: f64,
    /// Optimizer steps per batch of rollouts.
    #[arg(long, default_value_t = 1)]
    iterations: usize,
    /// token (DAPO: over the step's completion tokens) or sequence (per completion, then mean).
    #[arg(long, default_value = "token")]
    loss_norm: deepseek_train::grpo::LossNorm,
    /// Advantages r − mean without dividing by the group's std (Dr. GRPO).
    #[arg(long)]
    no_scale_rewards: bool,
    /// Route the training forward's tokens to the experts the rollout chose.
    #[arg(long)]
    routing_replay: bool,
    /// Weight of the `#### N` format reward (0: none).
    #[arg(long, default_value_t = 0.0)]
    format_reward: f64,
    /// Sequences per training forward (memory only).
    #[arg(long, default_value_t = 16)]
    micro_batch: usize,
    /// Sequences decoded together in the rollout (speed only).
    #[arg(long, default_value_t = 64)]
    rollout_batch: usize,
    /// Held-out prompts per evaluation (0: all).
    #[arg(long, default_value_t = 0)]
    eval_prompts: usize,
    /// LoRA rank r (fresh adapters).
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// attn, attn+mlp, all, or a comma-separated list of module names.
    #[arg(long, default_value = "attn+mlp")]
    lora_targets: String,
    /// Train every weight (router frozen) instead of adapters.
    #[arg(long)]
    full: bool,
    /// Hold the frozen base in f32, bf16 or f16 (LoRA: the adapters and their optimizer state
    /// stay f32); with --full, train the weights in bf16 with f32 master weights and moments.
    #[arg(long, default_value = "f32")]
    dtype: deepseek_core::WeightDtype,
    /// GRPO steps (with --resume: the new total).
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate (default 1e-4 with LoRA, 1e-6 with --full).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long)]
    min_lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 disables).
    #[arg(long)]
    clip_norm: Option<f64>,
    /// Held-out evaluation every this many steps (and at the start and end).
    #[arg(long)]
    eval_every: Option<usize>,
    #[arg(long)]
    checkpoint_every: Option<usize>,
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// stop or skip.
    #[arg(long)]
    on_nonfinite: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// flex (CPU), wgpu or cuda.
    #[arg(long, default_value = "flex")]
    device: DeviceKind,
    /// TOML file with any of the hyperparameters (`[grpo]` for the algorithm's; flags override).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Hyperparameters; each overrides the TOML file and the defaults.
#[derive(Args)]
struct Hyper {
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Fraction of the steps where cosine decay starts.
    #[arg(long)]
    decay_start: Option<f64>,
    /// Fraction of the steps where it reaches --min-lr.
    #[arg(long)]
    decay_end: Option<f64>,
    #[arg(long)]
    min_lr: Option<f64>,
    /// Rate after --decay-end (default 7.3e-6 as in the paper; set equal to --min-lr for none).
    #[arg(long)]
    final_lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    beta1: Option<f64>,
    #[arg(long)]
    beta2: Option<f64>,
    /// Global gradient-norm clip (0 disables).
    #[arg(long)]
    clip_norm: Option<f64>,
    /// γ of the bias update.
    #[arg(long)]
    bias_gamma: Option<f64>,
    /// Stop bias updates at this step.
    #[arg(long)]
    bias_update_until: Option<usize>,
    /// α of the sequence-wise balance loss (aux-free).
    #[arg(long)]
    seq_aux_alpha: Option<f64>,
    /// α of the auxiliary loss (aux-loss).
    #[arg(long)]
    aux_loss_alpha: Option<f64>,
    #[arg(long)]
    mtp_lambda: Option<f64>,
    #[arg(long)]
    mtp_lambda_late: Option<f64>,
    /// Fraction of the steps after which --mtp-lambda-late applies.
    #[arg(long)]
    mtp_lambda_switch: Option<f64>,
    #[arg(long)]
    eval_every: Option<usize>,
    #[arg(long)]
    eval_batches: Option<usize>,
    #[arg(long)]
    checkpoint_every: Option<usize>,
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// stop or skip.
    #[arg(long)]
    on_nonfinite: Option<String>,
    /// FP8 mixed precision: E4M3 GEMM operands with 1×128 / 128×128 scales, forward and backward.
    #[arg(long)]
    fp8: bool,
    /// Activation checkpointing: keep only the residual stream between blocks and recompute
    /// each block in the backward pass (same gradients, less memory, one more forward pass).
    #[arg(long)]
    checkpoint_activations: bool,
    /// Node-limited routing NODES:M: the experts split into NODES blocks, each token's experts
    /// on at most M of them (chosen by the sums of their best K/M scores).
    #[arg(long, value_parser = parse_node_limit)]
    node_limit: Option<NodeLimit>,
}

fn main() -> Result<()> {
    deepseek_train::alloc::keep_freed_memory();
    // A rank thread that fails (a lost peer inside the model's forward) is reported once, as the
    // run's error naming the rank: keep the default panic report for every other thread.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("rank-") || n.starts_with("stage-rank-"))
        {
            default_hook(info);
        }
    }));
    let cli = match Cli::parse().command {
        Command::Pretrain(cli) => *cli,
        Command::Sft(cli) => return run_sft(*cli),
        Command::Grpo(cli) => return run_grpo(*cli),
        Command::Schedule(cli) => return run_schedule(cli),
        Command::Distill(cli) => {
            let decoding = deepseek_infer::generate::Decoding::new(
                cli.temperature,
                cli.top_k,
                cli.top_p,
                cli.seed,
            )?;
            if cli.samples == 0 {
                bail!("--samples must be at least 1");
            }
            if cli.samples > 1 && decoding == deepseek_infer::generate::Decoding::Greedy {
                bail!("--samples {} with --temperature 0 gives copies of one answer", cli.samples);
            }
            let args = deepseek_train::distill::DistillArgs {
                teacher: cli.teacher,
                prompts: cli.prompts,
                out: cli.out,
                config: deepseek_train::distill::DistillConfig {
                    samples: cli.samples,
                    max_new_tokens: cli.max_new_tokens,
                    decoding,
                    keep: cli.keep,
                    max_len: cli.max_len,
                    batch: cli.batch,
                },
                device: cli.device,
            };
            println!("{}", deepseek_train::distill::run_distill(&args)?);
            return Ok(());
        }
        Command::Plot { metrics, out, floor } => {
            let file = if metrics.is_dir() {
                metrics.join(deepseek_train::metrics::METRICS_FILE)
            } else {
                metrics
            };
            let grpo = !deepseek_train::grpo::run::read_grpo_metrics(&file)?.0.is_empty();
            let name = if grpo { deepseek_train::grpo::run::PLOT_FILE } else { "loss.png" };
            let png = out.unwrap_or_else(|| file.with_file_name(name));
            if grpo {
                deepseek_train::grpo::run::plot_grpo(&file, &png)?;
            } else {
                deepseek_train::metrics::plot(&file, &png, floor)?;
            }
            println!("{}", png.display());
            return Ok(());
        }
    };
    let mut train = read_config(cli.config.as_deref(), Default::default())?;
    apply_hyper(&mut train, &cli.hyper, cli.steps, cli.seed)?;
    if let Some(dtype) = cli.dtype {
        train.dtype = dtype;
    }
    set_balance(&mut train, cli.balance.as_deref())?;
    if cli.steps.is_none() && cli.config.is_none() {
        bail!("--steps is required (or a --config file that sets `steps`)");
    }
    let nodes = match (cli.nodes, cli.node_rank, &cli.master) {
        (None | Some(1), None, None) => None,
        (Some(count), Some(node), Some(master)) => Some(Nodes { node, count, master: master.clone(), transport: cli.transport }),
        _ => bail!("a multi-node run needs --nodes, --node-rank and --master (or DEEPSEEK_NODES, DEEPSEEK_NODE_RANK, DEEPSEEK_MASTER)"),
    };
    let layout = Layout {
        ranks: cli.ranks,
        expert_parallel: cli.expert_parallel,
        timeout: std::time::Duration::from_secs(cli.rank_timeout),
        nodes,
        zero1: cli.zero1,
        gradient_bucket: deepseek_train::distributed::GRADIENT_BUCKET,
        pipeline: match (cli.pipeline_parallel, cli.stage_layers) {
            (0, _) => bail!("--pipeline-parallel must be at least 1"),
            (1, None) => None,
            (stages, stage_layers) => Some(deepseek_train::pipeline::run::PipelineLayout {
                stage_layers,
                ..deepseek_train::pipeline::run::PipelineLayout::new(stages, cli.schedule)
            }),
        },
    };
    let (device, device_ids) = cli.device;
    let args = PretrainArgs {
        preset: cli.preset,
        out: cli.out,
        corpus: cli.corpus,
        tokenizer: cli.tokenizer,
        mtp_depth: cli.mtp_depth,
        resume: cli.resume,
        init_from: cli.init_from,
        yarn_factor: cli.yarn_factor,
        device,
        device_ids,
        layout,
        builtin_bytes: cli.builtin_bytes,
        val_fraction: cli.val_fraction,
        train,
        model: None,
        progress: true,
    };
    let summary = pretrain(&args)?;
    println!("{summary}");
    Ok(())
}

/// The TOML file's hyperparameters over `defaults`, or the defaults.
fn read_config(
    path: Option<&std::path::Path>,
    defaults: deepseek_train::TrainConfig,
) -> Result<deepseek_train::TrainConfig> {
    let Some(path) = path else { return Ok(defaults) };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: toml::Table = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid training config", path.display()))?;
    // The file over `defaults`, table by table (`[optim]` keeps the keys it leaves out). JSON
    // keeps the defaults' `None`s, which TOML cannot spell.
    fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
        match (base, over) {
            (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
                for (k, v) in o {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, o) => *b = o,
        }
    }
    let mut merged = serde_json::to_value(&defaults).expect("the config serializes");
    merge(&mut merged, serde_json::to_value(file).expect("TOML values are JSON values"));
    serde_json::from_value(merged)
        .with_context(|| format!("{} is not a valid training config", path.display()))
}

fn set_balance(train: &mut deepseek_train::TrainConfig, balance: Option<&str>) -> Result<()> {
    if let Some(b) = balance {
        train.balance = b.parse().map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// `set!(train, a.b = value)`: `train.a.b = v` when `value` is `Some(v)` (a flag that was given).
macro_rules! set {
    ($train:ident, $($field:ident).+ = $value:expr) => {
        if let Some(v) = $value {
            $train.$($field).+ = v;
        }
    };
}

/// The flags of `hyper` over `train`.
fn apply_hyper(
    train: &mut deepseek_train::TrainConfig,
    hyper: &Hyper,
    steps: Option<usize>,
    seed: Option<u64>,
) -> Result<()> {
    let h = hyper;
    set!(train, steps = steps);
    set!(train, seed = seed);
    set!(train, batch_size = h.batch_size);
    set!(train, seq_len = h.seq_len);
    set!(train, grad_accum = h.grad_accum);
    set!(train, lr = h.lr);
    set!(train, warmup_steps = h.warmup_steps);
    set!(train, decay_start = h.decay_start);
    set!(train, decay_end = h.decay_end);
    set!(train, min_lr = h.min_lr);
    set!(train, final_lr = h.final_lr.map(Some));
    set!(train, optim.weight_decay = h.weight_decay);
    set!(train, optim.beta1 = h.beta1);
    set!(train, optim.beta2 = h.beta2);
    set!(train, optim.max_grad_norm = h.clip_norm.map(|c| (c > 0.0).then_some(c)));
    set!(train, bias_gamma = h.bias_gamma);
    set!(train, bias_update_until = h.bias_update_until.map(Some));
    set!(train, seq_aux_alpha = h.seq_aux_alpha);
    set!(train, aux_loss_alpha = h.aux_loss_alpha);
    set!(train, mtp_lambda = h.mtp_lambda);
    set!(train, mtp_lambda_late = h.mtp_lambda_late);
    set!(train, mtp_lambda_switch = h.mtp_lambda_switch);
    set!(train, eval_every = h.eval_every);
    set!(train, eval_batches = h.eval_batches);
    set!(train, checkpoint_every = h.checkpoint_every);
    set!(train, keep_checkpoints = h.keep_checkpoints);
    if h.fp8 {
        train.fp8 = true;
    }
    if h.checkpoint_activations {
        train.checkpoint_activations = true;
    }
    if let Some(limit) = h.node_limit {
        train.node_limit = Some(limit);
    }
    set!(
        train,
        on_nonfinite =
            h.on_nonfinite.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?
    );
    Ok(())
}

fn run_sft(cli: SftCli) -> Result<()> {
    use deepseek_train::config::{Finetune, LoraRecipe};
    use deepseek_train::sft::{sft, sft_defaults, warmup_for, SftArgs};
    let lora = if cli.full {
        None
    } else {
        let targets = deepseek_core::LoraTargets::parse(&cli.lora_targets)?;
        let recipe = LoraRecipe {
            rank: cli.lora_rank,
            alpha: cli.lora_alpha,
            rslora: cli.rslora,
            dropout: cli.lora_dropout,
            expert_rank: cli.expert_lora_rank,
            targets: targets.0,
        };
        recipe.settings().validate()?;
        Some(recipe)
    };
    if cli.hyper.seq_len.is_some() {
        bail!("--seq-len is set by --max-len in fine-tuning");
    }
    let mut train = read_config(cli.config.as_deref(), sft_defaults(lora.is_some(), cli.router))?;
    apply_hyper(&mut train, &cli.hyper, cli.steps, cli.seed)?;
    // Checkpoints name the base: absolute, so a resume from another directory finds it.
    let base_model = std::fs::canonicalize(&cli.model)
        .with_context(|| format!("--model {}", cli.model.display()))?;
    train.finetune = Some(Finetune {
        base_model,
        lora,
        router: cli.router,
        data: None,
        adapter: None,
        base_dtype: cli.dtype,
    });
    if cli.full {
        train.dtype = cli.dtype;
    }
    // A warmup the flags or the file set is kept; otherwise 3% of the steps.
    let warmup_given = cli.hyper.warmup_steps.is_some()
        || cli.config.as_deref().is_some_and(|p| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .is_some_and(|t| t.contains_key("warmup_steps"))
        });
    if !warmup_given {
        train.warmup_steps = warmup_for(train.steps);
    }
    let epochs = match (cli.epochs, cli.steps, &cli.config) {
        (Some(e), _, _) => Some(e),
        (None, None, None) => Some(1.0),
        _ => None,
    };
    let (device, device_ids) = cli.device;
    let args = SftArgs {
        data: cli.data,
        val_data: cli.val_data,
        out: cli.out,
        max_len: cli.max_len,
        strict_length: cli.strict_length,
        pack: cli.pack,
        train_on_prompt: cli.train_on_prompt,
        epochs,
        warmup_steps: warmup_given.then_some(train.warmup_steps),
        resume: cli.resume,
        device,
        device_ids,
        layout: Layout {
            ranks: cli.ranks,
            expert_parallel: cli.expert_parallel,
            timeout: std::time::Duration::from_secs(cli.rank_timeout),
            nodes: None,
            pipeline: None,
            zero1: cli.zero1,
            ..Default::default()
        },
        progress: true,
        train,
    };
    let summary = sft(&args)?;
    println!("{summary}");
    Ok(())
}

fn run_grpo(cli: GrpoCli) -> Result<()> {
    use deepseek_train::config::{Finetune, LoraRecipe, RouterMode};
    use deepseek_train::grpo::task::Op;
    use deepseek_train::grpo::{GrpoConfig, TaskSpec};
    let lora = match (&cli.adapter, cli.full) {
        (_, true) => None,
        (Some(dir), false) => Some(LoraRecipe::from_adapter(dir)?),
        (None, false) => {
            let recipe = LoraRecipe {
                rank: cli.lora_rank,
                alpha: cli.lora_alpha,
                rslora: false,
                dropout: 0.0,
                expert_rank: 4,
                targets: deepseek_core::LoraTargets::parse(&cli.lora_targets)?.0,
            };
            recipe.settings().validate()?;
            Some(recipe)
        }
    };
    let task = if cli.task == "arithmetic" {
        TaskSpec::Arithmetic {
            max_operand: cli.difficulty,
            ops: Op::parse_list(&cli.ops).map_err(anyhow::Error::msg)?,
            heldout_per_mille: 100,
        }
    } else {
        let train = PathBuf::from(&cli.task);
        if !train.is_file() {
            bail!("--task {}: neither `arithmetic` nor a readable JSONL file", cli.task);
        }
        TaskSpec::File { train, heldout: cli.heldout.clone() }
    };
    if cli.heldout.is_some() && cli.task == "arithmetic" {
        bail!("--heldout goes with a task file; the arithmetic task holds out its own problems");
    }
    let defaults = deepseek_train::TrainConfig {
        lr: if lora.is_some() { 1e-4 } else { 1e-6 },
        warmup_steps: 0,
        decay_start: 1.0,
        decay_end: 1.0,
        final_lr: None,
        eval_every: 25,
        checkpoint_every: 50,
        balance: deepseek_train::BalanceMode::None,
        mtp_lambda: 0.0,
        mtp_lambda_late: 0.0,
        grpo: Some(GrpoConfig::default()),
        ..Default::default()
    };
    let mut train = read_config(cli.config.as_deref(), defaults.clone())?;
    if train.grpo != defaults.grpo {
        bail!(
            "{}: the GRPO settings are flags (--group, --beta, ...), not a [grpo] table",
            cli.config.as_deref().map_or_else(String::new, |p| p.display().to_string())
        );
    }
    let grpo = train.grpo.get_or_insert_with(GrpoConfig::default);
    *grpo = GrpoConfig {
        task,
        group: cli.group,
        prompts_per_step: cli.prompts_per_step,
        max_new_tokens: cli.max_new_tokens,
        temperature: cli.temperature,
        top_p: cli.top_p,
        epsilon: cli.epsilon,
        epsilon_high: cli.epsilon_high,
        beta: cli.beta,
        iterations: cli.iterations,
        loss_norm: cli.loss_norm,
        scale_rewards: !cli.no_scale_rewards,
        routing_replay: cli.routing_replay,
        format_reward: cli.format_reward,
        micro_batch: cli.micro_batch,
        rollout_batch: cli.rollout_batch,
        eval_prompts: cli.eval_prompts,
    };
    grpo.validate()?;
    set!(train, steps = cli.steps);
    set!(train, seed = cli.seed);
    set!(train, lr = cli.lr);
    if cli.min_lr.is_none() {
        train.min_lr = train.lr;
    }
    set!(train, warmup_steps = cli.warmup_steps);
    set!(train, optim.weight_decay = cli.weight_decay);
    set!(train, optim.max_grad_norm = cli.clip_norm.map(|c| (c > 0.0).then_some(c)));
    set!(train, eval_every = cli.eval_every);
    set!(train, checkpoint_every = cli.checkpoint_every);
    set!(train, keep_checkpoints = cli.keep_checkpoints);
    set!(
        train,
        on_nonfinite =
            cli.on_nonfinite.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?
    );
    if cli.steps.is_none() && cli.config.is_none() {
        bail!("--steps is required (or a --config file that sets `steps`)");
    }
    let base_model = std::fs::canonicalize(&cli.model)
        .with_context(|| format!("--model {}", cli.model.display()))?;
    let adapter = cli
        .adapter
        .map(|a| std::fs::canonicalize(&a).with_context(|| format!("--adapter {}", a.display())))
        .transpose()?;
    train.finetune = Some(Finetune {
        base_model,
        lora,
        router: RouterMode::Frozen,
        data: None,
        adapter,
        base_dtype: cli.dtype,
    });
    if cli.full {
        train.dtype = cli.dtype;
    }
    let args = deepseek_train::grpo::GrpoArgs {
        out: cli.out,
        resume: cli.resume,
        device: cli.device,
        progress: true,
        train,
    };
    println!("{}", deepseek_train::grpo::grpo(&args)?);
    Ok(())
}

/// `flex`, `cuda`, or a device list `cuda:0,cuda:1` (one kind).
fn parse_devices(s: &str) -> std::result::Result<(DeviceKind, Vec<usize>), String> {
    let mut kind = None;
    let mut ids = Vec::new();
    for item in s.split(',') {
        let (name, id) = match item.split_once(':') {
            Some((name, id)) => (
                name,
                Some(
                    id.parse::<usize>()
                        .map_err(|_| format!("`{item}`: the device index must be a number"))?,
                ),
            ),
            None => (item, None),
        };
        let k: DeviceKind = name.parse()?;
        if kind.is_some_and(|prev| prev != k) {
            return Err(format!("`{s}` mixes backends: list devices of one kind"));
        }
        kind = Some(k);
        ids.extend(id);
    }
    Ok((kind.ok_or("no device given")?, ids))
}

/// `NODES:M`.
fn parse_node_limit(s: &str) -> std::result::Result<NodeLimit, String> {
    let (nodes, max) =
        s.split_once(':').ok_or_else(|| format!("`{s}`: expected NODES:M, e.g. 8:4"))?;
    let number = |v: &str| v.parse::<usize>().map_err(|_| format!("`{s}`: `{v}` is not a number"));
    Ok(NodeLimit { nodes: number(nodes)?, max_nodes: number(max)? })
}
