//! What GRPO trains on: prompts with checkable answers. A JSONL task file holds
//! `{prompt | question | messages, answer}` lines (the distillation format); the built-in
//! `arithmetic` task generates `a plus b` problems of adjustable difficulty with a held-out split
//! chosen by the seed. Which prompts a step samples is a function of the seed and the position
//! alone, so a resumed run sees the same prompts.

use std::path::{Path, PathBuf};

use deepseek_infer::chat::Message;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// One prompt and its gold answer.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskItem {
    /// The conversation the model answers (one user turn for a plain prompt).
    pub messages: Vec<Message>,
    pub answer: String,
}

/// An arithmetic operation of the built-in task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Plus,
    Minus,
    Times,
}

impl Op {
    fn apply(self, a: i64, b: i64) -> i64 {
        match self {
            Op::Plus => a + b,
            Op::Minus => a - b,
            Op::Times => a * b,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Op::Plus => "plus",
            Op::Minus => "minus",
            Op::Times => "times",
        }
    }

    /// `plus,minus` → both.
    pub fn parse_list(s: &str) -> std::result::Result<Vec<Op>, String> {
        s.split(',')
            .map(|w| match w.trim() {
                "plus" | "+" => Ok(Op::Plus),
                "minus" | "-" => Ok(Op::Minus),
                "times" | "*" => Ok(Op::Times),
                other => Err(format!("unknown operation `{other}`: plus, minus or times")),
            })
            .collect()
    }
}

/// Which task a run trains on (serialized into checkpoints: a resume checks it is unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TaskSpec {
    /// `a OP b` with operands in `0..max_operand` (the difficulty), `heldout` of every
    /// thousand problems held out (which ones depends on the seed).
    Arithmetic { max_operand: u32, ops: Vec<Op>, heldout_per_mille: u32 },
    /// A JSONL file; `heldout` is another file, or the last 5% of this one.
    File { train: PathBuf, heldout: Option<PathBuf> },
}

impl Default for TaskSpec {
    fn default() -> Self {
        Self::Arithmetic { max_operand: 20, ops: vec![Op::Plus], heldout_per_mille: 100 }
    }
}

/// A task's problems, split.
#[derive(Debug, Clone)]
pub struct Task {
    pub train: Vec<TaskItem>,
    pub heldout: Vec<TaskItem>,
}

/// A well-mixed 64-bit function of its input (seeds and splits derive from it): the first
/// output of the corpus's splitmix64 generator seeded with `z`.
pub fn mix(z: u64) -> u64 {
    crate::corpus::SplitMix64::new(z).next_u64()
}

impl TaskSpec {
    /// The problems, split into training and held-out ones by `seed` (arithmetic) or by file.
    pub fn load(&self, seed: u64) -> Result<Task> {
        let task = match self {
            TaskSpec::Arithmetic { max_operand, ops, heldout_per_mille } => {
                if *max_operand == 0 || ops.is_empty() {
                    return Err(TrainError::config(
                        "task",
                        "arithmetic needs --difficulty ≥ 1 and at least one operation",
                    ));
                }
                if *heldout_per_mille >= 1000 {
                    return Err(TrainError::config("task", "the held-out share must be below 1"));
                }
                let (mut train, mut heldout) = (Vec::new(), Vec::new());
                for (o, &op) in ops.iter().enumerate() {
                    for a in 0..*max_operand as i64 {
                        for b in 0..*max_operand as i64 {
                            let item = TaskItem {
                                messages: vec![Message::new(
                                    "user",
                                    &format!("{a} {} {b}", op.word()),
                                )],
                                answer: op.apply(a, b).to_string(),
                            };
                            let key =
                                mix(seed ^ mix(((o as u64) << 42) | ((a as u64) << 21) | b as u64));
                            if key % 1000 < *heldout_per_mille as u64 {
                                heldout.push(item);
                            } else {
                                train.push(item);
                            }
                        }
                    }
                }
                Task { train, heldout }
            }
            TaskSpec::File { train, heldout } => {
                let mut items = read_task_file(train)?;
                let heldout = match heldout {
                    Some(file) => read_task_file(file)?,
                    None if items.len() >= 2 => {
                        let held = (items.len() / 20).max(1);
                        items.split_off(items.len() - held)
                    }
                    None => Vec::new(),
                };
                Task { train: items, heldout }
            }
        };
        if task.train.is_empty() {
            return Err(TrainError::Data("the task has no training prompts".into()));
        }
        Ok(task)
    }
}

/// Reads `{prompt | question | messages, answer}` JSONL; a line without an answer is an error
/// naming the file and line.
pub fn read_task_file(path: &Path) -> Result<Vec<TaskItem>> {
    Ok(crate::distill::read_prompts(path)?
        .into_iter()
        .map(|p| TaskItem { messages: p.messages, answer: p.answer })
        .collect())
}

impl Task {
    /// The `count` training prompts at `position` of the seeded order: epoch after epoch, each a
    /// fresh permutation of the training prompts drawn from `(seed, epoch)`.
    pub fn batch(&self, seed: u64, position: u64, count: usize) -> Vec<&TaskItem> {
        let n = self.train.len() as u64;
        let mut order: Option<(u64, Vec<usize>)> = None;
        (position..position + count as u64)
            .map(|p| {
                let epoch = p / n;
                if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    order = Some((epoch, permutation(self.train.len(), mix(seed ^ mix(epoch)))));
                }
                &self.train[order.as_ref().expect("set above").1[(p % n) as usize]]
            })
            .collect()
    }
}

/// A Fisher–Yates shuffle of `0..n` driven by splitmix64 from `seed`.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed;
    for i in (1..n).rev() {
        state = mix(state);
        order.swap(i, (state % (i as u64 + 1)) as usize);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_split_is_disjoint_and_seeded() {
        let spec = TaskSpec::default();
        let a = spec.load(1).unwrap();
        assert_eq!(a.train.len() + a.heldout.len(), 400);
        assert!(a.heldout.len() > 20 && a.heldout.len() < 65, "{}", a.heldout.len());
        assert!(a.heldout.iter().all(|h| !a.train.contains(h)));
        let b = spec.load(2).unwrap();
        assert_ne!(a.heldout, b.heldout);
        let item = &a.train[0];
        let text = &item.messages[0].content;
        let parts: Vec<i64> = text.split(" plus ").map(|p| p.parse().unwrap()).collect();
        assert_eq!((parts[0] + parts[1]).to_string(), item.answer);
    }

    #[test]
    fn batches_cover_each_epoch_once() {
        let task = TaskSpec::default().load(0).unwrap();
        let n = task.train.len();
        let epoch = task.batch(3, 0, n);
        let mut seen: Vec<&str> = epoch.iter().map(|i| i.messages[0].content.as_str()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), n);
        // A batch is a function of the position: reading from the middle gives the same items.
        assert_eq!(task.batch(3, 5, 4), epoch[5..9].to_vec());
    }
}
