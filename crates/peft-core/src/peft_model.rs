//! A frozen base model with several named adapters: add, switch, disable, merge.
//!
//! LLaMA-Adapter's "plug in expertise": one base, many small adapters, one active at a time.

use std::collections::BTreeMap;

use std::marker::PhantomData;

use burn::tensor::backend::Backend;

use crate::adapter::Adapter;
use crate::any_adapter::AnyAdapter;
use crate::error::{PeftError, Result};
use crate::hooks::{LayerHooks, NoHooks};
use crate::model::AdaptableModel;

/// A base model of any kind and its named adapters, of the built-in methods ([`AnyAdapter`], the
/// default) or of any other type implementing [`Adapter`].
///
/// The model's own forward pass takes [`PeftModel::hooks`]; model crates add a `forward` that
/// does so (`peft_llama::PeftLlama`).
#[derive(Debug)]
pub struct PeftModel<B: Backend, M: AdaptableModel<B>, A: Adapter<B> = AnyAdapter<B>> {
    base: M,
    adapters: BTreeMap<String, A>,
    active: Option<String>,
    enabled: bool,
    merged: Option<String>,
    backend: PhantomData<B>,
}

impl<B: Backend, M: AdaptableModel<B>> PeftModel<B, M> {
    /// Wraps a base model with no adapter, for adapters of the built-in methods.
    pub fn new(base: M) -> Self {
        Self::with_adapter_type(base)
    }
}

impl<B: Backend, M: AdaptableModel<B>, A: Adapter<B>> PeftModel<B, M, A> {
    /// Wraps a base model with no adapter, for adapters of type `A` (a method of one's own).
    pub fn with_adapter_type(base: M) -> Self {
        Self {
            base,
            adapters: BTreeMap::new(),
            active: None,
            enabled: true,
            merged: None,
            backend: PhantomData,
        }
    }

    /// Wraps `base` with `adapter` as its one, active adapter named `default` (PEFT's
    /// `get_peft_model`).
    ///
    /// # Errors
    /// The adapter does not fit the base model.
    pub fn with_adapter(base: M, adapter: A) -> Result<Self> {
        let mut model = Self::with_adapter_type(base);
        model.add_adapter("default", adapter)?;
        Ok(model)
    }

    /// The base model (with a merged adapter's weights, if one is merged).
    pub fn base(&self) -> &M {
        &self.base
    }

    /// Gives the base model back, refusing while a LoRA is merged into it.
    ///
    /// # Errors
    /// [`PeftError::Merged`].
    pub fn into_base(self) -> Result<M> {
        match self.merged {
            Some(name) => Err(PeftError::Merged(name)),
            None => Ok(self.base),
        }
    }

    /// Names of the loaded adapters.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.keys().map(String::as_str).collect()
    }

    /// The adapter of that name.
    pub fn adapter(&self, name: &str) -> Option<&A> {
        self.adapters.get(name)
    }

    /// The active adapter's name, if any.
    pub fn active_adapter(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// Whether adapters are applied (see [`PeftModel::disable_adapters`]).
    pub fn adapters_enabled(&self) -> bool {
        self.enabled
    }

    fn unknown(&self, name: &str) -> PeftError {
        PeftError::UnknownAdapter {
            name: name.into(),
            loaded: self.adapters.keys().cloned().collect(),
        }
    }

    fn refuse_if_merged(&self) -> Result<()> {
        match &self.merged {
            Some(name) => Err(PeftError::Merged(name.clone())),
            None => Ok(()),
        }
    }

    /// Adds an adapter under `name`; the first one added becomes active.
    ///
    /// # Errors
    /// The adapter does not fit the base model, or the name is taken.
    pub fn add_adapter(&mut self, name: impl Into<String>, adapter: impl Into<A>) -> Result<()> {
        let name = name.into();
        let adapter = adapter.into();
        adapter.check_compatible(&self.base)?;
        if self.adapters.contains_key(&name) {
            return Err(PeftError::Config(format!(
                "an adapter named `{name}` is already loaded"
            )));
        }
        self.adapters.insert(name.clone(), adapter);
        if self.active.is_none() {
            self.active = Some(name);
        }
        Ok(())
    }

    /// Removes an adapter.
    ///
    /// # Errors
    /// Unknown name, or the adapter is merged.
    pub fn remove_adapter(&mut self, name: &str) -> Result<A> {
        if self.merged.as_deref() == Some(name) {
            return Err(PeftError::Merged(name.into()));
        }
        let adapter = self
            .adapters
            .remove(name)
            .ok_or_else(|| self.unknown(name))?;
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
        Ok(adapter)
    }

    /// Makes `name` the active adapter.
    ///
    /// # Errors
    /// Unknown name, or another adapter is merged into the base weights.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        if !self.adapters.contains_key(name) {
            return Err(self.unknown(name));
        }
        if self.merged.as_deref().is_some_and(|merged| merged != name) {
            self.refuse_if_merged()?;
        }
        self.active = Some(name.into());
        Ok(())
    }

    /// Runs the base model alone until [`PeftModel::enable_adapters`].
    ///
    /// # Errors
    /// A merged LoRA: the base weights are not the base model's.
    pub fn disable_adapters(&mut self) -> Result<()> {
        self.refuse_if_merged()?;
        self.enabled = false;
        Ok(())
    }

    /// Applies the active adapter again.
    pub fn enable_adapters(&mut self) {
        self.enabled = true;
    }

    /// Merges the active adapter into the base weights (LoRA, in f32), so inference costs
    /// nothing extra.
    ///
    /// # Errors
    /// No active adapter, a method that cannot merge, or something already merged.
    pub fn merge_active(&mut self) -> Result<()> {
        self.refuse_if_merged()?;
        let name = self
            .active
            .clone()
            .ok_or_else(|| PeftError::Config("no active adapter to merge".into()))?;
        self.adapters[&name].merge_into(&mut self.base)?;
        self.merged = Some(name);
        Ok(())
    }

    /// Undoes [`PeftModel::merge_active`].
    ///
    /// # Errors
    /// Nothing is merged.
    pub fn unmerge(&mut self) -> Result<()> {
        let name = self
            .merged
            .take()
            .ok_or_else(|| PeftError::Config("no adapter is merged".into()))?;
        if let Err(error) = self.adapters[&name].unmerge_from(&mut self.base) {
            self.merged = Some(name);
            return Err(error);
        }
        Ok(())
    }

    /// The hooks of the active adapter (none when disabled, merged or absent), for the base
    /// model's forward pass.
    pub fn hooks(&self) -> Box<dyn LayerHooks<B> + '_> {
        match (&self.active, self.enabled, &self.merged) {
            (Some(name), true, None) => self.adapters[name].hooks(&self.base),
            _ => Box::new(NoHooks),
        }
    }
}
