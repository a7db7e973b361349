//! This crate's own adapter format, which round-trips every setting of every method exactly
//! (per-head and tanh gates, the prefix reparameterisation MLP) where PEFT's format cannot.
//!
//! A directory with `peft_rs_config.json` (the method, its configuration and the model sizes it
//! was made for) and `adapter.safetensors` (the adapter module's parameters under their Burn
//! module paths, written and read through `burn-store`). See `docs/adapter-format.md`.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use peft_io::files::{read_json, write_dir_atomic_dropping};
use peft_io::TensorMap;
use serde_json::{json, Value};

use crate::adapter::Adapter;
use crate::error::{PeftError, Result};
use crate::model::{AdaptableModel, ModelGeometry};

/// The configuration file.
pub const CONFIG_FILE: &str = "peft_rs_config.json";
/// The tensor file.
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
/// The format's version; bumped on incompatible changes.
pub const FORMAT_VERSION: u64 = 1;

/// The `model` entry of a manifest: the sizes an adapter was made for.
pub fn model_sizes(model: &ModelGeometry) -> Value {
    serde_json::to_value(model).expect("model sizes serialise")
}

/// A method whose adapters this crate's own format saves and loads exactly. Each method
/// implements it in its own file; this module keeps the directory layout (the manifest, the
/// tensor file, the checks before allocation).
pub trait NativeAdapter<B: Backend>: Adapter<B> + Sized {
    /// The manifest's `peft_type` (by default the method's PEFT name).
    fn native_type(&self) -> &'static str {
        self.method().peft_type()
    }

    /// The manifest's `config` entry: every setting needed to rebuild the adapter.
    fn native_config(&self) -> Value;

    /// Creates an adapter for `model` from a manifest whose parameters are then read from its
    /// tensor file. Call [`NativeConfig::check_parameters`] with the number of values the
    /// configuration implies before allocating anything.
    ///
    /// # Errors
    /// Another `peft_type`, a configuration that is invalid, does not fit `model` or does not
    /// match the tensor file's sizes.
    fn init_native(
        manifest: &NativeConfig<'_>,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self>;

    /// Writes the parameters into `store` (by default under the module's own Burn paths).
    ///
    /// # Errors
    /// What the store reports.
    fn save_tensors(&self, store: &mut SafetensorsStore, path: &Path) -> Result<()> {
        self.save_into(store).map_err(|e| PeftError::Format {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// Reads the parameters from the tensor file `path` (by default [`apply`]).
    ///
    /// # Errors
    /// A missing, unexpected or mis-shaped tensor.
    fn load_tensors(&mut self, path: &Path) -> Result<()> {
        apply(self, path)
    }
}

/// A checked manifest as [`NativeAdapter::init_native`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct NativeConfig<'a> {
    /// `peft_type`, if the manifest has one.
    pub peft_type: Option<&'a str>,
    /// The method's configuration.
    pub config: &'a Value,
    /// The manifest file.
    pub config_path: &'a Path,
    /// The tensor file beside it.
    pub weights: &'a Path,
}

impl NativeConfig<'_> {
    /// An error about the manifest.
    pub fn error(&self, message: impl Into<String>) -> PeftError {
        PeftError::Format {
            path: self.config_path.into(),
            message: message.into(),
        }
    }

    /// The configuration as `T`.
    ///
    /// # Errors
    /// A configuration `T` does not parse.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.config.clone())
            .map_err(|e| self.error(format!("`config`: {e}")))
    }

    /// Wraps a validation error of the configuration.
    pub fn invalid(&self, e: PeftError) -> PeftError {
        self.error(format!("`config`: {e}"))
    }

    /// Fails unless `peft_type` is `expected`.
    ///
    /// # Errors
    /// Another or no `peft_type`.
    pub fn expect_type(&self, expected: &str) -> Result<()> {
        if self.peft_type == Some(expected) {
            Ok(())
        } else {
            Err(self.error(format!(
                "peft_type {:?}, expected {expected}",
                self.peft_type
            )))
        }
    }

    /// Fails unless the tensor file holds `expected` values in all (`None`: the configuration's
    /// count overflows), reading only its header.
    ///
    /// # Errors
    /// See [`check_parameter_count`].
    pub fn check_parameters(&self, expected: Option<usize>) -> Result<()> {
        check_parameter_count(expected, self.config, self.config_path, self.weights)
    }
}

/// Saves `adapter` (made for `model`) in this crate's format, the directory created if needed
/// and replaced as a whole: a crash leaves the old adapter or the new one (see
/// [`peft_io::files::write_dir_atomic`]).
///
/// # Errors
/// I/O errors.
pub fn save_native<B: Backend, A: NativeAdapter<B>>(
    adapter: &A,
    model: &dyn AdaptableModel<B>,
    dir: &Path,
) -> Result<()> {
    save_native_dropping(adapter, model, dir, &[])
}

/// [`save_native`], removing the files `drop` (another format's adapter) in the same step.
pub(crate) fn save_native_dropping<B: Backend, A: NativeAdapter<B>>(
    adapter: &A,
    model: &dyn AdaptableModel<B>,
    dir: &Path,
    drop: &[&str],
) -> Result<()> {
    let manifest = json!({
        "format": "peft-rs",
        "format_version": FORMAT_VERSION,
        "peft_type": adapter.native_type(),
        "config": adapter.native_config(),
        "model": model_sizes(&model.geometry()),
    });
    let weights = dir.join(WEIGHTS_FILE);
    // No metadata: burn-store keeps it in a hash map, which would make the header (and so the
    // file) differ from run to run for the same tensors.
    let mut store = SafetensorsStore::from_bytes(None).clear_metadata();
    adapter.save_tensors(&mut store, &weights)?;
    let bytes = store.get_bytes().map_err(|e| PeftError::Format {
        path: weights.clone(),
        message: e.to_string(),
    })?;
    let text = serde_json::to_string_pretty(&manifest).expect("JSON values serialise");
    Ok(write_dir_atomic_dropping(
        dir,
        &[(WEIGHTS_FILE, &bytes), (CONFIG_FILE, text.as_bytes())],
        drop,
    )?)
}

/// Loads the tensors of the safetensors file `path` into `module`: every parameter must be
/// there with its shape, and nothing else may be.
///
/// # Errors
/// A missing or unreadable file, a missing, misshapen or unexpected tensor.
pub fn apply<B: Backend, M: ModuleSnapshot<B>>(module: &mut M, path: &Path) -> Result<()> {
    let format = |message: String| PeftError::Format {
        path: path.into(),
        message,
    };
    if !path.is_file() {
        return Err(PeftError::Io {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let mut store = SafetensorsStore::from_file(path)
        .allow_partial(true)
        .validate(true);
    let result = module
        .load_from(&mut store)
        .map_err(|e| format(e.to_string()))?;
    if let Some(error) = result.errors.first() {
        return Err(format(error.to_string()));
    }
    if let Some((key, _)) = result.missing.first() {
        return Err(format(format!("missing tensor '{key}'")));
    }
    if !result.unused.is_empty() {
        return Err(format(format!("unexpected tensor(s) {:?}", result.unused)));
    }
    Ok(())
}

/// Loads an adapter of method `A` saved by [`save_native`] for `model`.
///
/// # Errors
/// Malformed files, an adapter made for a model of other sizes, an invalid configuration or one
/// whose sizes do not match the tensor file's (checked before anything is allocated), and every
/// missing, unexpected or mis-shaped tensor.
pub fn load_native_as<B: Backend, A: NativeAdapter<B>>(
    dir: &Path,
    model: &dyn AdaptableModel<B>,
    device: &B::Device,
) -> Result<A> {
    let manifest = read_manifest(dir, &model.geometry())?;
    let view = NativeConfig {
        peft_type: manifest.peft_type.as_deref(),
        config: &manifest.config,
        config_path: &manifest.config_path,
        weights: &manifest.weights,
    };
    let mut adapter = A::init_native(&view, model, device)?;
    adapter.load_tensors(&manifest.weights)?;
    adapter.check_compatible(model)?;
    Ok(adapter)
}

/// The manifest of a peft-rs adapter directory, checked (format, version, model sizes); the
/// method's configuration is left to the caller.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// `peft_type`, if the manifest has one.
    pub peft_type: Option<String>,
    /// The method's configuration (`null` when absent).
    pub config: Value,
    /// The manifest file (for error messages).
    pub config_path: PathBuf,
    /// The tensor file beside it.
    pub weights: PathBuf,
}

/// Reads `dir`'s manifest and checks that it is a peft-rs adapter of a supported format version
/// made for a model of `model`'s sizes. Shared by every peft-rs adapter kind (the multimodal
/// adapter of `peft-vision` too).
///
/// # Errors
/// An unreadable or malformed manifest, another format or version, or another model's sizes.
pub fn read_manifest(dir: &Path, model: &ModelGeometry) -> Result<Manifest> {
    let config_path = dir.join(CONFIG_FILE);
    let manifest = read_json(&config_path)?;
    let format = |message: String| PeftError::Format {
        path: config_path.clone(),
        message,
    };
    if manifest.get("format").and_then(Value::as_str) != Some("peft-rs") {
        return Err(format(
            "not a peft-rs adapter (`format` is not \"peft-rs\")".into(),
        ));
    }
    let version = manifest
        .get("format_version")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if version != FORMAT_VERSION {
        return Err(format(format!(
            "format_version {version} is not supported (this build reads {FORMAT_VERSION})"
        )));
    }
    let expected = model_sizes(model);
    if manifest.get("model") != Some(&expected) {
        return Err(PeftError::Incompatible(format!(
            "{}: adapter made for a model with {}, this model has {expected}",
            config_path.display(),
            manifest.get("model").cloned().unwrap_or(Value::Null)
        )));
    }
    Ok(Manifest {
        peft_type: manifest
            .get("peft_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        config: manifest.get("config").cloned().unwrap_or(Value::Null),
        weights: dir.join(WEIGHTS_FILE),
        config_path,
    })
}

/// Fails unless the tensors of `weights` hold `expected` values in all, reading only the
/// file's header (with checked arithmetic: a hostile header cannot overflow it). `None` means
/// the expected count overflows `usize`: no file can match it.
///
/// # Errors
/// An unreadable tensor file, or another number of values.
pub fn check_parameter_count(
    expected: Option<usize>,
    config: &Value,
    config_path: &Path,
    weights: &Path,
) -> Result<()> {
    let mut tensors = TensorMap::new(weights.display().to_string());
    tensors.add_safetensors(weights)?;
    let found = tensors
        .keys()
        .map(|key| tensors.shape(key).unwrap_or_default())
        .try_fold(0usize, |sum, shape| {
            shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .and_then(|n| sum.checked_add(n))
        });
    if expected.is_some() && expected == found {
        return Ok(());
    }
    let expected = match expected {
        Some(n) => format!("{n} values"),
        None => "more values than this machine can address".into(),
    };
    let found = found.map_or_else(|| "more than can be addressed".into(), |n| n.to_string());
    Err(PeftError::Format {
        path: config_path.into(),
        message: format!(
            "`config` {config} needs {expected} for this model, but {} holds {found} \
             in {} tensor(s)",
            weights.display(),
            tensors.keys().count()
        ),
    })
}
