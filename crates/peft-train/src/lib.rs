//! Training for parameter-efficient LLaMA fine-tuning in Burn: Alpaca data and batching, the
//! masked causal-LM loss, AdamW with PyTorch semantics and the LLaMA-Adapter learning-rate
//! schedule.
//!
//! One epoch, as the official LLaMA-Adapter `alpaca_finetuning_v1` code trains:
//!
//! ```no_run
//! use peft_llama::LlamaTokenizer;
//! use peft_train::{
//!     load_alpaca, split_validation, tokenize_alpaca_records, AdamWConfig, BatchingConfig,
//!     LrScheduleConfig,
//! };
//! # type B = burn::backend::Autodiff<burn::backend::NdArray>;
//! let tokenizer = LlamaTokenizer::from_dir("models/stories260k")?;
//! let records = load_alpaca("alpaca_data.json")?;
//! let (train, _validation) = split_validation(records, 200, 0)?;
//! let train = tokenize_alpaca_records(&train, &tokenizer, 512)?;
//! let batcher = BatchingConfig::new(4).with_seed(0).init()?;
//! let schedule = LrScheduleConfig::new(9e-3, 4, 5.0).with_warmup_epochs(2.0).init()?;
//! let mut optimizer = AdamWConfig::llama_adapter().init::<B>()?;
//! let steps_per_epoch = batcher.num_batches(train.examples.len());
//! for (step, batch) in batcher.batches(&train.examples, 0).enumerate() {
//!     let batch = batch?;
//!     let lr = schedule.at_step(step, steps_per_epoch);
//!     // logits = model.forward(&batch.tokens, ...);
//!     // let out = peft_train::causal_lm_loss(logits, &batch.labels)?;
//!     // let grads = GradientsParams::from_grads(out.loss.backward(), &adapter);
//!     // (adapter, report) = optimizer.step(lr, adapter, grads);
//!     # let _ = (lr, &mut optimizer);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod fit;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod schedule;
pub mod trainer;

pub use checkpoint::{Checkpoint, CheckpointDir, TrainPosition};
pub use data::{
    alpaca_prompt, chat_prompt_messages, instruction_message, load_alpaca, load_pretokenized,
    split_validation, tokenize_alpaca, tokenize_alpaca_records, tokenize_chat,
    tokenize_instruction, tokenize_instruction_records, AlpacaRecord, Batch, BatchFeatures,
    BatchStrategy, Batcher, BatchingConfig, Example, InstructionFormat, TokenizedDataset,
    DEFAULT_MAX_SEQ_LEN, IGNORE_INDEX, PROMPT_WITHOUT_INPUT, PROMPT_WITH_INPUT,
};
pub use error::{RecordLocation, Result, TrainError};
pub use fit::{fit, FitConfig, FitSummary};
pub use loss::{causal_lm_loss, causal_lm_loss_of, CausalLmLoss};
pub use metrics::{MetricsLog, StepMetrics};
pub use optim::{
    clip_grad_norm, grad_norm, micro_batch_weights, AccumulationWeighting, AdamW, AdamWConfig,
    OptimizerState, ParamMoments, StepReport, WeightDecayRule,
};
pub use parallel::{DataParallel, ReplicaWork, StepTotals};
pub use schedule::{LrSchedule, LrScheduleConfig};
pub use trainer::{
    evaluate, evaluate_base, train, train_data_parallel, Quiet, TrainObserver, TrainPlan,
    TrainSummary, TrainableAdapter, TrainerConfig,
};
