//! Runnable examples; see `cargo run -p deepseek-examples --example NAME`.
