//! Writes a DeepSeek-V3-shaped model with random weights in Hugging Face layout, for memory and
//! speed measurements at a size where weights dominate (no downloads). The default shape is a
//! scaled-down V3: hidden 1024, 4 blocks (the first dense), 32 routed experts top-4 in 4 groups
//! keeping 2, one shared expert, q-LoRA 384, KV-LoRA 128, 16 heads, vocab 32000, one MTP
//! module: 296M parameters, 1.19 GB in f32.
//!
//! ```sh
//! cargo run --release -p deepseek-examples --example random_model -- --out runs/v3-294m [--seed 0] [--layers N] [--preset NAME]
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use deepseek_core::{save_model, DeepSeekConfig};

/// The default shape (see the module docs); fields not set are `small`'s, which takes V3's.
fn v3_shaped() -> DeepSeekConfig {
    DeepSeekConfig {
        vocab_size: 32000,
        hidden_size: 1024,
        num_hidden_layers: 4,
        first_k_dense_replace: 1,
        intermediate_size: 2816,
        moe_intermediate_size: 512,
        num_attention_heads: 16,
        q_lora_rank: Some(384),
        kv_lora_rank: 128,
        qk_nope_head_dim: 64,
        qk_rope_head_dim: 32,
        v_head_dim: 64,
        n_routed_experts: 32,
        n_shared_experts: 1,
        num_experts_per_tok: 4,
        n_group: 4,
        topk_group: 2,
        max_position_embeddings: 4096,
        ..DeepSeekConfig::small()
    }
}

fn main() -> Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut seed = 0u64;
    let mut cfg = v3_shaped();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => out = Some(value()?.into()),
            "--seed" => seed = value()?.parse().context("--seed takes an integer")?,
            "--layers" => {
                cfg.num_hidden_layers = value()?.parse().context("--layers takes an integer")?
            }
            "--preset" => cfg = DeepSeekConfig::preset(&value()?)?,
            other => bail!(
                "unknown option `{other}` (use --out DIR, --seed S, --layers N, --preset NAME)"
            ),
        }
    }
    let Some(out) = out else { bail!("--out DIR is required") };
    if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
        bail!("{} exists and is not empty", out.display());
    }
    cfg.validate()?;
    let p = cfg.param_count();
    let params = p.total + p.mtp;
    eprintln!(
        "{params} parameters ({:.2} GB in f32); writing {}",
        params as f64 * 4e-9,
        out.display()
    );
    Flex::seed(&Default::default(), seed);
    let model = cfg.init::<Flex>(&Default::default());
    save_model(&model, &out)?;
    println!("params: {params}");
    println!("out: {}", out.display());
    Ok(())
}
