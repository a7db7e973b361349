//! One entry point for adapter files of every format: detection, loading, saving.

use std::path::Path;

use burn::tensor::backend::Backend;

use crate::adapter::Adapter;
use crate::any_adapter::AnyAdapter;
use crate::error::{PeftError, Result};
use crate::model::AdaptableModel;
use crate::{native_format, official_format, peft_format};

/// The adapter file formats this crate reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// Hugging Face PEFT: `adapter_config.json` + `adapter_model.safetensors`.
    Peft,
    /// This crate's own format: `peft_rs_config.json` + `adapter.safetensors`.
    Native,
    /// The official LLaMA-Adapter v1 checkpoint (`.pth`, or the same tensors as `.safetensors`).
    Official,
}

/// Detects the format of `path` (a directory or a checkpoint file).
///
/// # Errors
/// Nothing recognisable at `path`, or a directory holding both PEFT's and this crate's
/// configuration (which adapter is meant cannot be told).
pub fn detect_format(path: &Path) -> Result<AdapterFormat> {
    if path.is_dir() {
        let native = path.join(native_format::CONFIG_FILE).is_file();
        let peft = path.join(peft_format::CONFIG_FILE).is_file();
        if native && peft {
            return Err(PeftError::Format {
                path: path.into(),
                message: format!(
                    "ambiguous adapter directory: it holds both {} (this crate's format) and {} \
                     (Hugging Face PEFT's); remove the adapter that is not wanted",
                    native_format::CONFIG_FILE,
                    peft_format::CONFIG_FILE
                ),
            });
        }
        if native {
            return Ok(AdapterFormat::Native);
        }
        if peft {
            return Ok(AdapterFormat::Peft);
        }
        if path.join("adapter.pth").is_file() {
            return Ok(AdapterFormat::Official);
        }
    } else if path.is_file() {
        return Ok(AdapterFormat::Official);
    }
    Err(PeftError::Io {
        path: path.into(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no adapter here: expected a directory with {} or {}, or an official LLaMA-Adapter .pth",
                peft_format::CONFIG_FILE,
                native_format::CONFIG_FILE
            ),
        ),
    })
}

/// Options of [`load_adapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Prompts per layer of an official LLaMA-Adapter checkpoint, which does not store it (the
    /// official default is 10); other formats store their sizes and ignore this.
    pub adapter_len: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { adapter_len: 10 }
    }
}

impl LoadOptions {
    /// Sets [`LoadOptions::adapter_len`].
    pub fn with_adapter_len(mut self, adapter_len: usize) -> Self {
        self.adapter_len = adapter_len;
        self
    }
}

/// Loads an adapter of any format for `model`.
///
/// # Errors
/// See [`detect_format`] and each format's loader.
pub fn load_adapter<B: Backend>(
    path: &Path,
    model: &dyn AdaptableModel<B>,
    options: &LoadOptions,
    device: &B::Device,
) -> Result<AnyAdapter<B>> {
    let adapter_len = options.adapter_len;
    match detect_format(path)? {
        AdapterFormat::Peft => crate::any_adapter::load_peft(path, model, device),
        AdapterFormat::Native => crate::any_adapter::load_native(path, model, device),
        AdapterFormat::Official => {
            let file = if path.is_dir() {
                path.join("adapter.pth")
            } else {
                path.to_path_buf()
            };
            Ok(AnyAdapter::AdaptionPrompt(official_format::load_official(
                &file,
                adapter_len,
                model,
                device,
            )?))
        }
    }
}

/// Whether PEFT's format can hold `adapter` exactly.
pub fn peft_representable<B: Backend>(
    adapter: &AnyAdapter<B>,
    model: &dyn AdaptableModel<B>,
) -> bool {
    match adapter {
        AnyAdapter::PrefixTuning(prefix) => prefix.projection.is_none(),
        _ => peft_format::peft_config(adapter, model).is_ok(),
    }
}

/// Saves `adapter` to the directory `dir` in `format`, or, with `None`, in PEFT's format where it
/// represents the adapter exactly and in this crate's format otherwise. Returns the format used.
///
/// Once saved, a PEFT or native adapter already in `dir` in another format (its configuration,
/// then its weights) is removed, so that the directory holds one adapter and loads as the one
/// just saved. An official `adapter.pth` already there is left alone when saving in another
/// format: the configuration file takes precedence over it when loading.
///
/// # Errors
/// A format that cannot hold the adapter, and I/O errors (naming the file).
pub fn save_adapter<B: Backend>(
    adapter: &AnyAdapter<B>,
    model: &dyn AdaptableModel<B>,
    dir: &Path,
    format: Option<AdapterFormat>,
) -> Result<AdapterFormat> {
    let format = format.unwrap_or(if peft_representable(adapter, model) {
        AdapterFormat::Peft
    } else {
        AdapterFormat::Native
    });
    // The other format's adapter, if `dir` holds one, goes in the same atomic step.
    let other = |format| {
        let (config, weights) = match format {
            AdapterFormat::Peft => (peft_format::CONFIG_FILE, peft_format::WEIGHTS_FILE),
            _ => (native_format::CONFIG_FILE, native_format::WEIGHTS_FILE),
        };
        if dir.join(config).is_file() {
            vec![config, weights]
        } else {
            Vec::new()
        }
    };
    match format {
        AdapterFormat::Peft => {
            let drop = other(AdapterFormat::Native);
            match adapter {
                AnyAdapter::PrefixTuning(prefix) if prefix.projection.is_some() => {
                    // PEFT saves the MLP's output, as we do here; training state is not kept.
                    let inference = AnyAdapter::PrefixTuning(prefix.clone().into_inference());
                    peft_format::save_peft_dropping(&inference, model, dir, &drop)?
                }
                _ => peft_format::save_peft_dropping(adapter, model, dir, &drop)?,
            }
        }
        AdapterFormat::Native => {
            let drop = other(AdapterFormat::Peft);
            native_format::save_native_dropping(adapter, model, dir, &drop)?
        }
        AdapterFormat::Official => {
            let AnyAdapter::AdaptionPrompt(prompt) = adapter else {
                return Err(PeftError::Unsupported(format!(
                    "the official LLaMA-Adapter format holds adaption prompts only, not {}",
                    adapter.method()
                )));
            };
            official_format::save_official(prompt, model, &dir.join("adapter.pth"))?
        }
    }
    for other in [AdapterFormat::Peft, AdapterFormat::Native] {
        if other != format {
            remove_adapter(dir, other)?;
        }
    }
    Ok(format)
}

/// Removes the PEFT or native adapter in `dir`, if there is one: its configuration first, so
/// that an interruption leaves at most an orphaned weight file, which nothing loads.
fn remove_adapter(dir: &Path, format: AdapterFormat) -> Result<()> {
    let (config, weights) = match format {
        AdapterFormat::Peft => (peft_format::CONFIG_FILE, peft_format::WEIGHTS_FILE),
        AdapterFormat::Native => (native_format::CONFIG_FILE, native_format::WEIGHTS_FILE),
        AdapterFormat::Official => return Ok(()),
    };
    let config = dir.join(config);
    // Without its configuration a weight file may belong to something else: the official
    // format's `.safetensors` variant is also called `adapter.safetensors`.
    if !config.is_file() {
        return Ok(());
    }
    for path in [config, dir.join(weights)] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(PeftError::Io { path, source: e })
            }
            _ => {}
        }
    }
    Ok(())
}
