//! Parallel batching: samples are drawn and transformed on rayon's pool, each with its own
//! random stream from `(seed, epoch, index)`, so a batch is the same whatever the thread count.

use crate::error::{ErrorPolicy, Problem};
use crate::rng::Rng;
use crate::transforms::TransformConfig;
use crate::{collate, Batch, DataError, Dataset, Sample};
use candle_core::Device;
use glip_core::prompt::CaptionTokenizer;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Turns a dataset into batches.
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    tokenizer: Arc<dyn CaptionTokenizer>,
    /// Transforms applied to every sample.
    pub transforms: TransformConfig,
    /// Images per batch.
    pub batch_size: usize,
    /// Reshuffle the order every epoch.
    pub shuffle: bool,
    /// Seed of the order and of the transforms.
    pub seed: u64,
    /// What a sample that fails to load does: stop (default) or be left out and counted.
    pub on_error: ErrorPolicy,
    /// Batches made ahead of training by a worker thread ([`Loader::for_steps`]); 0 makes each
    /// when it is asked for.
    pub prefetch: usize,
    /// This process's part of each global batch in data-parallel training: `(rank, world)`,
    /// `(0, 1)` for one process. Set with [`Loader::sharded`].
    shard: (usize, usize),
    skipped: Mutex<Vec<Problem>>,
    device: Device,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("len", &self.dataset.len())
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl Loader {
    /// A loader over `dataset` with `tokenizer`, batches of `batch_size` on `device`.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        tokenizer: Arc<dyn CaptionTokenizer>,
        batch_size: usize,
        device: Device,
    ) -> Self {
        Self {
            dataset,
            tokenizer,
            transforms: TransformConfig::default(),
            batch_size: batch_size.max(1),
            shuffle: false,
            seed: 0,
            on_error: ErrorPolicy::Fail,
            prefetch: 0,
            shard: (0, 1),
            skipped: Mutex::new(Vec::new()),
            device,
        }
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// For data-parallel training over `world` processes, the loader of process `rank`: every
    /// process walks the same order (same seed), and step `s`'s global batch of
    /// `world * batch_size` samples is cut into `world` consecutive parts, this process taking
    /// part `rank`. Each epoch then has `len / (world * batch_size)` steps, every part full (the
    /// remainder is left out, as PyTorch's `DistributedSampler` with `drop_last`); for
    /// `world == 1` nothing changes. An error when `rank >= world` or the dataset holds less than
    /// one global batch.
    pub fn sharded(mut self, rank: usize, world: usize) -> Result<Self, DataError> {
        let global = self.batch_size * world;
        if world == 0 || rank >= world || (world > 1 && self.dataset.len() < global) {
            return Err(DataError::Record {
                file: "<loader>".into(),
                record: format!("shard {rank} of {world}"),
                problem: format!(
                    "needs rank < world and at least one global batch ({world} x {} samples); the \
                     dataset has {}",
                    self.batch_size,
                    self.dataset.len()
                ),
            });
        }
        self.shard = (rank, world);
        Ok(self)
    }

    /// `(rank, world)`: this loader's part of each global batch (see [`Loader::sharded`]).
    pub fn shard(&self) -> (usize, usize) {
        self.shard
    }

    /// Batches per epoch (for one process the last may be smaller; sharded, all are full).
    pub fn num_batches(&self) -> usize {
        match self.shard.1 {
            1 => self.dataset.len().div_ceil(self.batch_size),
            world => self.dataset.len() / (self.batch_size * world),
        }
    }

    /// The order of the dataset in `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            Rng::for_sample(self.seed, epoch, u64::MAX).shuffle(&mut idx);
        }
        idx
    }

    /// The transformed samples of batch `b` of `epoch`.
    pub fn samples(&self, epoch: u64, b: usize) -> Result<Vec<Sample>, DataError> {
        let order = self.order(epoch);
        let (rank, world) = self.shard;
        let start = ((b * world + rank) * self.batch_size).min(order.len());
        let end = (start + self.batch_size).min(order.len());
        let results: Vec<Result<Sample, DataError>> = order[start..end]
            .par_iter()
            .map(|&i| {
                let mut rng = Rng::for_sample(self.seed, epoch, i as u64);
                let s = self.dataset.get(i, &mut rng)?;
                Ok(self.transforms.apply(s, &mut rng))
            })
            .collect();
        let mut out = Vec::with_capacity(results.len());
        for (k, r) in results.into_iter().enumerate() {
            match (r, self.on_error) {
                (Ok(s), _) => out.push(s),
                (Err(e), ErrorPolicy::Fail) => return Err(e),
                (Err(e), ErrorPolicy::Skip) => self.skipped.lock().expect("lock").push(Problem {
                    file: "<loader>".into(),
                    record: format!("sample {}", order[start + k]),
                    problem: e.to_string(),
                }),
            }
        }
        Ok(out)
    }

    /// Batch `b` of `epoch`, collated.
    pub fn batch(&self, epoch: u64, b: usize) -> Result<Batch, DataError> {
        let samples = self.samples(epoch, b)?;
        collate(&samples, self.tokenizer.as_ref(), &self.device)
    }

    /// The batch of training step `step` (0-based): batch `step % num_batches` of epoch
    /// `step / num_batches`.
    pub fn step_batch(&self, step: u64) -> Result<Batch, DataError> {
        let per_epoch = self.num_batches().max(1) as u64;
        self.batch(step / per_epoch, (step % per_epoch) as usize)
    }

    /// Calls `f` with the batch of every step from `from` on, in order, until `f` returns
    /// `Ok(false)` or `to` is reached. With `prefetch > 0` a worker thread decodes, augments and
    /// collates (one host-to-device copy per batch) up to `prefetch` batches ahead of `f`; the
    /// batches are the same as without (each depends only on the seed, epoch and index).
    pub fn for_steps<E: From<DataError>>(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, Batch) -> Result<bool, E>,
    ) -> Result<(), E> {
        if self.prefetch == 0 {
            for s in from..to {
                if !f(s, self.step_batch(s)?)? {
                    break;
                }
            }
            return Ok(());
        }
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel(self.prefetch);
            scope.spawn(move || {
                for s in from..to {
                    // On a GPU this thread's copies run on its own stream (candle's streams are
                    // per thread): the batch goes over once its copy has finished.
                    let batch = self.step_batch(s).and_then(|b| {
                        self.device.synchronize().map_err(DataError::from)?;
                        Ok(b)
                    });
                    // A closed channel: training stopped; make nothing more.
                    if tx.send((s, batch)).is_err() {
                        break;
                    }
                }
            });
            for (s, batch) in rx.iter() {
                if !f(s, batch?)? {
                    break;
                }
            }
            Ok(())
        })
    }

    /// Samples left out so far under [`ErrorPolicy::Skip`].
    pub fn skipped(&self) -> Vec<Problem> {
        self.skipped.lock().expect("lock").clone()
    }
}
