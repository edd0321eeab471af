//! A tour of the model on the CPU, with no downloads: load a Hugging Face-layout checkpoint,
//! run a forward pass with MTP, compare against the logits transformers produced for it, show
//! the routing, and size DeepSeek-V3 671B.
//!
//! `cargo run -p deepseek-examples --example demo`

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::{load_model, DeepSeekConfig, ForwardOptions, LoadOptions};
use safetensors::SafeTensors;

type B = Flex;

fn main() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/v3_yarn_qlora");
    let device = Default::default();
    println!("== Loading {}", dir.display());
    let model = load_model::<B>(&dir, &device, LoadOptions::default())
        .context("loading the demo checkpoint")?;
    let cfg = &model.config;
    println!(
        "   {} blocks ({} dense, {} MoE with {} routed experts top-{} in {} groups keeping {}), {} MTP module(s), YaRN factor {}",
        cfg.num_hidden_layers,
        cfg.first_k_dense_replace,
        cfg.num_hidden_layers - cfg.first_k_dense_replace,
        cfg.n_routed_experts,
        cfg.num_experts_per_tok,
        cfg.n_group,
        cfg.topk_group,
        cfg.num_nextn_predict_layers,
        cfg.rope.yarn.map_or(1.0, |y| y.factor),
    );

    // The checkpoint comes with the input ids and the logits transformers 5.23 computed.
    let bytes = std::fs::read(dir.join("reference.safetensors"))?;
    let reference = SafeTensors::deserialize(&bytes)?;
    let ids_view = reference.tensor("input_ids")?;
    let ids: Vec<i64> = ids_view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let [batch, seq] = [ids_view.shape()[0], ids_view.shape()[1]];
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [batch, seq]), &device);
    model.check_input(&input)?;

    let start = Instant::now();
    let out = model.forward_with(input, ForwardOptions { hidden_states: false, mtp: true });
    let logits: Vec<f32> = out.logits.clone().into_data().convert::<f32>().into_vec().unwrap();
    println!(
        "== Forward pass: batch {batch} x {seq} tokens in {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );

    let hf: Vec<f32> = reference
        .tensor("logits")?
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let diff = logits.iter().zip(&hf).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    println!("   max |logits - transformers logits| = {diff:.2e}");

    let argmax: Vec<i64> = out.logits.argmax(2).into_data().convert::<i64>().into_vec().unwrap();
    println!("   sequence 0 input ids:   {:?}", &ids[..seq]);
    println!("   next-token predictions: {:?}", &argmax[..seq]);
    if let Some(mtp) = out.mtp_logits.first() {
        let mtp_argmax: Vec<i64> =
            mtp.clone().argmax(2).into_data().convert::<i64>().into_vec().unwrap();
        println!("   MTP (token after next): {:?}", &mtp_argmax[..seq - 1]);
    }

    println!("== Routing (tokens per routed expert; MoE blocks, then MTP)");
    let moe_blocks =
        (0..cfg.num_hidden_layers + cfg.num_nextn_predict_layers).filter(|&l| cfg.is_moe_layer(l));
    for (l, routing) in moe_blocks.zip(&out.routing) {
        let name = if l < cfg.num_hidden_layers {
            format!("layer {l}")
        } else {
            format!("MTP {}", l - cfg.num_hidden_layers + 1)
        };
        let counts: Vec<i64> =
            routing.counts.clone().into_data().convert::<i64>().into_vec().unwrap();
        let mean = counts.iter().sum::<i64>() as f64 / counts.len() as f64;
        let max = *counts.iter().max().unwrap() as f64;
        println!("   {name:>8}: {counts:?}  MaxVio {:.2}", (max - mean) / mean);
    }

    let v3 = DeepSeekConfig::v3_671b();
    let p = v3.param_count();
    println!("== DeepSeek-V3 671B, computed from its config");
    println!("   total parameters:  {:.1}B", p.total as f64 / 1e9);
    println!("   active per token:  {:.1}B", p.active as f64 / 1e9);
    println!("   MTP module:        {:.1}B", p.mtp as f64 / 1e9);
    println!(
        "   KV cache per token: {} bytes latent (bf16) vs {} bytes for plain multi-head attention",
        v3.kv_cache_bytes_per_token(2),
        v3.mha_cache_bytes_per_token(2)
    );
    Ok(())
}
