//! CUDA graphs of inference passes ([`glip_kernels::graph`]), kept per pass: a pass whose
//! inputs have shapes and host-side values seen before is replayed in one launch instead of
//! issuing its kernels one by one.
//!
//! A graph bakes in everything the pass computed on the host, so it is kept under a
//! [`GraphKey`] of the input shapes and of every host-side value the pass reads: the padding
//! mask (positional encodings and a dense head's locations are made from it on the host), the
//! token offsets, the precision, TF32 and the token reduction of the scoring. The first pass
//! of a key runs eagerly (most keys of `glip detect` over photos of many sizes are never seen
//! again); the second is recorded (its warm-up is the eager pass whose outputs it returns);
//! later ones replay. A pass that cannot be recorded runs eagerly from then on, and
//! [`GraphCache::report`] says why.

use crate::Precision;
use candle_core::{Result, Tensor};
use glip_core::LogitsKind;
use glip_heads::postprocess::PostProcessConfig;
use std::cell::RefCell;

/// What a pass's graph depends on besides the values of its input tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphKey {
    dims: Vec<(Vec<usize>, candle_core::DType)>,
    host_mask: Vec<u8>,
    offsets: Vec<Vec<(usize, usize)>>,
    /// The captions: with the offsets, what the text's sub-sentences are made from (kept on
    /// the device per caption, read by the recorded work).
    captions: Vec<String>,
    setting: String,
}

impl GraphKey {
    /// The key of a pass over `inputs` made from `batch`, computing in `precision` and scored
    /// with `post`.
    pub fn new(
        inputs: &[Tensor],
        batch: &glip_data::Batch,
        precision: Precision,
        post: &PostProcessConfig,
    ) -> Result<Self> {
        Ok(Self {
            dims: inputs.iter().map(|t| (t.dims().to_vec(), t.dtype())).collect(),
            host_mask: batch.images.host_mask()?.flatten_all()?.to_vec1()?,
            offsets: batch.text.offsets.clone(),
            captions: batch.text.captions.clone(),
            setting: format!(
                "{} tf32 {} {:?}",
                precision.name(),
                glip_kernels::cuda::tf32(),
                post.token_reduce
            ),
        })
    }
}

/// How many keys a [`GraphCache`] remembers (each with its graph once recorded), the most
/// recently used first: a graph holds its pass's device memory.
pub const GRAPHS_KEPT: usize = 8;

/// What to do with a pass ([`GraphCache::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Run it eagerly (first sighting, or it could not be recorded).
    Eager,
    /// Record it (second sighting).
    Record,
    /// Replay the graph.
    Replay,
}

enum Slot {
    Seen(LogitsKind),
    Graph(glip_kernels::graph::Graph, LogitsKind),
    Failed(LogitsKind),
}

impl Slot {
    fn kind(&self) -> LogitsKind {
        match self {
            Slot::Seen(k) | Slot::Graph(_, k) | Slot::Failed(k) => *k,
        }
    }
}

/// Counts of what a [`GraphCache`] did, and why passes could not be recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphReport {
    /// Passes recorded as graphs.
    pub recorded: usize,
    /// Passes replayed from a graph.
    pub replayed: usize,
    /// Passes run eagerly (first sightings, and keys that could not be recorded).
    pub eager: usize,
    /// Why recordings failed, each reason once.
    pub failures: Vec<String>,
}

impl std::fmt::Display for GraphReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CUDA graphs: {} recorded, {} passes replayed, {} eager",
            self.recorded, self.replayed, self.eager
        )?;
        for why in &self.failures {
            write!(f, "; not recorded: {why}")?;
        }
        Ok(())
    }
}

/// CUDA graphs of one model's inference passes (see the module's doc), for a
/// [`crate::infer::Predictor`]. The model's weights must not change while it holds graphs (a
/// [`crate::infer::Detector`]'s do not). Passes on other devices run eagerly.
#[derive(Default)]
pub struct GraphCache {
    entries: RefCell<Vec<(GraphKey, Slot)>>,
    report: RefCell<GraphReport>,
}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphCache").field("report", &*self.report.borrow()).finish()
    }
}

impl GraphCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// What it did so far.
    pub fn report(&self) -> GraphReport {
        self.report.borrow().clone()
    }

    /// The plan for a pass under `key`, and the logits kind its earlier passes returned; a
    /// remembered `key` moves to the front.
    fn plan(&self, key: &GraphKey) -> (Plan, Option<LogitsKind>) {
        let mut entries = self.entries.borrow_mut();
        match entries.iter().position(|(k, _)| k == key) {
            None => (Plan::Eager, None),
            Some(at) => {
                let entry = entries.remove(at);
                let plan = match &entry.1 {
                    Slot::Seen(_) => Plan::Record,
                    Slot::Graph(..) => Plan::Replay,
                    Slot::Failed(_) => Plan::Eager,
                };
                let kind = entry.1.kind();
                entries.insert(0, entry);
                (plan, Some(kind))
            }
        }
    }

    /// Stores `slot` for `key` at the front.
    fn store(&self, key: GraphKey, slot: Slot) {
        let mut entries = self.entries.borrow_mut();
        entries.retain(|(k, _)| *k != key);
        entries.insert(0, (key, slot));
        entries.truncate(GRAPHS_KEPT);
    }

    /// `pass(inputs)`'s outputs and logits kind: eagerly, recorded, or replayed, by the plan
    /// for `key`. On a device other than CUDA, or with `GLIP_CUDA_GRAPH=0`, always eagerly.
    pub fn run(
        &self,
        key: GraphKey,
        inputs: Vec<Tensor>,
        pass: &dyn Fn(&[Tensor]) -> Result<(Vec<Tensor>, LogitsKind)>,
    ) -> Result<(Vec<Tensor>, LogitsKind)> {
        let cuda = inputs.first().is_some_and(|t| t.device().is_cuda());
        if !cuda || !glip_kernels::graph::allowed() {
            self.report.borrow_mut().eager += 1;
            return pass(&inputs);
        }
        match self.plan(&key) {
            (Plan::Replay, Some(kind)) => {
                let outputs = {
                    let entries = self.entries.borrow();
                    let Some((_, Slot::Graph(graph, _))) = entries.first() else {
                        candle_core::bail!("CUDA graph cache: the planned graph is missing")
                    };
                    graph.run(&inputs)?
                };
                self.report.borrow_mut().replayed += 1;
                Ok((outputs, kind))
            }
            (Plan::Record, Some(kind)) => {
                let recorded =
                    glip_kernels::graph::capture(inputs.clone(), |t| pass(t).map(|(o, _)| o));
                match recorded {
                    Ok((graph, eager)) => {
                        self.store(key, Slot::Graph(graph, kind));
                        self.report.borrow_mut().recorded += 1;
                        Ok((eager, kind))
                    }
                    Err(e) => {
                        self.store(key, Slot::Failed(kind));
                        let mut report = self.report.borrow_mut();
                        let why = e.to_string();
                        if !report.failures.contains(&why) {
                            report.failures.push(why);
                        }
                        report.eager += 1;
                        drop(report);
                        pass(&inputs)
                    }
                }
            }
            (_, known) => {
                // A first sighting (remembered from now on), or a key that failed to record.
                let (outputs, kind) = pass(&inputs)?;
                if known.is_none() {
                    self.store(key, Slot::Seen(kind));
                }
                self.report.borrow_mut().eager += 1;
                Ok((outputs, kind))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: usize) -> GraphKey {
        GraphKey {
            dims: vec![(vec![n], candle_core::DType::F32)],
            host_mask: vec![],
            offsets: vec![],
            captions: vec![],
            setting: String::new(),
        }
    }

    #[test]
    fn a_key_is_run_eagerly_then_recorded_then_replayed() {
        let c = GraphCache::new();
        assert_eq!(c.plan(&key(1)), (Plan::Eager, None));
        c.store(key(1), Slot::Seen(LogitsKind::Tokens));
        assert_eq!(c.plan(&key(1)), (Plan::Record, Some(LogitsKind::Tokens)));
        c.store(key(1), Slot::Failed(LogitsKind::Tokens));
        let failed = c.plan(&key(1));
        assert_eq!(failed, (Plan::Eager, Some(LogitsKind::Tokens)), "a failed key stays eager");
        assert_eq!(c.plan(&key(2)), (Plan::Eager, None));
    }

    #[test]
    fn the_least_recently_used_key_is_forgotten_beyond_the_bound() {
        let c = GraphCache::new();
        for n in 0..GRAPHS_KEPT {
            c.store(key(n), Slot::Seen(LogitsKind::Tokens));
        }
        // Key 0 used again: key 1 is now the oldest.
        assert_eq!(c.plan(&key(0)).0, Plan::Record);
        c.store(key(GRAPHS_KEPT), Slot::Seen(LogitsKind::Tokens));
        assert_eq!(c.entries.borrow().len(), GRAPHS_KEPT);
        assert_eq!(c.plan(&key(1)), (Plan::Eager, None), "the oldest key is forgotten");
        assert_eq!(c.plan(&key(0)).0, Plan::Record);
        assert_eq!(c.plan(&key(GRAPHS_KEPT)).0, Plan::Record);
    }

    #[test]
    fn passes_off_cuda_run_eagerly_and_are_counted() {
        let x = Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu).unwrap();
        let c = GraphCache::new();
        let pass = |t: &[Tensor]| Ok((vec![(&t[0] * 2.0)?], LogitsKind::Classes(3)));
        for _ in 0..3 {
            let (out, kind) = c.run(key(2), vec![x.clone()], &pass).unwrap();
            assert_eq!(out[0].to_vec1::<f32>().unwrap(), [2.0, 4.0]);
            assert_eq!(kind, LogitsKind::Classes(3));
        }
        let r = c.report();
        assert_eq!((r.recorded, r.replayed, r.eager), (0, 0, 3));
        assert!(c.entries.borrow().is_empty(), "nothing remembered off CUDA");
        assert_eq!(r.to_string(), "CUDA graphs: 0 recorded, 0 passes replayed, 3 eager");
    }
}
