//! Training data: text from the built-in grammar or the user's files, tokenized with an HF
//! `tokenizer.json` (or a byte tokenizer, or a byte-level BPE trained here on the user's
//! files), stored once as little-endian `u32` token files that are memory-mapped (corpora larger
//! than memory work), and cut into fixed-length windows served in a seeded order.
//!
//! Data order is a pure function of `(seed, position)`: window `position` of the run is window
//! `perm_epoch[position mod N]` with `epoch = position / N` and `perm_epoch` a Fisher–Yates
//! shuffle drawn from `seed ^ epoch`. A checkpoint therefore only has to store the position.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::corpus::{Grammar, SplitMix64};
use crate::error::{Result, TrainError};

/// Where the training text comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CorpusSource {
    /// The built-in grammar ([`Grammar::builtin`]), byte tokens.
    Builtin,
    /// The user's text files.
    Files(Vec<PathBuf>),
}

/// How text becomes token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenizerSource {
    /// One token per byte (id = byte value), as a byte-level `tokenizer.json`.
    Bytes,
    /// A Hugging Face `tokenizer.json`.
    File(PathBuf),
    /// A byte-level BPE trained on the corpus with this vocabulary size.
    TrainBpe(usize),
}

/// Settings of [`prepare`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    pub corpus: CorpusSource,
    pub tokenizer: TokenizerSource,
    /// Built-in corpus: bytes of training text (validation gets a twentieth of it, min 64 KiB).
    pub builtin_bytes: usize,
    /// User files: the fraction of tokens held out for validation (taken from the end).
    pub val_fraction: f64,
    /// Seed of the built-in text.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            corpus: CorpusSource::Builtin,
            tokenizer: TokenizerSource::Bytes,
            builtin_bytes: 4 << 20,
            val_fraction: 0.05,
            seed: 0,
        }
    }
}

/// What [`prepare`] leaves in its directory (`meta.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataMeta {
    pub config: DataConfig,
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// Largest id + 1 over both splits.
    pub vocab_used: u32,
    /// Vocabulary size of the tokenizer.
    pub tokenizer_vocab: usize,
    /// Entropy rate in nats per token, when the corpus is the built-in grammar with byte tokens.
    pub entropy_per_token: Option<f64>,
}

/// A prepared dataset: both splits memory-mapped, and the tokenizer.
pub struct Dataset {
    pub meta: DataMeta,
    pub train: TokenFile,
    pub val: TokenFile,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
}

/// A stream of documents (text files, or the built-in corpus in pieces).
type Documents = Box<dyn Iterator<Item = Result<String>>>;

/// The tokenizer and token files live here, inside the run directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Tokenizes the corpus into `dir` (`train.bin`, `val.bin`, `tokenizer.json`, `meta.json`), or
/// reuses what an earlier run with the same settings left there.
pub fn prepare(dir: &Path, config: &DataConfig) -> Result<Dataset> {
    let meta_path = dir.join("meta.json");
    if let Ok(text) = std::fs::read_to_string(&meta_path) {
        if let Ok(meta) = serde_json::from_str::<DataMeta>(&text) {
            if &meta.config == config {
                return open(dir, meta);
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let (train_text, val_text): (Documents, Documents);
    let mut entropy = None;
    match &config.corpus {
        CorpusSource::Builtin => {
            let grammar = Grammar::builtin();
            if config.tokenizer == TokenizerSource::Bytes {
                entropy = Some(grammar.entropy_per_byte());
            }
            let val_bytes = (config.builtin_bytes / 20).max(64 << 10);
            // Different seeds for the two splits: validation sentences are fresh draws.
            train_text = Box::new(std::iter::once(Ok(
                grammar.generate(config.seed.wrapping_mul(2), config.builtin_bytes)
            )));
            val_text = Box::new(std::iter::once(Ok(
                grammar.generate(config.seed.wrapping_mul(2) + 1, val_bytes)
            )));
        }
        CorpusSource::Files(files) => {
            if files.is_empty() {
                return Err(TrainError::Data("no corpus files given".into()));
            }
            let mut bytes = 0;
            for f in files {
                let meta = std::fs::metadata(f).map_err(|e| TrainError::io(f, e))?;
                if !meta.is_file() {
                    return Err(TrainError::Data(format!(
                        "corpus path `{}` is not a file",
                        f.display()
                    )));
                }
                bytes += meta.len();
            }
            if bytes == 0 {
                return Err(TrainError::Data(
                    "the corpus files are empty: nothing to train on".into(),
                ));
            }
            // Split later, by token count; the text streams line by line from disk.
            train_text = Box::new(lines(files.clone()));
            val_text = Box::new(std::iter::empty());
        }
    }
    let tokenizer = build_tokenizer(config)?;
    let train_path = dir.join("train.bin");
    let val_path = dir.join("val.bin");
    let (mut n_train, mut max_id) = write_tokens(&tokenizer, train_text, &train_path)?;
    let (mut n_val, max_val) = write_tokens(&tokenizer, val_text, &val_path)?;
    max_id = max_id.max(max_val);
    if matches!(config.corpus, CorpusSource::Files(_)) {
        // Hold out the tail: move it from train.bin to val.bin.
        let held = ((n_train as f64) * config.val_fraction).round() as u64;
        n_val = held;
        n_train -= held;
        let all = TokenFile::open(&train_path)?;
        let tail: Vec<u32> = all.slice(n_train as usize, held as usize);
        drop(all);
        write_u32s(&val_path, &tail)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&train_path)
            .map_err(|e| TrainError::io(&train_path, e))?;
        f.set_len(n_train * 4).map_err(|e| TrainError::io(&train_path, e))?;
    }
    if n_train < 2 {
        return Err(TrainError::Data(format!(
            "the corpus has {n_train} training tokens: nothing to train on"
        )));
    }
    tokenizer
        .save(dir.join(TOKENIZER_FILE), true)
        .map_err(|e| TrainError::Data(format!("cannot save the tokenizer: {e}")))?;
    let meta = DataMeta {
        config: config.clone(),
        train_tokens: n_train,
        val_tokens: n_val,
        vocab_used: max_id + 1,
        tokenizer_vocab: tokenizer.get_vocab_size(true),
        entropy_per_token: entropy,
    };
    let text = serde_json::to_string_pretty(&meta).expect("serializable");
    deepseek_core::checkpoint::write_atomic(&meta_path, text.as_bytes())?;
    open(dir, meta)
}

fn open(dir: &Path, meta: DataMeta) -> Result<Dataset> {
    let tokenizer = Tokenizer::from_file(dir.join(TOKENIZER_FILE)).map_err(|e| {
        TrainError::Data(format!("cannot read the tokenizer in {}: {e}", dir.display()))
    })?;
    Ok(Dataset {
        train: TokenFile::open(&dir.join("train.bin"))?,
        val: TokenFile::open(&dir.join("val.bin"))?,
        meta,
        tokenizer,
        dir: dir.to_path_buf(),
    })
}

fn lines(files: Vec<PathBuf>) -> impl Iterator<Item = Result<String>> {
    files.into_iter().flat_map(|path| {
        let file = File::open(&path).map_err(|e| TrainError::io(&path, e));
        let iter: Box<dyn Iterator<Item = Result<String>>> = match file {
            Err(e) => Box::new(std::iter::once(Err(e))),
            Ok(f) => {
                let p = path.clone();
                // Keep the newline: it is part of the text the model should learn.
                Box::new(
                    BufReader::new(f)
                        .lines()
                        .map(move |l| l.map(|s| s + "\n").map_err(|e| TrainError::io(&p, e))),
                )
            }
        };
        iter
    })
}

/// Tokenizes a stream of text chunks into `path`; returns the token count and the largest id.
fn write_tokens(
    tokenizer: &Tokenizer,
    text: impl Iterator<Item = Result<String>>,
    path: &Path,
) -> Result<(u64, u32)> {
    let file = File::create(path).map_err(|e| TrainError::io(path, e))?;
    let mut out = BufWriter::new(file);
    let (mut count, mut max_id) = (0u64, 0u32);
    let mut batch = Vec::new();
    let mut flush = |batch: &mut Vec<String>, out: &mut BufWriter<File>| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let encodings = tokenizer
            .encode_batch(std::mem::take(batch), false)
            .map_err(|e| TrainError::Data(format!("tokenization failed: {e}")))?;
        for enc in encodings {
            for &id in enc.get_ids() {
                out.write_all(&id.to_le_bytes()).map_err(|e| TrainError::io(path, e))?;
                max_id = max_id.max(id);
                count += 1;
            }
        }
        Ok(())
    };
    for chunk in text {
        let chunk = chunk?;
        // Long generated text is cut at line ends into pieces the tokenizer handles in parallel.
        for piece in chunk.split_inclusive('\n') {
            batch.push(piece.to_string());
            if batch.len() >= 4096 {
                flush(&mut batch, &mut out)?;
            }
        }
    }
    flush(&mut batch, &mut out)?;
    out.flush().map_err(|e| TrainError::io(path, e))?;
    Ok((count, max_id))
}

fn write_u32s(path: &Path, values: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(|e| TrainError::io(path, e))
}

fn build_tokenizer(config: &DataConfig) -> Result<Tokenizer> {
    match &config.tokenizer {
        TokenizerSource::Bytes => Ok(byte_tokenizer()),
        TokenizerSource::File(path) => Tokenizer::from_file(path).map_err(|e| {
            TrainError::Data(format!("cannot read tokenizer `{}`: {e}", path.display()))
        }),
        TokenizerSource::TrainBpe(vocab) => {
            let CorpusSource::Files(files) = &config.corpus else {
                return Err(TrainError::Data(
                    "a BPE is trained on user files; the built-in corpus uses byte tokens".into(),
                ));
            };
            train_bpe(files, *vocab)
        }
    }
}

/// GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet).
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid code point")
            }
        })
        .collect()
}

/// A byte-level `tokenizer.json` with no merges whose id `i` is byte `i`.
pub fn byte_tokenizer() -> Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::Value::from(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    json.to_string().parse().expect("a valid tokenizer.json")
}

/// Trains a byte-level BPE of `vocab_size` tokens on `files` with the `tokenizers` crate.
pub fn train_bpe(files: &[PathBuf], vocab_size: usize) -> Result<Tokenizer> {
    use tokenizers::models::bpe::BpeTrainerBuilder;
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    if vocab_size < 256 {
        return Err(TrainError::Data(format!(
            "a byte-level BPE needs at least 256 tokens, got {vocab_size}"
        )));
    }
    let mut tokenizer = byte_tokenizer();
    // Regex pre-splitting (GPT-2's) keeps merges inside words.
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).use_regex(true)));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let names: Vec<String> = files.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    tokenizer
        .train_from_files(&mut trainer, names)
        .map_err(|e| TrainError::Data(format!("BPE training failed: {e}")))?;
    Ok(tokenizer)
}

/// A memory-mapped file of little-endian `u32` token ids.
pub struct TokenFile {
    mmap: Option<Mmap>,
    len: usize,
}

impl TokenFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| TrainError::io(path, e))?;
        let bytes = file.metadata().map_err(|e| TrainError::io(path, e))?.len() as usize;
        if !bytes.is_multiple_of(4) {
            return Err(TrainError::Data(format!(
                "{} is not a whole number of u32 tokens ({bytes} bytes)",
                path.display()
            )));
        }
        // An empty file cannot be mapped on every platform.
        let mmap = if bytes == 0 {
            None
        } else {
            Some(unsafe { Mmap::map(&file) }.map_err(|e| TrainError::io(path, e))?)
        };
        Ok(Self { mmap, len: bytes / 4 })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens `start..start + n`.
    pub fn slice(&self, start: usize, n: usize) -> Vec<u32> {
        let bytes = &self.mmap.as_ref().map(|m| &m[..]).unwrap_or(&[])[start * 4..(start + n) * 4];
        bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()
    }
}

/// Fixed-length windows of `seq + 1` tokens (inputs and shifted targets), stride `seq`.
pub struct Windows<'a> {
    tokens: &'a TokenFile,
    seq: usize,
    count: usize,
    /// Cached shuffle of one epoch.
    perm: Option<(u64, Vec<u32>)>,
}

impl<'a> Windows<'a> {
    pub fn new(tokens: &'a TokenFile, seq: usize) -> Result<Self> {
        let count = tokens.len().saturating_sub(1) / seq;
        if count == 0 {
            return Err(TrainError::Data(format!(
                "the split has {} tokens, fewer than one sequence of {} + 1",
                tokens.len(),
                seq
            )));
        }
        Ok(Self { tokens, seq, count, perm: None })
    }

    /// Number of windows.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Window `i` in file order.
    pub fn window(&self, i: usize) -> Vec<u32> {
        self.tokens.slice(i * self.seq, self.seq + 1)
    }

    /// The `position`-th window of a shuffled pass (see the module docs).
    pub fn shuffled(&mut self, seed: u64, position: u64) -> Vec<u32> {
        let epoch = position / self.count as u64;
        if self.perm.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
            let mut perm: Vec<u32> = (0..self.count as u32).collect();
            for i in (1..perm.len()).rev() {
                perm.swap(i, rng.below(i as u64 + 1) as usize);
            }
            self.perm = Some((epoch, perm));
        }
        let perm = &self.perm.as_ref().expect("set above").1;
        self.window(perm[(position % self.count as u64) as usize] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_maps_each_byte_to_its_value_and_back() {
        let tok = byte_tokenizer();
        let text = "3 + 4 = 7\nthe cat sees a dog.\n é";
        let enc = tok.encode(text, false).unwrap();
        let expected: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(enc.get_ids(), expected.as_slice());
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert_eq!(tok.get_vocab_size(true), 256);
    }

    #[test]
    fn builtin_data_is_byte_tokens_of_the_grammar_and_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DataConfig { builtin_bytes: 100_000, ..Default::default() };
        let data = prepare(dir.path(), &cfg).unwrap();
        assert!(data.meta.train_tokens >= 100_000);
        assert!(data.meta.vocab_used <= 256);
        let text = Grammar::builtin().generate(0, 100_000);
        let first: Vec<u32> = text.bytes().take(1000).map(u32::from).collect();
        assert_eq!(data.train.slice(0, 1000), first);
        assert!(data.meta.entropy_per_token.is_some());
        let modified = std::fs::metadata(dir.path().join("train.bin")).unwrap().modified().unwrap();
        let again = prepare(dir.path(), &cfg).unwrap();
        assert_eq!(again.meta, data.meta);
        assert_eq!(
            std::fs::metadata(dir.path().join("train.bin")).unwrap().modified().unwrap(),
            modified,
            "reused, not rewritten"
        );
    }

    #[test]
    fn user_files_with_a_trained_bpe_hold_out_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, Grammar::builtin().generate(3, 50_000)).unwrap();
        let cfg = DataConfig {
            corpus: CorpusSource::Files(vec![corpus.clone()]),
            tokenizer: TokenizerSource::TrainBpe(300),
            val_fraction: 0.1,
            ..Default::default()
        };
        let data = prepare(&dir.path().join("data"), &cfg).unwrap();
        assert_eq!(data.tokenizer.get_vocab_size(true), 300);
        let total = data.meta.train_tokens + data.meta.val_tokens;
        assert_eq!(data.meta.val_tokens, (total as f64 * 0.1).round() as u64);
        // The two splits concatenated are the tokenization of the file, line by line.
        let text = std::fs::read_to_string(&corpus).unwrap();
        let ids: Vec<u32> = text
            .split_inclusive('\n')
            .flat_map(|l| data.tokenizer.encode(l, false).unwrap().get_ids().to_vec())
            .collect();
        let mut both = data.train.slice(0, data.train.len());
        both.extend(data.val.slice(0, data.val.len()));
        assert_eq!(both, ids);
        assert!((ids.len() as f64) < text.len() as f64 * 0.8, "the BPE compresses");
    }

    #[test]
    fn bad_corpora_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = DataConfig {
            corpus: CorpusSource::Files(vec![dir.path().join("nope.txt")]),
            ..Default::default()
        };
        let err = prepare(&dir.path().join("a"), &missing).err().unwrap().to_string();
        assert!(err.contains("nope.txt"), "{err}");
        let empty_file = dir.path().join("empty.txt");
        std::fs::write(&empty_file, "").unwrap();
        let empty =
            DataConfig { corpus: CorpusSource::Files(vec![empty_file]), ..Default::default() };
        let err = prepare(&dir.path().join("b"), &empty).err().unwrap().to_string();
        assert!(err.contains("nothing to train on"), "{err}");
        let none = DataConfig { corpus: CorpusSource::Files(vec![]), ..Default::default() };
        assert!(prepare(&dir.path().join("c"), &none).is_err());
    }

    #[test]
    fn shuffled_order_is_a_permutation_per_epoch_and_a_function_of_seed_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        write_u32s(&path, &(0..1001).collect::<Vec<u32>>()).unwrap();
        let file = TokenFile::open(&path).unwrap();
        let mut w = Windows::new(&file, 10).unwrap();
        assert_eq!(w.count(), 100);
        let firsts: Vec<u32> = (0..100).map(|p| w.shuffled(5, p)[0]).collect();
        let mut sorted = firsts.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).map(|i| i * 10).collect::<Vec<_>>());
        let window = w.shuffled(5, 37);
        assert_eq!(window.len(), 11);
        assert_eq!(window[10], window[0] + 10);
        let mut fresh = Windows::new(&file, 10).unwrap();
        assert_eq!(fresh.shuffled(5, 137), w.shuffled(5, 137));
        assert_ne!(
            (100..200).map(|p| w.shuffled(5, p)[0]).collect::<Vec<_>>(),
            firsts,
            "epochs differ"
        );
    }
}
