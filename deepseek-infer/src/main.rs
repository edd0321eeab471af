//! The `deepseek` command: check a model's logits, generate, chat, tokenize, benchmark, describe a
//! configuration.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Parser, Subcommand};
use deepseek_core::device::{run_on, BackendTask, DeviceKind};
use deepseek_core::memory::{MemoryPlan, PlanRequest, PlanTask};
use deepseek_core::{
    load_model, AttentionPath, DeepSeekConfig, ForwardOptions, LoadOptions, WeightDtype,
};
use std::io::Write;

use deepseek_infer::chat::{ChatTemplate, Message};
use deepseek_infer::engine::{generate_all, Request};
use deepseek_infer::generate::{generate, generate_streaming, Decoding, GenerateConfig};
use deepseek_infer::io;
use deepseek_infer::pipeline::{
    encode_plain, read_tokenizer_config, tokenizer_config_file, Pipeline,
};
use deepseek_infer::server::{serve, ServeOptions};
use deepseek_infer::speculative;
use deepseek_infer::tokenizer::{IncrementalDecoder, TextTokenizer};

#[derive(Parser)]
#[command(name = "deepseek", version, about = "DeepSeek-V3 models in Burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Casts a checkpoint between BF16 and the released FP8 format (128×128 block scales),
    /// writing sharded safetensors with an index.
    Convert {
        /// Hugging Face-layout model directory to read.
        #[arg(long)]
        model: PathBuf,
        /// Directory to write.
        #[arg(long)]
        out: PathBuf,
        /// bf16 (dequantize FP8 weights) or fp8 (quantize projection weights).
        #[arg(long)]
        dtype: deepseek_core::checkpoint::convert::ConvertTo,
        /// Largest shard, in MiB.
        #[arg(long, default_value_t = 4096)]
        shard_mib: u64,
    },
    /// Runs the model on `input_ids` from a safetensors file and writes the `logits`.
    Logits {
        /// Hugging Face-layout model directory (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// safetensors file with `input_ids`, I64 [batch, seq].
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write `logits`, F32 [batch, seq, vocab], to.
        #[arg(long)]
        output: PathBuf,
        /// Weights and activations in f32, bf16 or f16 (norms, router, softmax and logits stay
        /// f32).
        #[arg(long, default_value = "f32")]
        dtype: WeightDtype,
        /// Dequantize an FP8 checkpoint's weights into `--dtype` on load, instead of keeping
        /// them as stored (E4M3 codes and block scales: a byte per weight).
        #[arg(long)]
        dequantize: bool,
        /// Backend: flex (CPU), wgpu or cuda.
        #[arg(long, default_value = "flex")]
        device: DeviceKind,
        /// Ignore checkpoint tensors the model does not use.
        #[arg(long)]
        allow_unused: bool,
        /// A LoRA adapter directory (PEFT layout) applied to the model, unmerged.
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
    /// Continues a prompt, greedily or by sampling, over the latent KV cache.
    Generate {
        /// Hugging Face-layout model directory.
        #[arg(long)]
        model: PathBuf,
        /// Prompt as token ids, comma-separated (e.g. `1,2,3`).
        #[arg(long, value_delimiter = ',', required_unless_present = "prompt")]
        prompt_ids: Option<Vec<i64>>,
        /// Prompt as text, tokenized with --tokenizer; the output streams as text.
        #[arg(long, conflicts_with = "prompt_ids")]
        prompt: Option<String>,
        /// tokenizer.json (default: the one in the model directory).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// A LoRA adapter directory (PEFT layout) applied to the model, unmerged.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Weights and activations in f32, bf16 or f16 (norms, router, softmax and logits stay
        /// f32).
        #[arg(long, default_value = "f32")]
        dtype: WeightDtype,
        /// Dequantize an FP8 checkpoint's weights into `--dtype` on load, instead of keeping
        /// them as stored (E4M3 codes and block scales: a byte per weight).
        #[arg(long)]
        dequantize: bool,
        /// Backend: flex (CPU), wgpu or cuda.
        #[arg(long, default_value = "flex")]
        device: DeviceKind,
        /// End with a line holding only the generated ids, space-separated.
        #[arg(long)]
        print_ids: bool,
        /// Stop once the generated text contains this string (text prompts; repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Draft with the MTP module and verify with the main model (speculative sampling: the
        /// output is distributed as without it; greedy output is identical).
        #[arg(long)]
        speculative: bool,
    },
    /// Measures prefill and decode throughput (tokens/s) and the KV-cache bytes per token.
    Bench {
        /// Hugging Face-layout model directory.
        #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
        model: Option<PathBuf>,
        /// A named preset with random weights: v3-671b, v2-lite-16b, tiny, small.
        #[arg(long)]
        preset: Option<String>,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// MLA path for decoding: absorbed (over the latent) or naive (expanded K/V).
        #[arg(long, default_value = "absorbed")]
        path: String,
        /// Raise the preset's context (max_position_embeddings) to fit long benchmarks.
        #[arg(long)]
        context: Option<usize>,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Weights and activations in f32, bf16 or f16 (norms, router, softmax and logits stay
        /// f32).
        #[arg(long, default_value = "f32")]
        dtype: WeightDtype,
        /// Dequantize an FP8 checkpoint's weights into `--dtype` on load, instead of keeping
        /// them as stored (E4M3 codes and block scales: a byte per weight).
        #[arg(long)]
        dequantize: bool,
        #[arg(long, default_value = "flex")]
        device: DeviceKind,
        /// A LoRA adapter directory (PEFT layout) applied to the model, unmerged.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Also measure the memory's read bandwidth (a 1 GiB sum on all threads, about two
        /// seconds) and print the fraction of it that decoding reaches.
        #[arg(long)]
        bandwidth: bool,
    },
    /// Interactive multi-turn chat: one user message per line on stdin, replies streamed.
    Chat {
        /// Hugging Face-layout model directory (with tokenizer.json and tokenizer_config.json).
        #[arg(long)]
        model: PathBuf,
        /// tokenizer.json (default: the model directory's).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// tokenizer_config.json with the chat template (default: the model directory's).
        #[arg(long)]
        tokenizer_config: Option<PathBuf>,
        /// A system prompt opening the conversation.
        #[arg(long)]
        system: Option<String>,
        /// A LoRA adapter directory (PEFT layout) applied to the model, unmerged; its
        /// tokenizer_config.json (the template it was trained with) is used when present.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Weights and activations in f32, bf16 or f16 (norms, router, softmax and logits stay
        /// f32).
        #[arg(long, default_value = "f32")]
        dtype: WeightDtype,
        /// Dequantize an FP8 checkpoint's weights into `--dtype` on load, instead of keeping
        /// them as stored (E4M3 codes and block scales: a byte per weight).
        #[arg(long)]
        dequantize: bool,
        #[arg(long, default_value = "flex")]
        device: DeviceKind,
    },
    /// Evaluates a model on a JSONL task: multiple choice (lm-evaluation-harness scoring),
    /// perplexity over a text file, or generated answers checked exactly (pass@k); prints a
    /// JSON summary.
    Eval {
        /// Hugging Face-layout model directory.
        #[arg(long)]
        model: PathBuf,
        /// A LoRA adapter directory applied unmerged (its tokenizer_config.json is used when
        /// present).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The task: JSONL items for choice/generate, a text file for perplexity.
        #[arg(long)]
        task: PathBuf,
        /// choice, generate or perplexity.
        #[arg(long)]
        kind: String,
        /// Per-item results, JSONL.
        #[arg(long)]
        samples_out: Option<PathBuf>,
        /// Evaluate only the first N items.
        #[arg(long)]
        limit: Option<usize>,
        /// Sequences per forward pass (choice, perplexity), or decoding together (generate).
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// generate: pass@k for this k.
        #[arg(long, default_value_t = 1)]
        k: usize,
        /// generate: samples per item (default: k); more than k gives the unbiased estimate.
        #[arg(long)]
        samples: Option<usize>,
        /// generate: longest answer.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// perplexity: tokens per window (default: the model's context).
        #[arg(long)]
        max_len: Option<usize>,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Weights and activations in f32, bf16 or f16 (norms, router, softmax and logits stay
        /// f32).
        #[arg(long, default_value = "f32")]
        dtype: WeightDtype,
        /// Dequantize an FP8 checkpoint's weights into `--dtype` on load, instead of keeping
        /// them as stored (E4M3 codes and block scales: a byte per weight).
        #[arg(long)]
        dequantize: bool,
        #[arg(long, default_value = "flex")]
        device: DeviceKind,
    },
    /// Folds a LoRA adapter into its base (`W += s·B·A`) and writes a plain Hugging Face model.
    Merge {
        /// The base model directory.
        #[arg(long)]
        model: PathBuf,
        /// The adapter directory (PEFT layout).
        #[arg(long)]
        adapter: PathBuf,
        /// Directory to write.
        #[arg(long)]
        out: PathBuf,
        /// f32, or bf16 (written through `convert`).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Prints the token ids of a text, space-separated.
    Tokenize {
        /// tokenizer.json, or a directory holding one.
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        text: String,
        /// Tokenize as a prompt, as Hugging Face does with `add_special_tokens=True` (BOS first
        /// when the tokenizer_config.json beside the tokenizer says `add_bos_token`), as
        /// `generate --prompt` and the server do.
        #[arg(long)]
        add_special_tokens: bool,
    },
    /// Serves the model over the OpenAI API (`/v1/completions`, `/v1/chat/completions`,
    /// `/v1/models`, `/health`, `/metrics`) with continuous batching.
    Serve {
        /// Hugging Face-layout model directory (with tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// A LoRA adapter directory (PEFT layout) applied to the model, unmerged.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// 0 picks a free port (printed at start).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Sequences decoding together at most.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Sequences waiting for a slot at most; requests beyond answer 429.
        #[arg(long, default_value_t = 256)]
        max_queue: usize,
        /// Largest `n` (choices per request).
        #[arg(long, default_value_t = 8)]
        max_n: usize,
        /// Tokens per sequence, prompt plus output (default: the model's context).
        #[arg(long)]
        context: Option<usize>,
        /// The model name requests use (default: the model directory's name).
        #[arg(long)]
        served_model_name: Option<String>,
        /// Decode with MTP speculative decoding (drafts verified by the main model; output
        /// distributed as without it), one sequence at a time instead of batching.
        #[arg(long)]
        speculative: bool,
        /// Weights and activations in f32, bf16 or f16 (norms, router, softmax and logits stay
        /// f32).
        #[arg(long, default_value = "f32")]
        dtype: WeightDtype,
        /// Dequantize an FP8 checkpoint's weights into `--dtype` on load, instead of keeping
        /// them as stored (E4M3 codes and block scales: a byte per weight).
        #[arg(long)]
        dequantize: bool,
        /// Backend: flex (CPU), wgpu or cuda.
        #[arg(long, default_value = "flex")]
        device: DeviceKind,
    },
    /// Prints parameter counts and memory needs of a model or preset as `key: value` lines.
    Info {
        /// Hugging Face-layout model directory.
        #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
        model: Option<PathBuf>,
        /// A named preset: v3-671b, v2-lite-16b, tiny, small.
        #[arg(long)]
        preset: Option<String>,
        /// Plan the memory of a run per rank instead (needs --task, --batch, --seq); the last
        /// line is `total_bytes: N`.
        #[command(flatten)]
        plan: PlanArgs,
    },
}

/// `deepseek info --plan`: the run whose memory is planned ([`MemoryPlan`]).
#[derive(clap::Args)]
struct PlanArgs {
    /// Print the per-rank memory plan.
    #[arg(long)]
    plan: bool,
    /// infer, train (full, AdamW) or lora (rank --lora-rank on the attention projections).
    #[arg(long, requires = "plan")]
    task: Option<String>,
    /// Weights (and activations) in f32, bf16 or f16.
    #[arg(long, default_value = "f32", requires = "plan")]
    dtype: WeightDtype,
    /// Sequences per rank (a micro-batch in training).
    #[arg(long, requires = "plan")]
    batch: Option<usize>,
    /// Tokens per sequence.
    #[arg(long, requires = "plan")]
    seq: Option<usize>,
    /// Ranks (devices) in all.
    #[arg(long, default_value_t = 1, requires = "plan")]
    ranks: usize,
    /// Ranks sharing one copy of the routed experts (divides the ranks of a pipeline stage).
    #[arg(long, default_value_t = 1, requires = "plan")]
    expert_parallel: usize,
    /// Pipeline stages (divides --ranks): the rank planned is the heaviest stage's.
    #[arg(long, default_value_t = 1, requires = "plan")]
    pipeline_parallel: usize,
    /// Recompute each block in the backward pass (keeps only block inputs).
    #[arg(long, requires = "plan")]
    checkpoint_activations: bool,
    /// Shard AdamW state and master weights over the ranks (ZeRO stage 1).
    #[arg(long, requires = "plan")]
    zero1: bool,
    /// LoRA rank (task lora).
    #[arg(long, default_value_t = 16, requires = "plan")]
    lora_rank: usize,
    /// The blocks' projections FP8-resident (an FP8 checkpoint loaded without --dequantize):
    /// a byte per weight plus block scales; the rest in --dtype. Task infer only.
    #[arg(long, requires = "plan")]
    fp8: bool,
    /// Memory per device in GiB: adds a `fits: yes|no` line.
    #[arg(long, requires = "plan")]
    memory: Option<f64>,
}

impl PlanArgs {
    fn request(&self) -> Result<PlanRequest> {
        let task: PlanTask = match &self.task {
            Some(t) => t.parse()?,
            None => bail!("--plan needs --task infer, train or lora"),
        };
        let (Some(batch), Some(seq)) = (self.batch, self.seq) else {
            bail!("--plan needs the run's size: --batch (sequences per rank) and --seq (tokens)");
        };
        if self.memory.is_some_and(|m| !(m > 0.0 && m.is_finite())) {
            bail!("--memory is a positive number of GiB");
        }
        Ok(PlanRequest {
            dtype: self.dtype,
            ranks: self.ranks,
            expert_parallel: self.expert_parallel,
            pipeline_parallel: self.pipeline_parallel,
            checkpoint_activations: self.checkpoint_activations,
            zero1: self.zero1,
            lora_rank: self.lora_rank,
            fp8: self.fp8,
            ..PlanRequest::new(task, batch, seq)
        })
    }
}

/// The plan as `key: value` lines, `total_bytes: N` last.
fn plan_lines(cfg: &DeepSeekConfig, args: &PlanArgs) -> Result<String> {
    let request = args.request()?;
    let plan = MemoryPlan::new(cfg, &request)?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut out = format!(
        "task: {} (per rank: batch {} x seq {}; {} ranks, expert-parallel {}, pipeline-parallel {}, dtype {}{}{}{})\n",
        request.task,
        request.batch,
        request.seq,
        request.ranks,
        request.expert_parallel,
        request.pipeline_parallel,
        request.dtype,
        if request.fp8 { ", FP8-resident projections" } else { "" },
        if request.checkpoint_activations { ", activation checkpointing" } else { "" },
        if request.zero1 { ", ZeRO-1" } else { "" },
    );
    for (key, bytes) in [
        ("weights_bytes", plan.weights),
        ("gradients_bytes", plan.gradients),
        ("optimizer_bytes", plan.optimizer),
        ("activations_bytes", plan.activations),
        ("kv_cache_bytes", plan.kv_cache),
    ] {
        out += &format!("{key}: {bytes} ({:.2} GiB)\n", gib(bytes));
    }
    if let Some(memory) = args.memory {
        let fits = plan.total() as f64 <= memory * (1u64 << 30) as f64;
        out += &format!(
            "fits: {} ({:.2} of {memory} GiB)\n",
            if fits { "yes" } else { "no" },
            gib(plan.total())
        );
    }
    out += &format!("total_bytes: {}\n", plan.total());
    Ok(out)
}

/// How tokens are chosen, shared by `generate` and `chat`.
#[derive(clap::Args, Clone, Copy)]
struct SamplingArgs {
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens reaching this probability, in (0, 1].
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only this many most likely tokens (at least 1).
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn decoding(&self) -> Result<Decoding> {
        let Self { temperature, top_p, top_k, seed } = *self;
        Decoding::new(temperature, top_k, top_p, seed)
    }
}

/// A command that runs a model, carried to the backend `--device` names by the one backend
/// switch ([`run_on`]).
// One value per process: the size of the larger variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum OnDevice {
    Logits {
        model: PathBuf,
        input: PathBuf,
        output: PathBuf,
        allow_unused: bool,
        adapter: Option<PathBuf>,
    },
    Chat {
        model: PathBuf,
        adapter: Option<PathBuf>,
        tok: TextTokenizer,
        template: ChatTemplate,
        system: Option<String>,
        cfg: GenerateConfig,
    },
    Generate(GenerateJob),
    Bench(BenchJob),
    Serve {
        model: PathBuf,
        adapter: Option<PathBuf>,
        options: ServeOptions,
    },
    Eval(EvalJob),
}

/// What `deepseek bench` runs.
struct BenchJob {
    /// A model directory, or else a preset with random weights.
    model: Option<PathBuf>,
    preset: Option<String>,
    /// Raise the preset's context to this many tokens.
    context: Option<usize>,
    prompt_tokens: usize,
    new_tokens: usize,
    path: AttentionPath,
    repeats: usize,
    device: DeviceKind,
    adapter: Option<PathBuf>,
    bandwidth: bool,
}

/// What `deepseek generate` runs.
struct GenerateJob {
    model: PathBuf,
    adapter: Option<PathBuf>,
    prompt: Vec<i64>,
    cfg: GenerateConfig,
    print_ids: bool,
    speculative: bool,
    /// Set for text prompts: the output streams as text.
    tok: Option<TextTokenizer>,
    /// Stop strings (text prompts only).
    stop: Vec<String>,
}

/// A command and how its model is held, carried to the backend by [`run_on`].
struct Job {
    task: OnDevice,
    held: LoadOptions,
}

/// Weights in `dtype`; an FP8 checkpoint's kept as codes unless `dequantize`.
fn held(dtype: WeightDtype, dequantize: bool) -> LoadOptions {
    LoadOptions::default().with_dtype(dtype).with_dequantize_fp8(dequantize)
}

impl BackendTask for Job {
    type Output = Result<()>;

    fn run<B: Backend>(self, devices: Vec<B::Device>) -> Result<()> {
        let dev = &devices[0];
        let held = self.held;
        match self.task {
            OnDevice::Logits { model, input, output, allow_unused, adapter } => {
                let options = LoadOptions { allow_unused, ..held };
                logits::<B>(&model, adapter.as_deref(), &input, &output, dev, options)
            }
            OnDevice::Chat { model, adapter, tok, template, system, cfg } => {
                let model = load::<B>(&model, adapter.as_deref(), dev, held)?;
                chat_cmd::<B>(model, &tok, &template, system, cfg, dev)
            }
            OnDevice::Generate(job) => generate_cmd::<B>(job, dev, held),
            OnDevice::Serve { model, adapter, options } => {
                let pipeline = Pipeline::<B>::load_with(&model, adapter.as_deref(), held, dev)?;
                serve(pipeline, options)
            }
            OnDevice::Bench(job) => bench_cmd::<B>(job, dev, held),
            OnDevice::Eval(job) => eval_cmd::<B>(job, dev, held),
        }
    }
}

/// Runs `task` on `device`'s default device, its model held as `held` says.
fn on_device(device: DeviceKind, held: LoadOptions, task: OnDevice) -> Result<()> {
    run_on(device, &[], Job { task, held })?
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Convert { model, out, dtype, shard_mib } => {
            let report =
                deepseek_core::checkpoint::convert::convert(&model, &out, dtype, shard_mib << 20)?;
            println!("tensors: {}", report.tensors);
            println!("converted: {}", report.converted);
            println!("shards: {}", report.shards);
            println!("bytes: {}", report.bytes);
            Ok(())
        }
        Command::Logits {
            model,
            input,
            output,
            device,
            dtype,
            dequantize,
            allow_unused,
            adapter,
        } => on_device(
            device,
            held(dtype, dequantize),
            OnDevice::Logits { model, input, output, allow_unused, adapter },
        ),
        Command::Merge { model, adapter, out, dtype } => merge_cmd(&model, &adapter, &out, &dtype),
        Command::Eval {
            model,
            adapter,
            task,
            kind,
            samples_out,
            limit,
            batch,
            k,
            samples,
            max_new_tokens,
            max_len,
            sampling,
            device,
            dtype,
            dequantize,
        } => {
            let kind = match kind.as_str() {
                "choice" => EvalKind::Choice,
                "generate" => EvalKind::Generate,
                "perplexity" => EvalKind::Perplexity,
                other => bail!("unknown --kind `{other}`: choice, generate or perplexity"),
            };
            let samples = samples.unwrap_or(k);
            if k == 0 || samples < k {
                bail!("--k must be at least 1 and --samples at least --k (got k {k}, samples {samples})");
            }
            if batch == 0 || limit == Some(0) || max_len.is_some_and(|m| m < 2) {
                bail!("--batch and --limit must be at least 1, --max-len at least 2");
            }
            let decoding = sampling.decoding()?;
            if samples > 1 && decoding == Decoding::Greedy {
                bail!("--samples {samples} with greedy decoding gives {samples} copies of one answer: set --temperature");
            }
            on_device(
                device,
                held(dtype, dequantize),
                OnDevice::Eval(EvalJob {
                    model,
                    adapter,
                    task,
                    kind,
                    samples_out,
                    limit,
                    batch,
                    k,
                    samples,
                    max_new_tokens,
                    max_len,
                    decoding,
                }),
            )
        }
        Command::Chat {
            model,
            tokenizer,
            tokenizer_config,
            system,
            adapter,
            max_new_tokens,
            sampling,
            device,
            dtype,
            dequantize,
        } => {
            // An adapter's own template is the one it was trained with.
            let tokenizer_config = tokenizer_config.or_else(|| {
                adapter.as_ref().map(|a| a.join("tokenizer_config.json")).filter(|p| p.is_file())
            });
            let tok = TextTokenizer::from_file(
                &tokenizer.unwrap_or_else(|| model.join("tokenizer.json")),
            )?;
            let template = ChatTemplate::from_tokenizer_config(
                &tokenizer_config.unwrap_or_else(|| model.join("tokenizer_config.json")),
            )?;
            let cfg = GenerateConfig {
                max_new_tokens,
                decoding: sampling.decoding()?,
                eos_token_id: None,
                stop_sequences: vec![],
            };
            on_device(
                device,
                held(dtype, dequantize),
                OnDevice::Chat { model, adapter, tok, template, system, cfg },
            )
        }
        Command::Tokenize { tokenizer, text, add_special_tokens } => {
            let tok = TextTokenizer::from_file(&tokenizer)?;
            let ids: Vec<i64> = if add_special_tokens {
                let dir = if tokenizer.is_dir() {
                    tokenizer.clone()
                } else {
                    tokenizer.with_file_name("")
                };
                encode_plain(&tok, prompt_bos(&dir, None, &tok)?, &text)?
            } else {
                tok.encode(&text)?.into_iter().map(i64::from).collect()
            };
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            println!("{}", ids.join(" "));
            Ok(())
        }
        Command::Serve {
            model,
            adapter,
            host,
            port,
            max_batch,
            max_queue,
            max_n,
            context,
            served_model_name,
            speculative,
            device,
            dtype,
            dequantize,
        } => {
            let model_name = match served_model_name {
                Some(name) => name,
                None => std::fs::canonicalize(&model)
                    .with_context(|| format!("no model directory {}", model.display()))?
                    .file_name()
                    .map_or_else(|| "deepseek".into(), |n| n.to_string_lossy().into_owned()),
            };
            let options = ServeOptions {
                host,
                port,
                max_batch,
                max_queue,
                max_n,
                model_name,
                context,
                speculative,
            };
            on_device(device, held(dtype, dequantize), OnDevice::Serve { model, adapter, options })
        }
        Command::Generate {
            model,
            prompt_ids,
            prompt,
            tokenizer,
            adapter,
            max_new_tokens,
            sampling,
            device,
            dtype,
            dequantize,
            print_ids,
            stop,
            speculative,
        } => {
            let text = match prompt {
                Some(text) => {
                    let path = tokenizer.unwrap_or_else(|| model.join("tokenizer.json"));
                    let tok = TextTokenizer::from_file(&path).context("text prompts need the model's tokenizer (pass --tokenizer or --prompt-ids)")?;
                    Some((tok, text))
                }
                None => None,
            };
            let prompt_ids = match (&text, prompt_ids) {
                (Some((tok, text)), _) => {
                    encode_plain(tok, prompt_bos(&model, adapter.as_deref(), tok)?, text)?
                }
                (None, Some(ids)) => ids,
                (None, None) => unreachable!("clap requires one"),
            };
            let decoding = sampling.decoding()?;
            let cfg = GenerateConfig {
                max_new_tokens,
                decoding,
                eos_token_id: None,
                stop_sequences: vec![],
            };
            let tok = text.map(|(tok, _)| tok);
            if !stop.is_empty() && (tok.is_none() || speculative) {
                bail!("--stop works on text: use it with --prompt (and without --speculative)");
            }
            on_device(
                device,
                held(dtype, dequantize),
                OnDevice::Generate(GenerateJob {
                    model,
                    adapter,
                    prompt: prompt_ids,
                    cfg,
                    print_ids,
                    speculative,
                    tok,
                    stop,
                }),
            )
        }
        Command::Bench {
            model,
            preset,
            prompt_tokens,
            new_tokens,
            path,
            context,
            repeats,
            device,
            dtype,
            dequantize,
            adapter,
            bandwidth,
        } => {
            let path = match path.as_str() {
                "absorbed" => AttentionPath::Absorbed,
                "naive" => AttentionPath::Naive,
                other => bail!("unknown --path `{other}`: absorbed or naive"),
            };
            if prompt_tokens == 0 {
                bail!("--prompt-tokens must be at least 1");
            }
            on_device(
                device,
                held(dtype, dequantize),
                OnDevice::Bench(BenchJob {
                    model,
                    preset,
                    context,
                    prompt_tokens,
                    new_tokens,
                    path,
                    repeats,
                    device,
                    adapter,
                    bandwidth,
                }),
            )
        }
        Command::Info { model, preset, plan } => {
            let cfg = match (model, preset) {
                (Some(dir), _) => DeepSeekConfig::from_hf_file(&dir)
                    .with_context(|| format!("loading {}", dir.display()))?,
                (None, Some(name)) => DeepSeekConfig::preset(&name)?,
                (None, None) => unreachable!("clap requires one"),
            };
            if plan.plan {
                print!("{}", plan_lines(&cfg, &plan)?);
            } else {
                print!("{}", info(&cfg));
            }
            Ok(())
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum EvalKind {
    Choice,
    Generate,
    Perplexity,
}

/// What `deepseek eval` runs.
struct EvalJob {
    model: PathBuf,
    adapter: Option<PathBuf>,
    task: PathBuf,
    kind: EvalKind,
    samples_out: Option<PathBuf>,
    limit: Option<usize>,
    batch: usize,
    k: usize,
    samples: usize,
    max_new_tokens: usize,
    max_len: Option<usize>,
    decoding: Decoding,
}

/// The BOS id plain prompts start with: from the adapter's or the model's `tokenizer_config.json`
/// when it says `add_bos_token` (none without a config).
fn prompt_bos(model: &Path, adapter: Option<&Path>, tok: &TextTokenizer) -> Result<Option<u32>> {
    let file = tokenizer_config_file(model, adapter);
    if !file.is_file() {
        return Ok(None);
    }
    Ok(read_tokenizer_config(&file, tok)?.1)
}

/// The chat template and the BOS text of plain prompts, from the adapter's or the model's
/// `tokenizer_config.json` (none: no template, no BOS).
fn eval_prompting(model: &Path, adapter: Option<&Path>) -> Result<(Option<ChatTemplate>, String)> {
    let file = tokenizer_config_file(model, adapter);
    if !file.is_file() {
        return Ok((None, String::new()));
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file)?)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let template = match config.get("chat_template") {
        Some(_) => Some(ChatTemplate::from_tokenizer_config(&file)?),
        None => None,
    };
    let add_bos = config.get("add_bos_token").and_then(serde_json::Value::as_bool).unwrap_or(false);
    let bos = deepseek_infer::chat::token_text(config.get("bos_token")).unwrap_or_default();
    Ok((template, if add_bos { bos } else { String::new() }))
}

fn eval_cmd<B: Backend>(job: EvalJob, device: &B::Device, held: LoadOptions) -> Result<()> {
    use deepseek_infer::{checker, eval};
    let started = std::time::Instant::now();
    let model = load::<B>(&job.model, job.adapter.as_deref(), device, held)?;
    let tok = TextTokenizer::from_file(&job.model.join("tokenizer.json"))?;
    tok.check_vocab(model.config.vocab_size)?;
    let (template, bos) = eval_prompting(&job.model, job.adapter.as_deref())?;
    let bar = |n: usize, what: &str| {
        let bar = indicatif::ProgressBar::new(n as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed_precise}}<{{eta_precise}}]"
            ))
            .expect("valid template"),
        );
        bar
    };
    let mut samples_out: Vec<serde_json::Value> = Vec::new();
    let limit = |n: usize| job.limit.map_or(n, |l| l.min(n));
    let summary = match job.kind {
        EvalKind::Choice => {
            let mut items =
                eval::read_items(&job.task, |o| eval::parse_choice(o, template.as_ref(), &bos))?;
            items.truncate(limit(items.len()));
            let requests: usize = items.iter().map(|i| i.choices.len()).sum();
            let pb = bar(requests, "requests");
            let scores =
                eval::score_choices(&model, &tok, &items, job.batch, device, |n| pb.inc(n as u64))?;
            pb.finish_and_clear();
            let right = scores.iter().filter(|s| s.pred == s.gold).count();
            let right_norm = scores.iter().filter(|s| s.pred_norm == s.gold).count();
            for s in &scores {
                samples_out.push(serde_json::json!({"loglikelihoods": s.loglikelihoods, "pred": s.pred, "pred_norm": s.pred_norm, "gold": s.gold}));
            }
            let n = scores.len();
            serde_json::json!({
                "kind": "choice", "items": n,
                "acc": right as f64 / n as f64, "acc_ci95": checker::wilson_interval(right, n),
                "acc_norm": right_norm as f64 / n as f64, "acc_norm_ci95": checker::wilson_interval(right_norm, n),
                "items_per_s": n as f64 / started.elapsed().as_secs_f64(),
            })
        }
        EvalKind::Perplexity => {
            let text = std::fs::read_to_string(&job.task)
                .with_context(|| format!("cannot read {}", job.task.display()))?;
            let mut ids = tok.encode(&format!("{bos}{text}"))?;
            if let Some(l) = job.limit {
                ids.truncate(l + 1);
            }
            let window = job.max_len.unwrap_or(model.config.max_position_embeddings);
            let pb = bar(ids.len().div_ceil(window.max(2)), "windows");
            let p = eval::perplexity(&model, &ids, text.len(), window, job.batch, device, |n| {
                pb.inc(n as u64)
            })?;
            pb.finish_and_clear();
            serde_json::json!({
                "kind": "perplexity", "tokens": p.tokens, "bytes": p.bytes, "nll": p.nll,
                "token_perplexity": p.token_perplexity(), "bits_per_byte": p.bits_per_byte(),
                "tokens_per_s": p.tokens as f64 / started.elapsed().as_secs_f64(),
            })
        }
        EvalKind::Generate => {
            let mut items =
                eval::read_items(&job.task, |o| eval::parse_generate(o, template.as_ref(), &bos))?;
            items.truncate(limit(items.len()));
            let eos = template.as_ref().and_then(|t| t.end_of_turn(&tok, None));
            let pb = bar(items.len() * job.samples, "samples");
            // Every (item, sample) pair is one request; `--batch` of them decode together.
            let mut requests = Vec::with_capacity(items.len() * job.samples);
            for item in &items {
                let prompt: Vec<i64> =
                    tok.encode(&item.prompt)?.into_iter().map(i64::from).collect();
                for s in 0..job.samples {
                    requests.push(Request {
                        prompt: prompt.clone(),
                        max_new_tokens: job.max_new_tokens,
                        decoding: job.decoding.for_sample(s),
                        stop_tokens: eos
                            .or(model.config.eos_token_id.map(i64::from))
                            .into_iter()
                            .collect(),
                        stop_sequences: vec![],
                    });
                }
            }
            let outputs = generate_all(&model, requests, job.batch, device, &mut |_, event| {
                if event.finish.is_some() {
                    pb.inc(1);
                }
                Ok(true)
            })?;
            let mut outputs = outputs.into_iter();
            let (mut solved, mut pass_k, mut pass_1) = (0, 0.0, 0.0);
            for item in &items {
                let (mut texts, mut correct) = (Vec::new(), Vec::new());
                for _ in 0..job.samples {
                    let out = outputs.next().expect("one output per request").tokens;
                    let text = tok.decode(&out.iter().map(|&t| t as u32).collect::<Vec<_>>())?;
                    correct.push(checker::is_correct(&text, &item.answer));
                    texts.push(text);
                }
                let c = correct.iter().filter(|&&x| x).count();
                pass_k += checker::pass_at_k(job.samples, c, job.k);
                pass_1 += checker::pass_at_k(job.samples, c, 1);
                solved += (correct.first() == Some(&true)) as usize;
                samples_out.push(serde_json::json!({"prompt": item.prompt, "answer": item.answer, "completions": texts, "correct": correct}));
            }
            pb.finish_and_clear();
            let n = items.len();
            serde_json::json!({
                "kind": "generate", "items": n, "samples_per_item": job.samples, "k": job.k,
                "pass@1": pass_1 / n as f64, format!("pass@{}", job.k): pass_k / n as f64,
                "first_sample_accuracy": solved as f64 / n as f64,
                "first_sample_ci95": checker::wilson_interval(solved, n),
                "items_per_s": n as f64 / started.elapsed().as_secs_f64(),
            })
        }
    };
    if let Some(path) = &job.samples_out {
        let lines: Vec<String> = samples_out.iter().map(|v| v.to_string()).collect();
        let text = if lines.is_empty() { String::new() } else { lines.join("\n") + "\n" };
        deepseek_core::checkpoint::write_atomic(path, text.as_bytes())?;
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// The model of `dir`, with the LoRA adapter in `adapter` applied unmerged.
fn load<B: Backend>(
    dir: &Path,
    adapter: Option<&Path>,
    device: &B::Device,
    options: LoadOptions,
) -> Result<deepseek_core::DeepSeekModel<B>> {
    let model = load_model::<B>(dir, device, options)
        .with_context(|| format!("loading model from {}", dir.display()))?;
    match adapter {
        Some(a) => deepseek_core::adapter::load_adapter(model, a)
            .with_context(|| format!("applying the adapter in {}", a.display())),
        None => Ok(model),
    }
}

/// `deepseek merge`: the base with its adapter folded in, as a plain HF model directory, with
/// the tokenizer files (the adapter's template when it has one).
fn merge_cmd(base: &Path, adapter: &Path, out: &Path, dtype: &str) -> Result<()> {
    let to_bf16 = match dtype {
        "f32" => false,
        "bf16" => true,
        other => bail!("--dtype {other}: choose f32 or bf16"),
    };
    let listed = out.exists().then(|| std::fs::read_dir(out)).transpose();
    let listed = listed.with_context(|| format!("cannot read {}", out.display()))?;
    if listed.is_some_and(|mut entries| entries.next().is_some()) {
        bail!("{} exists and is not empty: choose another --out", out.display());
    }
    let device = Default::default();
    // FP8 bases are dequantized on load: the deltas are merged in f32, never rounded to E4M3.
    let options = LoadOptions::default().with_dequantize_fp8(true);
    let model =
        load::<burn::backend::Flex>(base, Some(adapter), &device, options)?.merge_adapters();
    let staging = if to_bf16 { out.with_extension("f32.partial") } else { out.to_path_buf() };
    deepseek_core::save_model(&model, &staging)?;
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let from = [adapter.join(file), base.join(file)].into_iter().find(|p| p.is_file());
        if let Some(from) = from {
            std::fs::copy(&from, staging.join(file))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    if to_bf16 {
        use deepseek_core::checkpoint::convert::{convert, ConvertTo};
        convert(&staging, out, ConvertTo::Bf16, 4096 << 20)?;
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            if staging.join(file).is_file() {
                std::fs::copy(staging.join(file), out.join(file))?;
            }
        }
        std::fs::remove_dir_all(&staging)?;
    }
    println!("{}", out.display());
    Ok(())
}

fn bench_cmd<B: Backend>(job: BenchJob, dev: &B::Device, held: LoadOptions) -> Result<()> {
    let dtype = held.dtype;
    let BenchJob {
        model,
        preset,
        context,
        prompt_tokens,
        new_tokens,
        path,
        repeats,
        device,
        adapter,
        bandwidth,
    } = job;
    if adapter.is_some() && model.is_none() {
        bail!("--adapter applies to a --model directory, not a preset");
    }
    let model = match (&model, &preset) {
        (Some(dir), _) => load::<B>(dir, adapter.as_deref(), dev, held)?,
        (None, Some(name)) => {
            let mut cfg = DeepSeekConfig::preset(name)?;
            if let Some(c) = context {
                cfg.max_position_embeddings = cfg.max_position_embeddings.max(c);
            }
            dtype.check_supported::<B>(dev)?;
            cfg.init::<B>(dev).cast(dtype)
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let r = deepseek_infer::bench::run(&model, prompt_tokens, new_tokens, path, repeats, dev)?;
    println!("device: {device}");
    println!("dtype: {dtype}");
    println!("decode_path: {path:?}");
    println!("prompt_tokens: {}", r.prompt_tokens);
    println!("new_tokens: {}", r.new_tokens);
    println!("prefill_tokens_per_s: {:.1}", r.prefill_tokens_per_s);
    println!("decode_tokens_per_s: {:.1}", r.decode_tokens_per_s);
    println!("kv_bytes_per_token: {} (measured from the cache buffers)", r.kv_bytes_per_token);
    // Norms, router and correction biases stay f32 whatever the dtype; they are a few KB.
    let read = model.config.decode_read_params() * dtype.size() as u64;
    let rate = read as f64 * r.decode_tokens_per_s;
    println!("weight_bytes_per_token: {read} (the active weights a decoded token reads)");
    println!("decode_read_gb_per_s: {:.1}", rate / 1e9);
    if bandwidth {
        let peak = deepseek_infer::bench::read_bandwidth();
        println!("memory_read_gb_per_s: {:.1} (1 GiB sum on all threads)", peak / 1e9);
        println!("bandwidth_fraction: {:.2}", rate / peak);
    }
    Ok(())
}

fn logits<B: Backend>(
    model_dir: &Path,
    adapter: Option<&Path>,
    input: &Path,
    output: &Path,
    device: &B::Device,
    options: LoadOptions,
) -> Result<()> {
    let model = load::<B>(model_dir, adapter, device, options)?;
    let (ids, [batch, seq]) = io::read_ids(input, "input_ids")?;
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), device);
    let forward = || model.try_forward(ids, ForwardOptions::default());
    let logits = deepseek_core::pool::on_pool::<B, _>(forward)?.logits;
    let shape = logits.dims().to_vec();
    let values: Vec<f32> =
        logits.into_data().convert::<f32>().into_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    io::write_f32(output, &[("logits", &values, shape)])
}

fn generate_cmd<B: Backend>(job: GenerateJob, device: &B::Device, held: LoadOptions) -> Result<()> {
    let GenerateJob {
        model: model_dir,
        adapter,
        prompt,
        mut cfg,
        print_ids,
        speculative,
        tok,
        stop,
    } = job;
    let tokenizer = tok.as_ref();
    let model = load::<B>(&model_dir, adapter.as_deref(), device, held)?;
    if let Some(tok) = tokenizer {
        tok.check_vocab(model.config.vocab_size)?;
    }
    cfg.eos_token_id = model.config.eos_token_id.map(i64::from);
    let start = std::time::Instant::now();
    let out = if speculative {
        let spec = speculative::speculative(
            &model,
            &prompt,
            cfg.max_new_tokens,
            cfg.eos_token_id,
            cfg.decoding,
            device,
        )?;
        eprintln!(
            "speculative: {} of {} drafts accepted ({:.0}%), {} main-model steps",
            spec.accepted,
            spec.drafted,
            100.0 * spec.acceptance(),
            spec.main_steps
        );
        if let Some(tok) = tokenizer {
            let ids: Vec<u32> = spec.tokens.iter().map(|&t| t as u32).collect();
            println!("{}", tok.decode(&ids)?);
        }
        spec.tokens
    } else if let Some(tok) = tokenizer {
        // Stream text as it is produced.
        let mut stream = IncrementalDecoder::new(tok);
        let mut stdout = std::io::stdout();
        let mut text = String::new();
        let out = generate_streaming(&model, &[prompt], &cfg, device, &mut |_, id| {
            let piece =
                stream.push(u32::try_from(id).expect("ids are checked against the vocabulary"))?;
            write!(stdout, "{piece}")?;
            stdout.flush()?;
            text.push_str(&piece);
            Ok(!stop.iter().any(|s| text.contains(s.as_str())))
        })?
        .remove(0);
        println!();
        out
    } else {
        generate(&model, &[prompt], &cfg, device)?.remove(0)
    };
    let secs = start.elapsed().as_secs_f64();
    eprintln!("{} tokens in {:.2} s ({:.1} tokens/s)", out.len(), secs, out.len() as f64 / secs);
    let ids: Vec<String> = out.iter().map(i64::to_string).collect();
    if print_ids || tokenizer.is_none() {
        println!("{}", ids.join(" "));
    }
    Ok(())
}

fn chat_cmd<B: Backend>(
    model: deepseek_core::DeepSeekModel<B>,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    system: Option<String>,
    mut cfg: GenerateConfig,
    device: &B::Device,
) -> Result<()> {
    tok.check_vocab(model.config.vocab_size)?;
    // The turn ends at the template's EOS token, else at the model's.
    cfg.eos_token_id = template.end_of_turn(tok, model.config.eos_token_id);
    let mut messages: Vec<Message> = system.iter().map(|s| Message::new("system", s)).collect();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    eprintln!("chat: one message per line; /exit or end of input quits");
    for line in stdin.lines() {
        let line = line?;
        let text = line.trim();
        if text == "/exit" {
            break;
        }
        if text.is_empty() {
            continue;
        }
        messages.push(Message::new("user", text));
        let prompt: Vec<i64> =
            tok.encode(&template.render(&messages, true)?)?.into_iter().map(i64::from).collect();
        let mut stream = IncrementalDecoder::new(tok);
        let mut reply = String::new();
        generate_streaming(&model, &[prompt], &cfg, device, &mut |_, id| {
            if Some(id) == cfg.eos_token_id {
                return Ok(true);
            }
            let piece = stream.push(id as u32)?;
            write!(stdout, "{piece}")?;
            stdout.flush()?;
            reply.push_str(&piece);
            Ok(true)
        })?;
        writeln!(stdout)?;
        messages.push(Message::new("assistant", &reply));
    }
    Ok(())
}

fn info(cfg: &DeepSeekConfig) -> String {
    let p = cfg.param_count();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let lines = [
        ("layers", cfg.num_hidden_layers.to_string()),
        ("hidden_size", cfg.hidden_size.to_string()),
        ("attention_heads", cfg.num_attention_heads.to_string()),
        (
            "routed_experts",
            format!(
                "{} (top-{}, {} groups keep {})",
                cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
            ),
        ),
        ("shared_experts", cfg.n_shared_experts.to_string()),
        ("mtp_modules", cfg.num_nextn_predict_layers.to_string()),
        ("total_params", format!("{} ({:.1}B)", p.total, p.total as f64 / 1e9)),
        ("active_params", format!("{} ({:.1}B)", p.active, p.active as f64 / 1e9)),
        ("mtp_params", format!("{} ({:.1}B)", p.mtp, p.mtp as f64 / 1e9)),
        (
            "kv_cache_bytes_per_token",
            format!("{} (latent cache, bf16, all layers)", cfg.kv_cache_bytes_per_token(2)),
        ),
        (
            "mha_cache_bytes_per_token",
            format!(
                "{} (plain multi-head cache, bf16, for comparison)",
                cfg.mha_cache_bytes_per_token(2)
            ),
        ),
        (
            "weights_bytes_bf16",
            format!("{} ({:.1} GiB)", cfg.weight_bytes_bf16(), gib(cfg.weight_bytes_bf16())),
        ),
        (
            "weights_bytes_fp8",
            format!(
                "{} ({:.1} GiB, E4M3 + 128x128 f32 scales)",
                cfg.weight_bytes_fp8(),
                gib(cfg.weight_bytes_fp8())
            ),
        ),
    ];
    lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}
