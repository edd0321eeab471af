//! Training metrics: one JSON object per line in `<out>/metrics.jsonl`, and a PNG plot of the
//! loss and MaxVio curves at the end of a run.
//!
//! Key names are a stable interface (other tools read them): step records carry `step`, `loss`
//! (next-token cross-entropy), `mtp_loss`, `lr`, `grad_norm`, `tokens_per_s`, `max_vio_batch`;
//! evaluation records carry `step`, `val_loss`, `max_vio_global`. Records may carry more keys.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The file name inside the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    /// Mean next-token cross-entropy of the step's tokens (nats).
    #[serde(deserialize_with = "null_as_nan")]
    pub loss: f32,
    /// Mean MTP cross-entropy (nats), when the model has MTP modules.
    pub mtp_loss: Option<f32>,
    /// The balance term added to the objective, if any.
    pub balance_loss: Option<f32>,
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(deserialize_with = "null_as_nan")]
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// MaxVio of this step's tokens, max over MoE layers.
    pub max_vio_batch: f64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// The update was skipped (non-finite loss with `on_nonfinite = skip`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// The loss scale of an f16 run after this step ([`crate::precision`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
}

/// A float that JSON holds as `null` because it was not finite (the loss or gradient norm of a
/// skipped step: serde_json writes infinities and NaN so), read back as NaN.
fn null_as_nan<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + From<f32>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_else(|| T::from(f32::NAN)))
}

/// One evaluation on the validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: usize,
    pub val_loss: f64,
    pub val_mtp_loss: Option<f64>,
    /// MaxVio of the expert loads summed over the whole validation set, max over MoE layers.
    pub max_vio_global: f64,
    /// Validation tokens evaluated.
    pub val_tokens: u64,
}

/// Appends records to `metrics.jsonl`, one line each, flushed at once.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `dir/metrics.jsonl` for appending, first dropping records after `keep_through`
    /// (a resumed run repeats the steps after its checkpoint; their old records go).
    pub fn open(dir: &Path, keep_through: Option<usize>) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        match keep_through {
            Some(step) if path.exists() => {
                let kept: Vec<String> = read_lines(&path)?
                    .into_iter()
                    .filter(|line| {
                        serde_json::from_str::<serde_json::Value>(line)
                            .ok()
                            .and_then(|v| v["step"].as_u64())
                            .is_some_and(|s| s as usize <= step)
                    })
                    .collect();
                let mut text = kept.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                deepseek_core::checkpoint::write_atomic(&path, text.as_bytes())?;
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(Self { path, file })
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record).expect("records serialize");
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| TrainError::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).map_err(|e| TrainError::io(path, e))?;
    BufReader::new(file).lines().map(|l| l.map_err(|e| TrainError::io(path, e))).collect()
}

/// The records of a metrics file, split by kind.
pub fn read_metrics(path: &Path) -> Result<(Vec<StepRecord>, Vec<EvalRecord>)> {
    let (mut steps, mut evals) = (Vec::new(), Vec::new());
    for line in read_lines(path)? {
        if let Ok(r) = serde_json::from_str::<StepRecord>(&line) {
            steps.push(r);
        } else if let Ok(r) = serde_json::from_str::<EvalRecord>(&line) {
            evals.push(r);
        }
    }
    Ok((steps, evals))
}

/// Embedded so that plots render the same everywhere without system fonts (DejaVu fonts are
/// free to redistribute; see `assets/LICENSE-DejaVu`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// Registers the embedded font as plotters' `sans-serif` (the bitmap backend has no system
/// fonts to fall back on).
pub(crate) fn register_font() -> std::result::Result<(), String> {
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT)
        .map_err(|_| "bad embedded font".to_string())
}

/// Draws `png` (1200×500): training and validation loss (with the entropy floor, when known)
/// on the left, MaxVio per batch and over the validation set on the right.
pub fn plot(metrics: &Path, png: &Path, floor: Option<f64>) -> Result<()> {
    use plotters::prelude::*;
    let (steps, evals) = read_metrics(metrics)?;
    let plot_err = |e: String| TrainError::Data(format!("cannot draw {}: {e}", png.display()));
    register_font().map_err(plot_err)?;
    let root = BitMapBackend::new(png, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    let last =
        steps.iter().map(|r| r.step).chain(evals.iter().map(|r| r.step)).max().unwrap_or(1).max(1)
            as f64;

    // Loss panel.
    let losses: Vec<f64> = steps
        .iter()
        .map(|r| r.loss as f64)
        .chain(evals.iter().map(|r| r.val_loss))
        .chain(floor)
        .filter(|v| v.is_finite())
        .collect();
    // Log scale: the approach to the entropy floor is as visible as the first fast drop.
    let hi = losses.iter().cloned().filter(|v| *v > 0.0).fold(f64::MIN, f64::max).max(1e-3);
    let lo = losses.iter().cloned().filter(|v| *v > 0.0).fold(f64::MAX, f64::min).min(hi / 2.0);
    let mut chart = ChartBuilder::on(&left)
        .caption("loss (nats/token, log scale)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..last, (lo * 0.9..hi * 1.1).log_scale())
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            steps
                .iter()
                .filter(|r| r.loss.is_finite() && r.loss > 0.0)
                .map(|r| (r.step as f64, r.loss as f64)),
            &BLUE,
        ))
        .map_err(|e| plot_err(e.to_string()))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            evals.iter().map(|r| (r.step as f64, r.val_loss)),
            RED.stroke_width(2),
        ))
        .map_err(|e| plot_err(e.to_string()))?
        .label("validation")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    if let Some(f) = floor {
        chart
            .draw_series(LineSeries::new(vec![(0.0, f), (last, f)], BLACK))
            .map_err(|e| plot_err(e.to_string()))?
            .label("corpus entropy")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;

    // MaxVio panel.
    let vio_hi = steps
        .iter()
        .map(|r| r.max_vio_batch)
        .chain(evals.iter().map(|r| r.max_vio_global))
        .filter(|v| v.is_finite())
        .fold(0.1, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption("expert load MaxVio", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..last, 0.0..vio_hi * 1.05)
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(steps.iter().map(|r| (r.step as f64, r.max_vio_batch)), &BLUE))
        .map_err(|e| plot_err(e.to_string()))?
        .label("batch")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            evals.iter().map(|r| (r.step as f64, r.max_vio_global)),
            RED.stroke_width(2),
        ))
        .map_err(|e| plot_err(e.to_string()))?
        .label("global (validation)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(())
}

/// Moving average of the training loss over `window` steps (the steps' own noise hides small
/// differences between runs otherwise).
pub fn smoothed_loss(steps: &[StepRecord], window: usize) -> Vec<(usize, f64)> {
    let window = window.max(1);
    let mut out = Vec::with_capacity(steps.len());
    let mut sum = 0f64;
    for (i, r) in steps.iter().enumerate() {
        sum += r.loss as f64;
        if i >= window {
            sum -= steps[i - window].loss as f64;
        }
        out.push((r.step, sum / (i + 1).min(window) as f64));
    }
    out
}

/// Draws `png` (1200×500) comparing runs on the same data: their training loss (moving average
/// over `window` steps) and validation loss on the left, and on the right each run's relative
/// difference from the first, `(loss − loss₀) / loss₀` in percent.
pub fn plot_comparison(runs: &[(&str, &Path)], png: &Path, window: usize) -> Result<()> {
    use plotters::prelude::*;
    let plot_err = |e: String| TrainError::Data(format!("cannot draw {}: {e}", png.display()));
    let logs = runs.iter().map(|(_, p)| read_metrics(p)).collect::<Result<Vec<_>>>()?;
    if logs.is_empty() || logs.iter().any(|(s, _)| s.is_empty()) {
        return Err(TrainError::Data(
            "plot_comparison needs runs with at least one step each".into(),
        ));
    }
    register_font().map_err(plot_err)?;
    let root = BitMapBackend::new(png, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    let smooth: Vec<Vec<(usize, f64)>> =
        logs.iter().map(|(s, _)| smoothed_loss(s, window)).collect();
    let last =
        logs.iter().flat_map(|(s, _)| s.last().map(|r| r.step)).max().unwrap_or(1).max(1) as f64;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];

    let values: Vec<f64> = smooth
        .iter()
        .flatten()
        .map(|p| p.1)
        .chain(logs.iter().flat_map(|(_, e)| e.iter().map(|r| r.val_loss)))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let hi = values.iter().cloned().fold(f64::MIN, f64::max).max(1e-3);
    let lo = values.iter().cloned().fold(f64::MAX, f64::min).min(hi / 2.0);
    let mut chart = ChartBuilder::on(&left)
        .caption(format!("loss (train: mean of {window} steps; log scale)"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..last, (lo * 0.9..hi * 1.1).log_scale())
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    for (i, ((name, _), (curve, (_, evals)))) in
        runs.iter().zip(smooth.iter().zip(&logs)).enumerate()
    {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(curve.iter().map(|&(s, v)| (s as f64, v)), color))
            .map_err(|e| plot_err(e.to_string()))?
            .label(format!("{name} train"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                evals.iter().map(|r| Circle::new((r.step as f64, r.val_loss), 4, color.filled())),
            )
            .map_err(|e| plot_err(e.to_string()))?
            .label(format!("{name} validation"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;

    // Relative difference from the first run, step by step (steps both runs logged).
    let base: std::collections::HashMap<usize, f64> = smooth[0].iter().cloned().collect();
    let base_eval: std::collections::HashMap<usize, f64> =
        logs[0].1.iter().map(|r| (r.step, r.val_loss)).collect();
    let rel: Vec<Vec<(f64, f64)>> = smooth[1..]
        .iter()
        .map(|c| {
            c.iter()
                .filter(|(s, _)| *s > window)
                .filter_map(|(s, v)| base.get(s).map(|b| (*s as f64, 100.0 * (v - b) / b)))
                .collect()
        })
        .collect();
    let rel_eval: Vec<Vec<(f64, f64)>> = logs[1..]
        .iter()
        .map(|(_, e)| {
            e.iter()
                .filter_map(|r| {
                    base_eval.get(&r.step).map(|b| (r.step as f64, 100.0 * (r.val_loss - b) / b))
                })
                .collect()
        })
        .collect();
    let span = rel
        .iter()
        .chain(&rel_eval)
        .flatten()
        .map(|p| p.1.abs())
        .filter(|v| v.is_finite())
        .fold(0.25, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&right)
        .caption(format!("relative difference from {} (%)", runs[0].0), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..last, -span..span)
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(vec![(0.0, 0.0), (last, 0.0)], BLACK))
        .map_err(|e| plot_err(e.to_string()))?;
    for (i, (curve, evals)) in rel.iter().zip(&rel_eval).enumerate() {
        let color = colors[(i + 1) % colors.len()];
        let name = runs[i + 1].0;
        chart
            .draw_series(LineSeries::new(curve.iter().cloned(), color))
            .map_err(|e| plot_err(e.to_string()))?
            .label(format!("{name} train"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(evals.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| plot_err(e.to_string()))?
            .label(format!("{name} validation"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: usize, loss: f32) -> StepRecord {
        StepRecord {
            step,
            loss,
            mtp_loss: Some(loss + 0.5),
            balance_loss: None,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_s: 100.0,
            max_vio_batch: 0.5,
            tokens: 10,
            skipped: false,
            loss_scale: None,
        }
    }

    #[test]
    fn records_use_the_stable_keys_and_resume_drops_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::open(dir.path(), None).unwrap();
        for s in 1..=4 {
            w.write(&step(s, 3.0 - s as f32 * 0.1)).unwrap();
        }
        w.write(&EvalRecord {
            step: 4,
            val_loss: 2.5,
            val_mtp_loss: None,
            max_vio_global: 0.2,
            val_tokens: 100,
        })
        .unwrap();
        drop(w);
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for key in ["step", "loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "max_vio_batch"]
        {
            assert!(first.get(key).is_some(), "missing `{key}`");
        }
        let eval: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        for key in ["step", "val_loss", "max_vio_global"] {
            assert!(eval.get(key).is_some(), "missing `{key}`");
        }
        // Resuming from step 2 keeps steps 1–2 only.
        let mut w = MetricsWriter::open(dir.path(), Some(2)).unwrap();
        w.write(&step(3, 1.0)).unwrap();
        let (steps, evals) = read_metrics(&dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(steps.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(steps[2].loss, 1.0);
        assert!(evals.is_empty());
        // The plot is a PNG.
        let png = dir.path().join("plot.png");
        plot(&dir.path().join(METRICS_FILE), &png, Some(1.5)).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }
}

/// How a [`Series`] is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesStyle {
    Line,
    BoldLine,
    Points,
}

/// One named curve of [`plot_panels`].
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: SeriesStyle,
}

impl Series {
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, style: SeriesStyle::Line }
    }
    pub fn bold(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, style: SeriesStyle::BoldLine }
    }
    pub fn points(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, style: SeriesStyle::Points }
    }
}

/// Draws `png` (1200×500) with two panels of curves against the step, each titled, linear
/// axes fitted to the finite values.
pub fn plot_panels(png: &Path, left: (&str, &[Series]), right: (&str, &[Series])) -> Result<()> {
    use plotters::prelude::*;
    let plot_err = |e: String| TrainError::Data(format!("cannot draw {}: {e}", png.display()));
    register_font().map_err(plot_err)?;
    let root = BitMapBackend::new(png, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let (l, r) = root.split_horizontally(600);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (area, (title, series)) in [(l, left), (r, right)] {
        let finite =
            || series.iter().flat_map(|s| &s.points).filter(|p| p.0.is_finite() && p.1.is_finite());
        let last = finite().map(|p| p.0).fold(1.0, f64::max);
        let lo = finite().map(|p| p.1).fold(0.0, f64::min);
        let hi = finite().map(|p| p.1).fold(lo + 1e-3, f64::max);
        let pad = 0.05 * (hi - lo);
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..last, lo - pad..hi + pad)
            .map_err(|e| plot_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| plot_err(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            let points = s.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite());
            match s.style {
                SeriesStyle::Points => chart
                    .draw_series(points.map(|p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| plot_err(e.to_string()))?
                    .label(s.name.clone())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled())),
                style => chart
                    .draw_series(LineSeries::new(
                        points,
                        color.stroke_width(if style == SeriesStyle::BoldLine { 3 } else { 1 }),
                    ))
                    .map_err(|e| plot_err(e.to_string()))?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color)),
            };
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(e.to_string()))?;
    }
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(())
}
