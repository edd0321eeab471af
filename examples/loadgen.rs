//! A load generator for `deepseek serve`, and the model it is measured on.
//!
//! `loadgen make-model --out DIR [--preset small]` writes the preset with random weights (seeded)
//! in Hugging Face layout, with a word-level `tokenizer.json` covering the whole vocabulary (every
//! token decodes to text, so every token streams as a chunk).
//!
//! `loadgen run --url http://127.0.0.1:PORT [--streams 1,4,16,64] [--prompt-tokens 32]
//! [--max-tokens 64] [--requests-per-stream 2]` runs, for each concurrency C, a bounded number of
//! streamed greedy completions (C × requests-per-stream, at least 8) from C client threads with
//! token-id prompts, then stops. It prints one line per C: aggregate generated tokens/s (all
//! tokens over the wall time of the round), requests/s, and p50/p99 of the time to first token and
//! of the inter-token latency, and a JSON line per C for scripts.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes a random-weight preset with a word-level tokenizer.
    MakeModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "small")]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Runs the load and prints the figures.
    Run {
        #[arg(long)]
        url: String,
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        streams: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long, default_value_t = 2)]
        requests_per_stream: usize,
        /// The model name the server serves.
        #[arg(long, default_value = "bench")]
        model: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::MakeModel { out, preset, seed } => make_model(&out, &preset, seed),
        Cmd::Run { url, streams, prompt_tokens, max_tokens, requests_per_stream, model } => {
            for c in streams {
                if c == 0 {
                    bail!("--streams entries must be at least 1");
                }
                let requests = (c * requests_per_stream).max(8);
                let round = run_round(&url, &model, c, requests, prompt_tokens, max_tokens)?;
                round.print(c);
            }
            Ok(())
        }
    }
}

fn make_model(out: &std::path::Path, preset: &str, seed: u64) -> Result<()> {
    use burn::backend::Flex;
    use burn::tensor::backend::Backend;
    let cfg = deepseek_core::DeepSeekConfig::preset(preset)
        .with_context(|| format!("unknown preset {preset}"))?;
    Flex::seed(&Default::default(), seed);
    let model = cfg.init::<Flex>(&Default::default());
    model.materialize();
    deepseek_core::save_model(&model, out)?;
    let vocab: serde_json::Map<String, Value> =
        (0..cfg.vocab_size).map(|i| (format!("w{i}"), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
    });
    std::fs::write(out.join("tokenizer.json"), tokenizer.to_string())?;
    println!(
        "wrote {} ({preset}, seed {seed}, {} parameters)",
        out.display(),
        cfg.param_count().total
    );
    Ok(())
}

/// Latencies and counts of one round.
struct Round {
    wall: Duration,
    tokens: usize,
    requests: usize,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

impl Round {
    fn print(&self, streams: usize) {
        let secs = self.wall.as_secs_f64();
        let q = |v: &[f64], p: f64| percentile(v, p) * 1e3;
        println!(
            "streams {streams:>3}: {:>8.1} tokens/s aggregate, {:>5.2} requests/s, TTFT p50 {:>7.1} ms p99 {:>7.1} ms, inter-token p50 {:>6.1} ms p99 {:>6.1} ms ({} requests, {} tokens, {:.1} s)",
            self.tokens as f64 / secs,
            self.requests as f64 / secs,
            q(&self.ttft, 0.5),
            q(&self.ttft, 0.99),
            q(&self.itl, 0.5),
            q(&self.itl, 0.99),
            self.requests,
            self.tokens,
            secs
        );
        println!(
            "{}",
            json!({
                "streams": streams, "tokens_per_s": self.tokens as f64 / secs,
                "ttft_p50_ms": q(&self.ttft, 0.5), "ttft_p99_ms": q(&self.ttft, 0.99),
                "itl_p50_ms": q(&self.itl, 0.5), "itl_p99_ms": q(&self.itl, 0.99),
                "requests": self.requests, "tokens": self.tokens, "seconds": secs,
            })
        );
    }
}

/// Nearest-rank percentile (0 for no values).
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n => v[((p * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

fn run_round(
    url: &str,
    model: &str,
    streams: usize,
    requests: usize,
    prompt_tokens: usize,
    max_tokens: usize,
) -> Result<Round> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    let results: Vec<Result<Vec<Timing>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= requests {
                            return Ok(mine);
                        }
                        // Distinct prompts: ids from a per-request stride.
                        let prompt: Vec<usize> =
                            (0..prompt_tokens).map(|t| (7 + i * 31 + t * 13) % 1000 + 2).collect();
                        mine.push(one_request(url, model, &prompt, max_tokens)?);
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    let wall = start.elapsed();
    let mut round = Round { wall, tokens: 0, requests: 0, ttft: vec![], itl: vec![] };
    for r in results {
        for (ttft, gaps, tokens) in r? {
            round.ttft.push(ttft);
            round.itl.extend(gaps);
            round.tokens += tokens;
            round.requests += 1;
        }
    }
    Ok(round)
}

/// Of one request: seconds to the first chunk, seconds between chunks, tokens generated.
type Timing = (f64, Vec<f64>, usize);

/// One streamed completion.
fn one_request(url: &str, model: &str, prompt: &[usize], max_tokens: usize) -> Result<Timing> {
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let sent = Instant::now();
    let response = ureq::post(&format!("{url}/v1/completions"))
        .send_string(&body.to_string())
        .map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
    let mut last: Option<Instant> = None;
    let mut ttft = 0.0;
    let mut gaps = Vec::new();
    let mut tokens = 0;
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data)?;
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
            continue;
        }
        if chunk["choices"][0]["text"].as_str().is_none_or(str::is_empty) {
            continue; // the closing chunk with the finish reason
        }
        let now = Instant::now();
        match last {
            None => ttft = (now - sent).as_secs_f64(),
            Some(t) => gaps.push((now - t).as_secs_f64()),
        }
        last = Some(now);
    }
    Ok((ttft, gaps, tokens))
}
