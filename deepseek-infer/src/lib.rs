#![doc = include_str!("../README.md")]

pub mod bench;
pub mod chat;
pub mod checker;
pub mod engine;
pub mod eval;
pub mod generate;
pub mod io;
pub mod pipeline;
#[cfg(feature = "server")]
pub mod server;
pub mod speculative;
pub mod stop;
pub mod tokenizer;
