#![doc = include_str!("../README.md")]

pub mod bench;
pub mod chat;
pub mod generate;
pub mod io;
pub mod speculative;
pub mod tokenizer;
