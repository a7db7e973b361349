//! Data-parallel gradients: one replica of the frozen model per device, each on its own shard of
//! every micro-batch, the adapter's gradients summed onto the first device through Burn's
//! collectives (`burn-collective`).
//!
//! Only the adapter travels: the main thread keeps the one adapter and the one optimiser; every
//! step it hands each worker a copy of the adapter (forked to the worker's device), the workers
//! and the main thread run forward and backward on their shards, and every gradient tensor is
//! reduced (summed) onto replica 0 in the module's visiting order, the same on every replica.
//! The optimiser then steps once on the summed gradients, so checkpoints, resumption and the
//! optimiser state are those of a one-device run.
//!
//! Each replica's loss is weighted so that the sum is the gradient of the one-device step: a
//! micro-batch of weight `w` split into shards with `t_r` target tokens gives shard `r` the
//! weight `w · t_r / Σ t`. Shards pad only to their own longest example; with right padding and
//! causal attention that changes no real token's loss.
//!
//! How the gradients move is Burn's: `burn-collective` runs a tree reduction whose transfers are
//! `float_to_device`; on the CUDA backend (cubecl-cuda 0.10) a transfer between two GPUs is an
//! NCCL send/receive pair (cudarc's dynamically loaded `libnccl`), on one CPU device it is no
//! transfer at all.
//!
//! `burn-collective` keeps one collective server per backend type and process, so one
//! data-parallel run per backend and process is active at a time: [`DataParallel::start`] waits
//! for a running one to finish.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorPrimitive};
use comm::{CollectiveConfig, PeerId, ReduceOperation};
use peft_core::Adapter;
use peft_llama::Llama;

use crate::data::Batch;
use crate::error::{Result, TrainError};
use crate::loss::causal_lm_loss_of;

/// One replica's share of an optimiser step: micro-batches (shards) with their loss weights.
pub type ReplicaWork = Vec<(Batch, f64)>;

/// What the replicas computed in one step, summed over replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTotals {
    /// Σ weight · loss: the step's loss.
    pub loss: f64,
    /// Real (unpadded) tokens.
    pub real_tokens: usize,
    /// Tokens including padding.
    pub padded_tokens: usize,
    /// Seconds the main thread spent in the gradient reduction (waiting for the slowest replica
    /// included).
    pub reduce_seconds: f64,
}

/// A replica's report to the main thread.
#[derive(Debug, Default)]
struct Outcome {
    totals: StepTotals,
    error: Option<TrainError>,
}

enum Job<A> {
    /// Compute gradients of `adapter` on `work`, seeding the device with `seed` first.
    Step {
        adapter: A,
        work: ReplicaWork,
        seed: u64,
    },
    /// Reduce zero gradients of `adapter`'s shapes (communication timing).
    ReduceOnly { adapter: A },
}

struct Worker<A> {
    jobs: Option<Sender<Job<A>>>,
    outcomes: Receiver<Outcome>,
    thread: Option<JoinHandle<()>>,
}

/// Burn's collectives with the `parallel` feature; without it, stand-ins that are never reached
/// (`DataParallel::start` refuses a second replica first), so that one replica needs no
/// collective, server or async runtime in the build.
#[cfg(feature = "parallel")]
mod comm {
    pub use burn_collective::{
        finish_collective, reduce, register, reset_collective, CollectiveConfig, CollectiveError,
        PeerId, ReduceOperation,
    };
}

#[cfg(not(feature = "parallel"))]
mod comm {
    use burn::tensor::backend::Backend;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct PeerId(pub u32);

    impl From<usize> for PeerId {
        fn from(value: usize) -> Self {
            Self(value as u32)
        }
    }

    #[derive(Debug, Clone, Default)]
    pub struct CollectiveConfig {
        devices: usize,
    }

    impl CollectiveConfig {
        pub fn with_num_devices(self, devices: usize) -> Self {
            Self { devices }
        }
    }

    #[derive(Debug)]
    pub struct CollectiveError;

    pub enum ReduceOperation {
        Sum,
    }

    #[allow(clippy::extra_unused_type_parameters)] // the signature of the real one
    pub fn reset_collective<B: Backend>() {}

    pub fn register<B: Backend>(
        _: PeerId,
        _: B::Device,
        config: CollectiveConfig,
    ) -> Result<(), CollectiveError> {
        let _ = config.devices;
        Err(CollectiveError)
    }

    #[allow(clippy::extra_unused_type_parameters)] // the signature of the real one
    pub fn finish_collective<B: Backend>(_: PeerId) -> Result<(), CollectiveError> {
        Ok(())
    }

    pub fn reduce<B: Backend>(
        _: PeerId,
        _: B::FloatTensorPrimitive,
        _: ReduceOperation,
        _: PeerId,
    ) -> Result<Option<B::FloatTensorPrimitive>, CollectiveError> {
        Err(CollectiveError)
    }
}

/// `burn-collective`'s server is per backend type and process: one run at a time.
static SESSION: Mutex<()> = Mutex::new(());

const ROOT: PeerId = PeerId(0);

/// Replicas of the frozen model on several devices that compute one step's gradients together.
///
/// Replica 0 is the caller's model on the main thread; the others live on worker threads, one
/// per device. With one replica no thread or collective is involved.
pub struct DataParallel<B: AutodiffBackend, A> {
    workers: Vec<Worker<A>>,
    devices: Vec<B::Device>,
    /// Set when a step failed part-way: the workers may be out of step, so they are not joined.
    poisoned: bool,
    _session: Option<MutexGuard<'static, ()>>,
}

impl<B, A> DataParallel<B, A>
where
    B: AutodiffBackend,
    A: Adapter<B> + AutodiffModule<B> + Clone + Send + 'static,
{
    /// Starts one worker thread per model of `replicas` (each already on its own device) and
    /// registers all replicas, `main_device` first, with the collective.
    ///
    /// # Errors
    /// The collective refuses the registration.
    pub fn start(main_device: &B::Device, replicas: Vec<Llama<B>>) -> Result<Self> {
        let mut devices = vec![main_device.clone()];
        devices.extend(replicas.iter().map(Llama::device));
        if replicas.is_empty() {
            return Ok(Self {
                workers: Vec::new(),
                devices,
                poisoned: false,
                _session: None,
            });
        }
        if cfg!(not(feature = "parallel")) {
            return Err(TrainError::parallel(format!(
                "{} devices asked for, but peft-train was built without its `parallel` feature \
                 (Burn's collectives); enable it to train on more than one device",
                devices.len()
            )));
        }
        let session = SESSION
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Whatever an earlier, failed session left registered is forgotten.
        comm::reset_collective::<B::InnerBackend>();
        let peers = devices.len();
        let config = CollectiveConfig::default().with_num_devices(peers);
        let mut workers = Vec::with_capacity(replicas.len());
        for (index, base) in replicas.into_iter().enumerate() {
            let rank = index + 1;
            let (jobs, job_rx) = channel::<Job<A>>();
            let (outcome_tx, outcomes) = channel();
            let config = config.clone();
            let thread = std::thread::Builder::new()
                .name(format!("peft-replica-{rank}"))
                .spawn(move || worker::<B, A>(rank, base, config, job_rx, outcome_tx))
                .map_err(|e| TrainError::parallel(format!("spawn: {e}")))?;
            workers.push(Worker {
                jobs: Some(jobs),
                outcomes,
                thread: Some(thread),
            });
        }
        let mut this = Self {
            workers,
            devices,
            poisoned: false,
            _session: Some(session),
        };
        if let Err(e) = comm::register::<B::InnerBackend>(ROOT, main_device.clone(), config) {
            this.poisoned = true;
            return Err(collective_error("register", e));
        }
        // Each worker reports its own registration.
        this.collect(Outcome::default())?;
        Ok(this)
    }

    /// Number of replicas (devices), the main one included.
    pub fn replicas(&self) -> usize {
        self.devices.len()
    }

    /// The devices, replica 0 first.
    pub fn devices(&self) -> &[B::Device] {
        &self.devices
    }

    /// Gradients of `adapter` for one optimiser step: replica `r` runs `work[r]` (micro-batches
    /// with their loss weights) and the gradients are summed onto `base`'s device. Replica `r`
    /// seeds its device with `seed + r·2^32` first (dropout).
    ///
    /// # Errors
    /// `work` not one entry per replica; any replica's model, data or collective error (every
    /// replica still takes part in the reduction, so the others do not wait forever).
    pub fn gradients(
        &mut self,
        base: &Llama<B>,
        adapter: &A,
        mut work: Vec<ReplicaWork>,
        seed: u64,
    ) -> Result<(GradientsParams, StepTotals)> {
        if work.len() != self.replicas() {
            return Err(TrainError::parallel(format!(
                "{} shards of work for {} replicas",
                work.len(),
                self.replicas()
            )));
        }
        let own = work.remove(0);
        let mut shards = work.into_iter();
        self.dispatch(|rank| Job::Step {
            adapter: adapter.clone(),
            work: shards.next().unwrap_or_default(),
            seed: seed.wrapping_add(((rank + 1) as u64) << 32),
        })?;
        B::seed(&base.device(), seed);
        let (grads, mut outcome) = replica_gradients(base, adapter, &own);
        if self.workers.is_empty() {
            return match outcome.error {
                Some(e) => Err(e),
                None => Ok((grads, outcome.totals)),
            };
        }
        let started = Instant::now();
        let reduced = reduce(ROOT, adapter, grads);
        outcome.totals.reduce_seconds = started.elapsed().as_secs_f64();
        let reduced = match reduced {
            Ok(grads) => grads,
            Err(e) => {
                self.poisoned = true;
                outcome.error.get_or_insert(e);
                GradientsParams::new()
            }
        };
        let totals = self.collect(outcome)?;
        Ok((reduced, totals))
    }

    /// Seconds one reduction of `adapter`'s gradients takes with every replica idle and ready
    /// (mean of `rounds`): the communication cost of a step.
    ///
    /// # Errors
    /// A collective error.
    pub fn time_reduction(&mut self, adapter: &A, rounds: usize) -> Result<f64> {
        if self.workers.is_empty() {
            return Ok(0.0);
        }
        let rounds = rounds.max(1);
        let device = self.devices[0].clone();
        let sync =
            || B::sync(&device).map_err(|e| TrainError::parallel(format!("device sync: {e:?}")));
        let mut total = 0.0;
        for _ in 0..rounds {
            // Before the workers are given anything: an error here leaves none of them waiting.
            sync()?;
            self.dispatch(|_| Job::ReduceOnly {
                adapter: adapter.clone(),
            })?;
            let started = Instant::now();
            let reduced = reduce(ROOT, adapter, GradientsParams::new());
            let synced = sync();
            total += started.elapsed().as_secs_f64();
            self.collect(Outcome {
                error: reduced.err().or(synced.err()),
                ..Outcome::default()
            })?;
        }
        Ok(total / rounds as f64)
    }

    /// Sends every worker its job (`job(index)`, index 0 being replica 1); a worker that has
    /// stopped poisons the session, since the others may now wait for it in the collective.
    fn dispatch(&mut self, mut job: impl FnMut(usize) -> Job<A>) -> Result<()> {
        for (index, worker) in self.workers.iter().enumerate() {
            let sent = worker
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send(job(index)).is_ok());
            if !sent {
                self.poisoned = true;
                return Err(TrainError::parallel(format!(
                    "replica {} has stopped",
                    index + 1
                )));
            }
        }
        Ok(())
    }

    /// Waits for every worker's outcome; adds them to `own` and returns the first error, the
    /// main replica's first.
    fn collect(&mut self, own: Outcome) -> Result<StepTotals> {
        let mut totals = own.totals;
        let mut error = own.error;
        for (rank, worker) in self.workers.iter().enumerate() {
            match worker.outcomes.recv() {
                Ok(outcome) => {
                    totals.loss += outcome.totals.loss;
                    totals.real_tokens += outcome.totals.real_tokens;
                    totals.padded_tokens += outcome.totals.padded_tokens;
                    if error.is_none() {
                        error = outcome.error;
                    }
                }
                Err(_) => {
                    self.poisoned = true;
                    error.get_or_insert_with(|| {
                        TrainError::parallel(format!(
                            "replica {} stopped without a result",
                            rank + 1
                        ))
                    });
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(totals),
        }
    }
}

impl<B: AutodiffBackend, A> Drop for DataParallel<B, A> {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            worker.jobs = None;
        }
        if self.poisoned {
            // A worker may be blocked in the collective; the process ends it.
            return;
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
        if !self.workers.is_empty() {
            let _ = comm::finish_collective::<B::InnerBackend>(ROOT);
        }
    }
}

fn collective_error(what: &str, error: comm::CollectiveError) -> TrainError {
    TrainError::parallel(format!("collective {what}: {error:?}"))
}

/// A worker thread: registers, then serves jobs until the main thread hangs up.
fn worker<B, A>(
    rank: usize,
    base: Llama<B>,
    config: CollectiveConfig,
    jobs: Receiver<Job<A>>,
    outcomes: Sender<Outcome>,
) where
    B: AutodiffBackend,
    A: Adapter<B> + AutodiffModule<B> + Clone,
{
    let device = base.device();
    let peer = PeerId::from(rank);
    let registered = comm::register::<B::InnerBackend>(peer, device.clone(), config);
    let failed = registered.is_err();
    let _ = outcomes.send(Outcome {
        error: registered.err().map(|e| collective_error("register", e)),
        ..Outcome::default()
    });
    if failed {
        return;
    }
    while let Ok(job) = jobs.recv() {
        let outcome = match job {
            Job::Step {
                adapter,
                work,
                seed,
            } => {
                B::seed(&device, seed);
                let adapter = adapter.fork(&device);
                let (grads, mut outcome) = replica_gradients(&base, &adapter, &work);
                if let Err(e) = reduce(peer, &adapter, grads) {
                    outcome.error.get_or_insert(e);
                }
                outcome
            }
            Job::ReduceOnly { adapter } => {
                let adapter = adapter.fork(&device);
                Outcome {
                    error: reduce(peer, &adapter, GradientsParams::new()).err(),
                    ..Outcome::default()
                }
            }
        };
        if outcomes.send(outcome).is_err() {
            break;
        }
    }
    let _ = comm::finish_collective::<B::InnerBackend>(peer);
}

/// Forward and backward of `work` on one replica. Never returns early: on an error or a panic
/// the gradients are empty (the reduction then contributes zeros) and the error is reported.
fn replica_gradients<B, A>(
    base: &Llama<B>,
    adapter: &A,
    work: &[(Batch, f64)],
) -> (GradientsParams, Outcome)
where
    B: AutodiffBackend,
    A: Adapter<B> + AutodiffModule<B>,
{
    let run = || -> Result<(GradientsParams, StepTotals)> {
        let mut accumulator = GradientsAccumulator::<A>::new();
        let mut totals = StepTotals::default();
        for (batch, weight) in work {
            let hooks = batch.hooks(adapter, base, &base.device())?;
            let loss = causal_lm_loss_of(base, &batch.tokens, hooks.as_ref(), &batch.labels)?;
            drop(hooks);
            let value: f64 = loss.loss.clone().into_scalar().elem();
            totals.loss += value * weight;
            totals.real_tokens += batch.real_tokens;
            totals.padded_tokens += batch.tokens.batch * batch.tokens.seq;
            let grads = GradientsParams::from_grads((loss.loss * *weight).backward(), adapter);
            accumulator.accumulate(adapter, grads);
        }
        Ok((accumulator.grads(), totals))
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok((grads, totals))) => (
            grads,
            Outcome {
                totals,
                error: None,
            },
        ),
        Ok(Err(e)) => (
            GradientsParams::new(),
            Outcome {
                error: Some(e),
                ..Outcome::default()
            },
        ),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            (
                GradientsParams::new(),
                Outcome {
                    error: Some(TrainError::parallel(format!(
                        "a replica panicked: {message}"
                    ))),
                    ..Outcome::default()
                },
            )
        }
    }
}

/// Sums every trainable parameter's gradient over the replicas onto [`ROOT`], parameter by
/// parameter in `module`'s visiting order (identical on every replica). A missing gradient
/// counts as zeros. Returns the sums on the root, nothing elsewhere.
fn reduce<B: AutodiffBackend, M: AutodiffModule<B>>(
    peer: PeerId,
    module: &M,
    grads: GradientsParams,
) -> Result<GradientsParams> {
    struct Reduce {
        peer: PeerId,
        grads: GradientsParams,
        reduced: GradientsParams,
        error: Option<comm::CollectiveError>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Reduce {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if !value.is_require_grad() {
                return;
            }
            let id = param.id;
            let grad = self
                .grads
                .remove::<B::InnerBackend, D>(id)
                .unwrap_or_else(|| value.inner().zeros_like());
            // Every replica calls the collective for every parameter, even after an error,
            // so that none waits for a call that never comes.
            match comm::reduce::<B::InnerBackend>(
                self.peer,
                grad.into_primitive().tensor(),
                ReduceOperation::Sum,
                ROOT,
            ) {
                Ok(Some(sum)) => self.reduced.register(
                    id,
                    Tensor::<B::InnerBackend, D>::from_primitive(TensorPrimitive::Float(sum)),
                ),
                Ok(None) => {}
                Err(e) => {
                    self.error.get_or_insert(e);
                }
            }
        }
    }
    let mut reduce = Reduce {
        peer,
        grads,
        reduced: GradientsParams::new(),
        error: None,
    };
    module.visit(&mut reduce);
    match reduce.error {
        Some(e) => Err(collective_error("reduce", e)),
        None => Ok(reduce.reduced),
    }
}

#[cfg(all(test, not(feature = "parallel")))]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use peft_core::AnyAdapter;

    type B = Autodiff<NdArray<f32>>;

    #[test]
    fn without_the_parallel_feature_a_second_device_is_refused_by_name() {
        let config = peft_llama::LlamaConfig::new(48, 32, 48, 4, 4, 2, 8);
        let device = Default::default();
        let replica = config.init::<B>(&device, burn::tensor::DType::F32);
        let error = DataParallel::<B, AnyAdapter<B>>::start(&device, vec![replica])
            .err()
            .expect("two devices without the feature")
            .to_string();
        assert!(error.contains("`parallel` feature"), "{error}");
        assert!(DataParallel::<B, AnyAdapter<B>>::start(&device, Vec::new()).is_ok());
    }
}
