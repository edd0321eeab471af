//! From a checkpoint directory to text with `deepseek_infer::pipeline::Pipeline`:
//! `cargo run --release -p deepseek-examples --example generate_text -- [MODEL_DIR] [PROMPT]`
//! (default: the quickstart's `runs/quickstart/hf`).
use burn::backend::Flex;
use deepseek_infer::chat::Message;
use deepseek_infer::pipeline::{GenerationOptions, Pipeline};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "runs/quickstart/hf".into());
    let prompt = args.next().unwrap_or_else(|| "12 + 7 =".into());
    let pipeline = Pipeline::<Flex>::load(&dir, &Default::default())?;
    let options = GenerationOptions { max_new_tokens: 24, ..Default::default() };
    println!("{prompt}{}", pipeline.generate(&prompt, &options)?);
    let reply = pipeline.chat(&[Message::new("user", &prompt)], &options)?;
    println!("chat: {reply}");
    Ok(())
}
