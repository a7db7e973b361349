//! `peft logits`: the logits of given token ids, for checking numerics against other frameworks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor};
use peft_core::Adapter as _;
use peft_llama::{NoHooks, TokenBatch};
use safetensors::{Dtype, SafeTensors};

use crate::model_args::{AdapterArgs, ModelArgs};
use crate::AnyResult;

/// Write the logits of given token ids.
#[derive(clap::Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// safetensors file with `input_ids` [batch, seq] (int32 or int64) and optional
    /// `attention_mask` (1 = real token, right padding).
    #[arg(long)]
    input: PathBuf,
    /// Where to write float32 `logits` [batch, seq, vocab].
    #[arg(long)]
    output: PathBuf,
}

fn read_int_tensor(
    file: &SafeTensors,
    name: &str,
    path: &Path,
) -> AnyResult<Option<(Vec<i64>, Vec<usize>)>> {
    let Ok(view) = file.tensor(name) else {
        return Ok(None);
    };
    let bytes = view.data();
    let values: Vec<i64> = match view.dtype() {
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
            .collect(),
        other => {
            return Err(format!(
                "{}: `{name}` has dtype {other:?}, expected int32 or int64",
                path.display()
            )
            .into())
        }
    };
    Ok(Some((values, view.shape().to_vec())))
}

/// Runs `peft logits`.
pub fn run(args: LogitsArgs) -> AnyResult<()> {
    let model = args.model.load()?;
    let adapter = args.adapter.load(&model)?;
    let input = &args.input;
    let bytes = std::fs::read(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", input.display()))?;
    let (ids, shape) = read_int_tensor(&file, "input_ids", input)?
        .ok_or_else(|| format!("{}: no `input_ids` tensor", input.display()))?;
    if shape.len() != 2 {
        return Err(format!(
            "{}: `input_ids` must be [batch, seq], found {shape:?}",
            input.display()
        )
        .into());
    }
    let (batch, seq) = (shape[0], shape[1]);
    let mask = match read_int_tensor(&file, "attention_mask", input)? {
        Some((values, mask_shape)) if mask_shape == shape => {
            Some(values.iter().map(|&v| v != 0).collect())
        }
        Some((_, mask_shape)) => {
            return Err(format!(
                "{}: `attention_mask` has shape {mask_shape:?}, `input_ids` {shape:?}",
                input.display()
            )
            .into())
        }
        None => None,
    };
    let ids = ids
        .iter()
        .map(|&id| {
            u32::try_from(id)
                .map_err(|_| format!("{}: token id {id} is out of range", input.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tokens = TokenBatch {
        ids,
        batch,
        seq,
        mask,
    };
    let hooks = match &adapter {
        Some(adapter) => adapter.hooks(&model),
        None => Box::new(NoHooks),
    };
    let logits = model.forward(&tokens, hooks.as_ref(), None)?;
    write_logits(&args.output, logits)
}

fn write_logits<B: Backend>(path: &Path, logits: Tensor<B, 3>) -> AnyResult<()> {
    let shape = logits.dims().to_vec();
    let values = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| format!("{e:?}"))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::F32, shape, &bytes)?;
    let tensors = HashMap::from([("logits".to_string(), view)]);
    let serialized = safetensors::serialize(&tensors, None)?;
    peft_io::files::write_atomic(path, &serialized)?;
    Ok(())
}
