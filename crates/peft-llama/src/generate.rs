//! Text generation: greedy or sampled (temperature, top-k, top-p), batched, with a KV cache.

use burn::tensor::backend::Backend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use peft_core::LayerHooks;

use crate::cache::KvCache;
use crate::error::{LlamaError, Result};
use crate::model::{Llama, TokenBatch};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Tokens to generate at most per prompt.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 disables).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 disables).
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
    /// Token ids that end a sequence (kept in the output).
    pub eos_token_ids: Vec<u32>,
    /// Decode incrementally with a KV cache (`false` recomputes the whole sequence every step).
    pub use_cache: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            eos_token_ids: vec![2],
            use_cache: true,
        }
    }
}

/// One prompt's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The prompt as given.
    pub prompt_ids: Vec<u32>,
    /// The new tokens, ending with EOS if one was produced.
    pub generated_ids: Vec<u32>,
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], config: &GenerationConfig, rng: &mut StdRng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if config.temperature <= 0.0 {
        return argmax();
    }
    let mut candidates: Vec<(usize, f32)> = logits
        .iter()
        .map(|&v| v / config.temperature)
        .enumerate()
        .collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    if config.top_k > 0 {
        candidates.truncate(config.top_k);
    }
    let max = candidates[0].1;
    let mut probabilities: Vec<f32> = candidates.iter().map(|&(_, v)| (v - max).exp()).collect();
    let total: f32 = probabilities.iter().sum();
    probabilities.iter_mut().for_each(|p| *p /= total);
    if config.top_p < 1.0 {
        // Keep tokens until the cumulative probability reaches top_p (at least one).
        let mut cumulative = 0.0;
        let mut keep = 0;
        for &p in &probabilities {
            keep += 1;
            cumulative += p;
            if cumulative >= config.top_p {
                break;
            }
        }
        probabilities.truncate(keep);
        candidates.truncate(keep);
        let total: f32 = probabilities.iter().sum();
        probabilities.iter_mut().for_each(|p| *p /= total);
    }
    let draw: f32 = rng.random();
    let mut cumulative = 0.0;
    for (&(id, _), &p) in candidates.iter().zip(&probabilities) {
        cumulative += p;
        if draw < cumulative {
            return id as u32;
        }
    }
    candidates[candidates.len() - 1].0 as u32
}

/// Generates continuations of several prompts at once (left-padded into one batch).
///
/// # Errors
/// An empty prompt, or token ids outside the vocabulary.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    hooks: &dyn LayerHooks<B>,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Vec<Generation>> {
    if prompts.is_empty() {
        return Err(LlamaError::Input("no prompts".into()));
    }
    let batch = prompts.len();
    let vocab = model.config.vocab_size;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut finished = vec![false; batch];
    let pad = config.eos_token_ids.first().copied().unwrap_or(0);
    let mut cache = config
        .use_cache
        .then(|| KvCache::new(model.config.num_hidden_layers, batch));
    let mut step_input = TokenBatch::left_padded(prompts, pad)?;
    for _ in 0..config.max_new_tokens {
        let logits = model.forward(&step_input, hooks, cache.as_mut())?;
        let [_, seq, _] = logits.dims();
        let last = logits.narrow(1, seq - 1, 1).reshape([batch, vocab]);
        let values = last
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| LlamaError::Input(format!("reading logits: {e:?}")))?;
        let mut next = Vec::with_capacity(batch);
        for row in 0..batch {
            let token = sample(&values[row * vocab..(row + 1) * vocab], config, &mut rng);
            if !finished[row] {
                generated[row].push(token);
                finished[row] = config.eos_token_ids.contains(&token);
            }
            next.push(token);
        }
        if finished.iter().all(|&f| f) {
            break;
        }
        step_input = match &cache {
            Some(_) => TokenBatch {
                ids: next,
                batch,
                seq: 1,
                mask: None,
            },
            None => {
                let rows: Vec<Vec<u32>> = prompts
                    .iter()
                    .zip(&generated)
                    .map(|(p, g)| p.iter().chain(g).copied().collect())
                    .collect();
                // Finished rows stop growing; pad them so the batch stays rectangular.
                TokenBatch::left_padded(&rows, pad)?
            }
        };
    }
    Ok(prompts
        .iter()
        .zip(generated)
        .map(|(p, g)| Generation {
            prompt_ids: p.clone(),
            generated_ids: g,
        })
        .collect())
}
