//! The server's counters and gauges, served at `/metrics` in Prometheus' text format.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Recent latencies kept for the quantiles.
const WINDOW: usize = 1024;

/// Shared between the HTTP handlers and the scheduler.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Answered requests by HTTP status.
    responses: Mutex<BTreeMap<u16, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Sequences decoding now (the batch of the last step).
    pub batch_size: AtomicUsize,
    /// Sequences waiting for a slot.
    pub queue_length: AtomicUsize,
    /// The largest batch a step has run.
    pub peak_batch_size: AtomicUsize,
    /// Streams whose client went away before the end.
    pub cancelled: AtomicU64,
    ttft: Mutex<Latencies>,
    inter_token: Mutex<Latencies>,
    /// Tokens decoded and seconds spent in the recent steps (for tokens/s).
    throughput: Mutex<VecDeque<(Instant, usize)>>,
}

#[derive(Debug, Default)]
struct Latencies {
    recent: VecDeque<f64>,
    count: u64,
    sum: f64,
}

impl Latencies {
    fn record(&mut self, seconds: f64) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(seconds);
        self.count += 1;
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        for q in [0.5, 0.9, 0.99] {
            if let Some(v) = quantile(&sorted, q) {
                let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
            }
        }
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// The `q` quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl Metrics {
    /// Counts an answered request.
    pub fn response(&self, status: u16) {
        *self.responses.lock().unwrap().entry(status).or_default() += 1;
    }

    /// Records the time from a request's arrival to its first token.
    pub fn time_to_first_token(&self, d: Duration) {
        self.ttft.lock().unwrap().record(d.as_secs_f64());
    }

    /// Records the time between two tokens of one stream.
    pub fn inter_token(&self, d: Duration) {
        self.inter_token.lock().unwrap().record(d.as_secs_f64());
    }

    /// Records a decoding step that produced `tokens` tokens.
    pub fn step(&self, tokens: usize) {
        self.peak_batch_size.fetch_max(tokens, Ordering::Relaxed);
        let now = Instant::now();
        let mut t = self.throughput.lock().unwrap();
        t.push_back((now, tokens));
        while t.front().is_some_and(|(at, _)| now.duration_since(*at) > Duration::from_secs(10)) {
            t.pop_front();
        }
    }

    /// Generated tokens per second over the last ten seconds of steps.
    pub fn tokens_per_second(&self) -> f64 {
        let t = self.throughput.lock().unwrap();
        match (t.front(), t.back()) {
            (Some((first, _)), Some((last, _))) if t.len() > 1 => {
                let secs = last.duration_since(*first).as_secs_f64();
                let tokens: usize = t.iter().skip(1).map(|(_, n)| n).sum();
                if secs > 0.0 {
                    tokens as f64 / secs
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP deepseek_requests_total Answered requests by HTTP status.\n# TYPE deepseek_requests_total counter"
        );
        for (status, n) in self.responses.lock().unwrap().iter() {
            let _ = writeln!(out, "deepseek_requests_total{{status=\"{status}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "deepseek_prompt_tokens_total",
            "Prompt tokens prefilled.",
            load(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "deepseek_generated_tokens_total",
            "Tokens generated.",
            load(&self.generated_tokens),
        );
        counter(
            &mut out,
            "deepseek_cancelled_total",
            "Sequences ended because the client went away.",
            load(&self.cancelled),
        );
        gauge(
            &mut out,
            "deepseek_batch_size",
            "Sequences decoding together now.",
            self.batch_size.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut out,
            "deepseek_peak_batch_size",
            "The largest batch a decoding step has run.",
            self.peak_batch_size.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut out,
            "deepseek_queue_length",
            "Sequences waiting for a slot.",
            self.queue_length.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut out,
            "deepseek_tokens_per_second",
            "Generated tokens per second over the last 10 s.",
            self.tokens_per_second(),
        );
        self.ttft.lock().unwrap().write(
            &mut out,
            "deepseek_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        self.inter_token.lock().unwrap().write(
            &mut out,
            "deepseek_inter_token_latency_seconds",
            "Between consecutive tokens of one sequence.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[3.0], 0.9), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn the_exposition_has_every_series() {
        let m = Metrics::default();
        m.response(200);
        m.response(400);
        m.time_to_first_token(Duration::from_millis(20));
        let text = m.render();
        for needle in [
            "deepseek_requests_total{status=\"400\"} 1",
            "deepseek_batch_size 0",
            "deepseek_queue_length 0",
            "deepseek_time_to_first_token_seconds_count 1",
            "deepseek_tokens_per_second 0",
        ] {
            assert!(text.contains(needle), "{needle}\n{text}");
        }
    }
}
