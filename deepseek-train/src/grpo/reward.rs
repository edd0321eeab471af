//! Rewards of verifiable answers: a [`Reward`] scores one completion against its task item.
//! Built in: [`ExactAnswer`] (1 when the answer is right: the number after `####`, else the
//! last number, compared numerically, as [`deepseek_infer::checker::is_correct`] reads it) and
//! [`FormatReward`] (a bonus for answering in the `#### N` form). [`Rewards`] sums weighted
//! rewards and rejects a score that is not finite.

use crate::error::{Result, TrainError};
use crate::grpo::task::TaskItem;

/// Scores a completion (its text, the end-of-turn token removed).
pub trait Reward: Send + Sync {
    /// The name metrics and errors use.
    fn name(&self) -> &str;
    /// The score of `completion` for `item`; must be finite.
    fn score(&self, completion: &str, item: &TaskItem) -> f64;
}

/// 1 for the right answer, else 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactAnswer;

impl Reward for ExactAnswer {
    fn name(&self) -> &str {
        "exact_answer"
    }
    fn score(&self, completion: &str, item: &TaskItem) -> f64 {
        f64::from(u8::from(deepseek_infer::checker::is_correct(completion, &item.answer)))
    }
}

/// 1 when the completion ends its reasoning with `#### <number>` (the GSM8K / R1-style answer
/// line), else 0. Meant as a small weighted bonus beside [`ExactAnswer`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatReward;

impl Reward for FormatReward {
    fn name(&self) -> &str {
        "format"
    }
    fn score(&self, completion: &str, _item: &TaskItem) -> f64 {
        let Some(i) = completion.rfind("####") else { return 0.0 };
        let tail = completion[i + 4..].trim();
        let number = tail.strip_prefix('-').unwrap_or(tail).replace(',', "");
        f64::from(u8::from(!number.is_empty() && number.parse::<f64>().is_ok()))
    }
}

/// A weighted sum of rewards.
pub struct Rewards {
    parts: Vec<(f64, Box<dyn Reward>)>,
}

impl Rewards {
    /// The exact-answer reward, plus the format reward at `format_weight` when positive.
    pub fn standard(format_weight: f64) -> Self {
        let mut parts: Vec<(f64, Box<dyn Reward>)> = vec![(1.0, Box::new(ExactAnswer))];
        if format_weight > 0.0 {
            parts.push((format_weight, Box::new(FormatReward)));
        }
        Self { parts }
    }

    /// Any rewards with their weights.
    pub fn new(parts: Vec<(f64, Box<dyn Reward>)>) -> Self {
        Self { parts }
    }

    /// The weighted sum for one completion; an error names the reward that gave a non-finite
    /// score.
    pub fn score(&self, completion: &str, item: &TaskItem) -> Result<f64> {
        let mut total = 0.0;
        for (w, r) in &self.parts {
            let s = r.score(completion, item);
            if !s.is_finite() {
                return Err(TrainError::Data(format!(
                    "reward `{}` returned {s} for the completion {completion:?}: rewards must be finite",
                    r.name()
                )));
            }
            total += w * s;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deepseek_infer::chat::Message;

    fn item(answer: &str) -> TaskItem {
        TaskItem { messages: vec![Message::new("user", "q")], answer: answer.into() }
    }

    #[test]
    fn exact_answer_and_format() {
        let r = Rewards::standard(0.5);
        assert_eq!(r.score(" 19", &item("19")).unwrap(), 1.0);
        assert_eq!(r.score("so 3 + 4 = 7\n#### 7", &item("7")).unwrap(), 1.5);
        assert_eq!(r.score("#### 8", &item("7")).unwrap(), 0.5);
        assert_eq!(r.score("no idea", &item("7")).unwrap(), 0.0);
    }

    #[test]
    fn non_finite_reward_is_an_error() {
        struct Broken;
        impl Reward for Broken {
            fn name(&self) -> &str {
                "broken"
            }
            fn score(&self, _: &str, _: &TaskItem) -> f64 {
                f64::NAN
            }
        }
        let r = Rewards::new(vec![(1.0, Box::new(Broken))]);
        let err = r.score("x", &item("1")).unwrap_err().to_string();
        assert!(err.contains("broken") && err.contains("finite"), "{err}");
    }
}
