//! The learning-rate schedule of DeepSeek-V3 (§4.2): linear warmup to the peak, constant, cosine
//! decay to a floor, then constant at the floor, and optionally a final lower constant for the
//! last steps (the paper: 2.2e-4 peak, cosine to 2.2e-5, then 2.2e-5 and finally 7.3e-6).

use serde::{Deserialize, Serialize};

/// Step boundaries and rates; every phase may be empty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Learning rate after warmup.
    pub peak: f64,
    /// Steps of linear warmup from 0 to `peak`.
    pub warmup_steps: usize,
    /// First step of the cosine decay (the constant phase runs from `warmup_steps` to here).
    pub decay_start: usize,
    /// Step at which the cosine decay reaches `floor`.
    pub decay_end: usize,
    /// Rate after the decay.
    pub floor: f64,
    /// From this step on, the rate is `final_lr` (if set).
    pub final_start: Option<usize>,
    /// Rate of the last phase.
    pub final_lr: f64,
}

impl LrSchedule {
    /// The paper's shape scaled to `total` steps: 2.2e-4 peak after 2K warmup steps (or 1% of
    /// the run when shorter), constant to 67%, cosine to 2.2e-5 by 97%, then 7.3e-6.
    pub fn deepseek_v3(total: usize) -> Self {
        let at = |fraction: f64| (total as f64 * fraction).round() as usize;
        Self {
            peak: 2.2e-4,
            warmup_steps: 2000.min(at(0.01).max(1)),
            decay_start: at(0.67),
            decay_end: at(0.97),
            floor: 2.2e-5,
            final_start: Some(at(0.97)),
            final_lr: 7.3e-6,
        }
    }

    /// The rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if let Some(start) = self.final_start {
            if step >= start {
                return self.final_lr;
            }
        }
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step < self.decay_start {
            return self.peak;
        }
        if step >= self.decay_end || self.decay_end <= self.decay_start {
            return self.floor;
        }
        let progress =
            (step - self.decay_start) as f64 / (self.decay_end - self.decay_start) as f64;
        self.floor
            + 0.5 * (self.peak - self.floor) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_meet_at_their_boundaries() {
        let s = LrSchedule {
            peak: 1.0,
            warmup_steps: 10,
            decay_start: 20,
            decay_end: 40,
            floor: 0.1,
            final_start: Some(50),
            final_lr: 0.01,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-12); // (0 + 1) / 10
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert_eq!(s.lr(15), 1.0);
        assert_eq!(s.lr(20), 1.0); // cosine starts at the peak
        assert!((s.lr(30) - 0.55).abs() < 1e-12); // halfway: floor + (peak − floor) / 2
        assert!((s.lr(39) - 0.1).abs() < 0.01);
        assert_eq!(s.lr(45), 0.1);
        assert_eq!(s.lr(50), 0.01);
        // Monotone non-increasing after warmup.
        assert!((10..60).all(|i| s.lr(i + 1) <= s.lr(i)));
    }

    #[test]
    fn paper_preset_peaks_at_2_2e_4_and_ends_at_7_3e_6() {
        let s = LrSchedule::deepseek_v3(10_000);
        assert_eq!(s.lr(s.warmup_steps), 2.2e-4);
        assert_eq!(s.lr(9_999), 7.3e-6);
    }
}
