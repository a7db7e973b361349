//! Training checkpoints: the adapter, the optimiser state and the data position, written so that
//! a crash at any instant (even `kill -9` during a write) leaves every checkpoint on disk readable.
//!
//! Layout under `<output>/checkpoints/`:
//! - `step-00000012/adapter/` (peft-rs format), `step-00000012/optimizer.safetensors`
//!   (`m.<param path>` and `v.<param path>`), `step-00000012/state.json` (position, step counts);
//! - `latest`: the name of the newest complete checkpoint.
//!
//! A checkpoint is assembled in a temporary directory, synced, and renamed into place, so it
//! appears whole or not at all; `latest` is replaced atomically afterwards. Readers that find
//! `latest` missing or stale fall back to the highest complete `step-*` directory. A checkpoint
//! is removed (pruned, or replaced by one of the same step) by first renaming it out of the
//! `step-*` namespace, so a crash during the removal never leaves a half-deleted `step-*`
//! behind; leftovers of a killed writer (`.tmp-*` of a dead process, `.removing-*`) are
//! deleted by the next save.
//!
//! For crash tests only: the environment variable `PEFT_CHECKPOINT_WRITE_DELAY_MS` makes every
//! save pause that many milliseconds before each file and rename, widening the window in which
//! a `kill -9` lands inside a checkpoint write (`crates/peft-cli/tests/crash_safety.rs`).

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use peft_core::native_format::{load_native_as, save_native};
use peft_core::peft_format::safetensors_bytes;
use peft_core::{AdaptableModel, NamedTensor, NativeAdapter};
use peft_io::TensorMap;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::{OptimizerState, ParamMoments};

/// Where training stands: optimiser steps done and the next micro-batch of the data plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainPosition {
    /// Optimiser steps completed.
    pub step: usize,
    /// Epoch of the next micro-batch.
    pub epoch: usize,
    /// Index of the next micro-batch in that epoch's plan.
    pub micro_batch: usize,
    /// Examples per micro-batch of the plan (batch size × devices) the position refers to; 0
    /// in checkpoints written before it was recorded.
    #[serde(default)]
    pub examples_per_micro_batch: usize,
}

/// A checkpoint read back, holding an adapter of type `A` (`AnyAdapter` for any built-in
/// method).
#[derive(Debug)]
pub struct Checkpoint<A> {
    /// The adapter.
    pub adapter: A,
    /// AdamW's moments and step counts.
    pub optimizer: OptimizerState,
    /// Where to continue.
    pub position: TrainPosition,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    position: TrainPosition,
    optimizer_steps: u64,
    /// Per parameter path: (shape, updates applied).
    params: Vec<(String, Vec<usize>, u64)>,
}

/// The checkpoint directory of a run.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.into(),
        source,
    }
}

/// The pause of `PEFT_CHECKPOINT_WRITE_DELAY_MS` (crash tests only; see the module docs).
fn write_delay() -> impl Fn() {
    let delay = std::env::var("PEFT_CHECKPOINT_WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(std::time::Duration::from_millis);
    move || {
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
    }
}

fn checkpoint_error(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.into(),
        message: message.into(),
    }
}

impl CheckpointDir {
    /// Checkpoints under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn name(step: usize) -> String {
        format!("step-{step:08}")
    }

    /// Complete checkpoints on disk, oldest first.
    pub fn list(&self) -> Vec<(usize, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut found: Vec<(usize, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step = name.strip_prefix("step-")?.parse().ok()?;
                Some((step, e.path()))
            })
            .filter(|(_, path)| path.join("state.json").is_file())
            .collect();
        found.sort();
        found
    }

    /// The name of the newest complete checkpoint, if any.
    pub fn latest_name(&self) -> Option<String> {
        self.list().last().map(|(step, _)| Self::name(*step))
    }

    /// Removes a checkpoint (or leftover) directory: renamed away first, then deleted.
    fn remove(&self, path: &Path) -> Result<()> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let doomed = self
            .root
            .join(format!(".removing-{name}-{}", std::process::id()));
        std::fs::rename(path, &doomed).map_err(io(path))?;
        std::fs::remove_dir_all(&doomed).map_err(io(&doomed))
    }

    /// Deletes what killed writers left: `.removing-*`, and `.tmp-*` of processes that are gone.
    fn remove_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = if name.starts_with(".removing-") {
                true
            } else if let Some(rest) = name.strip_prefix(".tmp-step-") {
                let pid = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
                // Only where /proc tells which processes exist; elsewhere leftovers stay.
                pid.is_some_and(|pid| {
                    pid != std::process::id()
                        && Path::new("/proc/self").exists()
                        && !Path::new("/proc").join(pid.to_string()).exists()
                })
            } else {
                false
            };
            if stale {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Writes a checkpoint and keeps the newest `keep` of them.
    ///
    /// # Errors
    /// I/O errors; nothing already on disk is lost.
    pub fn save<B: Backend, A: NativeAdapter<B>>(
        &self,
        adapter: &A,
        model: &dyn AdaptableModel<B>,
        optimizer: &OptimizerState,
        position: TrainPosition,
        keep: usize,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        self.remove_leftovers();
        let pause = write_delay();
        let name = Self::name(position.step);
        let temporary = self
            .root
            .join(format!(".tmp-{name}-{}", std::process::id()));
        if temporary.exists() {
            std::fs::remove_dir_all(&temporary).map_err(io(&temporary))?;
        }
        std::fs::create_dir_all(&temporary).map_err(io(&temporary))?;
        pause();
        save_native(adapter, model, &temporary.join("adapter"))?;
        pause();
        let mut tensors = Vec::with_capacity(2 * optimizer.params.len());
        for param in &optimizer.params {
            tensors.push(NamedTensor {
                key: format!("m.{}", param.path),
                shape: param.shape.clone(),
                values: param.m.clone(),
            });
            tensors.push(NamedTensor {
                key: format!("v.{}", param.path),
                shape: param.shape.clone(),
                values: param.v.clone(),
            });
        }
        let optimizer_path = temporary.join("optimizer.safetensors");
        peft_io::files::write_atomic(
            &optimizer_path,
            &safetensors_bytes(&tensors, &optimizer_path)?,
        )?;
        let state = StateFile {
            format_version: 1,
            position,
            optimizer_steps: optimizer.steps,
            params: optimizer
                .params
                .iter()
                .map(|p| (p.path.clone(), p.shape.clone(), p.step))
                .collect(),
        };
        pause();
        let state_path = temporary.join("state.json");
        let text = serde_json::to_string_pretty(&state).expect("state serialises");
        peft_io::files::write_atomic(&state_path, text.as_bytes())?;
        let destination = self.root.join(&name);
        pause();
        if destination.exists() {
            self.remove(&destination)?;
        }
        std::fs::rename(&temporary, &destination).map_err(io(&destination))?;
        if let Ok(dir) = std::fs::File::open(&self.root) {
            let _ = dir.sync_all();
        }
        pause();
        peft_io::files::write_atomic(&self.root.join("latest"), name.as_bytes())?;
        pause();
        let all = self.list();
        for (_, path) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            let _ = self.remove(path);
        }
        Ok(())
    }

    /// Reads the newest complete checkpoint, if there is one.
    ///
    /// # Errors
    /// A checkpoint that exists but cannot be read, or does not fit `model`.
    pub fn latest<B: Backend, A: NativeAdapter<B>>(
        &self,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Option<Checkpoint<A>>> {
        let Some((_, dir)) = self.list().pop() else {
            return Ok(None);
        };
        Self::read(&dir, model, device).map(Some)
    }

    /// Reads the checkpoint in `dir`.
    ///
    /// # Errors
    /// Unreadable or inconsistent files.
    pub fn read<B: Backend, A: NativeAdapter<B>>(
        dir: &Path,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Checkpoint<A>> {
        let state_path = dir.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
        let state: StateFile = serde_json::from_str(&text)
            .map_err(|e| checkpoint_error(&state_path, format!("malformed: {e}")))?;
        if state.format_version != 1 {
            return Err(checkpoint_error(
                &state_path,
                format!("format_version {} is not supported", state.format_version),
            ));
        }
        let adapter = load_native_as(&dir.join("adapter"), model, device)?;
        let optimizer_path = dir.join("optimizer.safetensors");
        let mut tensors = TensorMap::new(optimizer_path.display().to_string());
        tensors.add_safetensors(&optimizer_path)?;
        let mut params = Vec::with_capacity(state.params.len());
        for (path, shape, step) in state.params {
            let m = tensors.take_f32(&format!("m.{path}"), &shape)?;
            let v = tensors.take_f32(&format!("v.{path}"), &shape)?;
            params.push(ParamMoments {
                path,
                shape,
                step,
                m,
                v,
            });
        }
        tensors.finish()?;
        Ok(Checkpoint {
            adapter,
            optimizer: OptimizerState {
                steps: state.optimizer_steps,
                params,
            },
            position: state.position,
        })
    }
}
