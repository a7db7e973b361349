//! A frozen base model with several named adapters: add, switch, disable, merge.
//!
//! LLaMA-Adapter's "plug in expertise": one base, many small adapters, one active at a time.

use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, Tensor};
use peft_llama::{
    generate, Generation, GenerationConfig, KvCache, LayerHooks, Llama, NoHooks, TokenBatch,
};

use crate::any_adapter::AnyAdapter;
use crate::error::{PeftError, Result};

/// A base model and its named adapters.
#[derive(Debug)]
pub struct PeftModel<B: Backend> {
    base: Llama<B>,
    adapters: BTreeMap<String, AnyAdapter<B>>,
    active: Option<String>,
    enabled: bool,
    merged: Option<String>,
}

impl<B: Backend> PeftModel<B> {
    /// Wraps a base model with no adapter.
    pub fn new(base: Llama<B>) -> Self {
        Self {
            base,
            adapters: BTreeMap::new(),
            active: None,
            enabled: true,
            merged: None,
        }
    }

    /// The base model (with a merged LoRA's weights, if one is merged).
    pub fn base(&self) -> &Llama<B> {
        &self.base
    }

    /// Gives the base model back, refusing while a LoRA is merged into it.
    ///
    /// # Errors
    /// [`PeftError::Merged`].
    pub fn into_base(self) -> Result<Llama<B>> {
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
    pub fn adapter(&self, name: &str) -> Option<&AnyAdapter<B>> {
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
    pub fn add_adapter(
        &mut self,
        name: impl Into<String>,
        adapter: impl Into<AnyAdapter<B>>,
    ) -> Result<()> {
        let name = name.into();
        let adapter = adapter.into();
        adapter.check_compatible(&self.base.config)?;
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
    pub fn remove_adapter(&mut self, name: &str) -> Result<AnyAdapter<B>> {
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

    /// Merges the active LoRA into the base weights (in f32), so inference costs nothing extra.
    ///
    /// # Errors
    /// No active adapter, a method that cannot merge, or something already merged.
    pub fn merge_active(&mut self) -> Result<()> {
        self.refuse_if_merged()?;
        let name = self
            .active
            .clone()
            .ok_or_else(|| PeftError::Config("no active adapter to merge".into()))?;
        match &self.adapters[&name] {
            AnyAdapter::Lora(lora) => {
                // Cloning a module only clones reference-counted parameter handles.
                self.base = lora.merge_into(self.base.clone());
                self.merged = Some(name);
                Ok(())
            }
            other => Err(PeftError::Unsupported(format!(
                "{} adapters change attention, not weights: they cannot be merged into the base model",
                other.method()
            ))),
        }
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
        if let AnyAdapter::Lora(lora) = &self.adapters[&name] {
            self.base = lora.unmerge_from(self.base.clone());
        }
        Ok(())
    }

    /// The hooks of the active adapter (none when disabled, merged or absent).
    pub fn hooks(&self) -> Box<dyn LayerHooks<B> + '_> {
        match (&self.active, self.enabled, &self.merged) {
            (Some(name), true, None) => self.adapters[name].hooks(&self.base),
            _ => Box::new(NoHooks),
        }
    }

    /// Logits `[batch, seq, vocab]` with the active adapter.
    ///
    /// # Errors
    /// See [`Llama::forward`].
    pub fn forward(
        &self,
        tokens: &TokenBatch,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        Ok(self.base.forward(tokens, self.hooks().as_ref(), cache)?)
    }

    /// Generates with the active adapter (its prompt keys/values prepared once for all steps).
    ///
    /// # Errors
    /// See [`generate`].
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
    ) -> Result<Vec<Generation>> {
        Ok(generate(
            &self.base,
            self.hooks().as_ref(),
            prompts,
            config,
        )?)
    }
}
