//! Helpers the parallel-training tests share: turns, a run's step records and exported weights,
//! and the comparison of two runs.

use std::path::Path;

use deepseek_core::checkpoint::model_tensors;
use deepseek_core::LoadOptions;
use deepseek_train::metrics::StepRecord;

/// The all-to-all counter and the collective are per process: the tests of a file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The step records of the run in `out`.
pub fn steps(out: &Path) -> Vec<StepRecord> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<StepRecord>(l).ok())
        .filter(|r| r.tokens > 0)
        .collect()
}

/// Every tensor of the model the run in `out` exported, by name.
pub fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let model = deepseek_core::load_model::<burn::backend::Flex>(
        &out.join("hf"),
        &Default::default(),
        LoadOptions::default(),
    )
    .unwrap();
    model_tensors(&model).into_iter().map(|t| (t.name, t.values)).collect()
}

/// Asserts that the run in `out` logged the steps of `want_steps` (losses within 1e-5 relative,
/// gradient norms within 1e-4, equal expert loads and tokens) and exported `want_weights`
/// within `bound`.
pub fn assert_same_run(
    out: &Path,
    want_steps: &[StepRecord],
    want_weights: &[(String, Vec<f32>)],
    bound: f32,
    what: &str,
) {
    assert_close_run(out, want_steps, want_weights, bound, 1e-5, what)
}

/// [`assert_same_run`] with losses within `rel` relative, gradient norms within `10·rel`; if
/// `rel` exceeds 1e-5 (bf16 runs), MaxVio within 0.05 and the weights left to the caller
/// ([`weight_differences`]).
pub fn assert_close_run(
    out: &Path,
    want_steps: &[StepRecord],
    want_weights: &[(String, Vec<f32>)],
    bound: f32,
    rel: f32,
    what: &str,
) {
    let got = steps(out);
    assert_eq!(got.len(), want_steps.len(), "{what}: rank 0 alone writes one record per step");
    let close = |g: Option<f32>, w: Option<f32>, name: &str, step: usize| match (g, w) {
        (Some(g), Some(w)) => {
            assert!((g - w).abs() <= rel * w.abs(), "{what}, step {step}: {name} {g} vs {w}")
        }
        (g, w) => assert_eq!(g.is_some(), w.is_some(), "{what}, step {step}: {name}"),
    };
    for (g, w) in got.iter().zip(want_steps) {
        close(Some(g.loss), Some(w.loss), "loss", g.step);
        close(g.mtp_loss, w.mtp_loss, "MTP loss", g.step);
        close(g.balance_loss, w.balance_loss, "balance loss", g.step);
        let step = g.step;
        assert!(
            (g.grad_norm - w.grad_norm).abs() <= 10.0 * rel as f64 * w.grad_norm,
            "{what}, step {step}: grad norm {} vs {}",
            g.grad_norm,
            w.grad_norm
        );
        if rel <= 1e-5 {
            assert_eq!(g.max_vio_batch, w.max_vio_batch, "{what}, step {step}: expert loads");
        } else {
            // A token near a routing tie may take another expert.
            let (a, b) = (g.max_vio_batch, w.max_vio_batch);
            assert!((a - b).abs() <= 0.05, "{what}, step {step}: expert loads {a} vs {b}");
        }
        assert_eq!(g.tokens, w.tokens, "{what}, step {step}: the global batch");
    }
    assert_eq!(weights(out).len(), want_weights.len(), "{what}: every tensor exported");
    let (worst, name, beyond, total) = weight_differences(&weights(out), want_weights, bound, rel);
    eprintln!("{what}: largest weight difference {worst:.2e} in {name} (bound {bound:.1e}); {beyond} of {total} values beyond it");
    if rel <= 1e-5 {
        assert!(worst <= bound, "{what}: weights differ by {worst} in {name}");
    }
}

/// The largest difference between `got` and `want` beyond what is allowed (`bound`, plus one
/// bf16 rounding step, at most 2⁻⁷ of the value, when `rel` exceeds 1e-5), the tensor it is in,
/// how many values exceed the allowance and how many there are.
pub fn weight_differences(
    got: &[(String, Vec<f32>)],
    want: &[(String, Vec<f32>)],
    bound: f32,
    rel: f32,
) -> (f32, String, usize, usize) {
    let step = if rel > 1e-5 { 2f32.powi(-7) } else { 0.0 };
    let (mut worst, mut name, mut beyond, mut total) = (0f32, String::new(), 0, 0);
    for ((gname, g), (wname, w)) in got.iter().zip(want) {
        assert_eq!(gname, wname);
        for (a, b) in g.iter().zip(w) {
            let excess = (a - b).abs() - step * b.abs();
            if excess > worst {
                (worst, name) = (excess, gname.clone());
            }
            beyond += usize::from(excess > bound);
            total += 1;
        }
    }
    (worst, name, beyond, total)
}
