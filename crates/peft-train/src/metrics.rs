//! What a run records: one JSON line per step and per validation in `metrics.jsonl`, and a
//! loss-curve plot (`loss.svg`) drawn from it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// One optimiser step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimiser steps completed.
    pub step: usize,
    /// Fractional epoch reached.
    pub epoch: f64,
    /// Token-weighted mean loss of the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens in the step.
    pub tokens: usize,
    /// Tokens including padding.
    pub padded_tokens: usize,
    /// Seconds the step took.
    pub seconds: f64,
    /// Seconds since the run started.
    pub elapsed: f64,
}

impl StepMetrics {
    /// Real tokens per second.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }

    /// Tokens per second counting padding.
    pub fn padded_tokens_per_second(&self) -> f64 {
        self.padded_tokens as f64 / self.seconds.max(1e-9)
    }
}

/// The metrics file of a run.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `<output>/metrics.jsonl`, appending when resuming and truncating otherwise.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(output: &Path, append: bool) -> Result<Self> {
        std::fs::create_dir_all(output).map_err(|source| TrainError::Io {
            path: output.into(),
            source,
        })?;
        let path = output.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .map_err(|source| TrainError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path, file })
    }

    fn write(&mut self, value: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{value}").map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Records a step.
    ///
    /// # Errors
    /// I/O errors.
    pub fn step(&mut self, metrics: &StepMetrics) -> Result<()> {
        let mut value = serde_json::to_value(metrics).expect("metrics serialise");
        value["kind"] = "train".into();
        value["tokens_per_second"] = metrics.tokens_per_second().into();
        value["padded_tokens_per_second"] = metrics.padded_tokens_per_second().into();
        self.write(value)
    }

    /// Records a validation.
    ///
    /// # Errors
    /// I/O errors.
    pub fn validation(&mut self, step: usize, loss: f64) -> Result<()> {
        self.write(serde_json::json!({"kind": "validation", "step": step, "val_loss": loss}))
    }

    /// Draws `<output>/loss.svg` from the whole metrics file (so resumed runs plot completely).
    ///
    /// # Errors
    /// I/O errors.
    pub fn plot(&self, output: &Path) -> Result<()> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut train = Vec::new();
        let mut validation = Vec::new();
        for line in text.lines() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let step = value["step"].as_f64().unwrap_or(0.0);
            match value["kind"].as_str() {
                Some("train") => train.push((step, value["loss"].as_f64().unwrap_or(f64::NAN))),
                Some("validation") => {
                    validation.push((step, value["val_loss"].as_f64().unwrap_or(f64::NAN)))
                }
                _ => {}
            }
        }
        let svg = loss_plot(&[
            ("training loss", "#1f77b4", &train),
            ("validation loss", "#d62728", &validation),
        ]);
        peft_io::files::write_atomic(&output.join("loss.svg"), svg.as_bytes())?;
        Ok(())
    }
}

/// One curve of [`loss_plot`]: label, CSS colour, `(step, loss)` points.
pub type LossSeries<'a> = (&'a str, &'a str, &'a [(f64, f64)]);

/// An SVG line plot of loss curves `(label, colour, points)` over optimiser steps.
pub fn loss_plot(series: &[LossSeries<'_>]) -> String {
    let (width, height, margin) = (640.0, 400.0, 60.0);
    let points = series
        .iter()
        .flat_map(|(_, _, p)| p.iter())
        .filter(|(_, y)| y.is_finite());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_max - y_min < 1e-9 {
        y_max = y_min + 1.0;
    }
    let sx = |x: f64| margin + x / x_max * (width - 2.0 * margin);
    let sy = |y: f64| height - margin - (y - y_min) / (y_max - y_min) * (height - 2.0 * margin);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{t}\" text-anchor=\"middle\">optimiser step (0 to {x_max})</text>\n\
         <text x=\"10\" y=\"{m}\">{y_max:.3}</text>\n<text x=\"10\" y=\"{b}\">{y_min:.3}</text>\n",
        m = margin,
        b = height - margin,
        r = width - margin,
        cx = width / 2.0,
        t = height - 20.0,
    );
    for (index, (label, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .filter(|(_, y)| y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if !path.is_empty() {
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                path.join(" ")
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{label}</text>\n",
            width - margin - 120.0,
            margin + 16.0 * index as f64
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
