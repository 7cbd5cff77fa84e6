//! CUDA graphs for inference: a forward pass recorded once and replayed in one launch.
//!
//! A seed-r18 inference step at batch 32 on the H200 launched 808 kernels, and the device was
//! busy a third of the time: the host, issuing the launches one by one (candle's bookkeeping,
//! an allocation and a free per result, the driver call), set the pace. A CUDA graph records
//! the launches, allocations and frees of one pass and replays them with one driver call, so a
//! replay costs the device's time alone. PyTorch offers the same (`torch.cuda.CUDAGraph`).
//!
//! [`capture`] runs a function once eagerly (the warm-up, whose outputs it also returns: NVRTC
//! modules load, cuDNN picks its algorithms, bf16 weight copies and layouts are made and
//! cached), then records a second run into a graph, launches it once on the same inputs and
//! checks that the replay gives the eager outputs bit for bit (the same kernels in the same
//! order); any difference, or anything a graph cannot record, is an error and nothing is kept.
//! [`Graph::run`] copies new inputs into the recorded input buffers, replays, and returns
//! copies of the outputs.
//!
//! What a replay relies on, and how it is kept:
//! * **Shapes and host-side values.** A graph replays the recorded kernels on the recorded
//!   buffers: inputs must have the recorded shapes and dtypes ([`Graph::run`] checks), and
//!   anything the function computed on the host from its inputs (a padding mask's positional
//!   encoding, a dense head's locations) is baked in; the caller keys its graphs by those
//!   host-side values too (`glip_train::infer::GraphCache` does).
//! * **Memory made before the capture.** The weights (the caller keeps them), candle's cached
//!   layouts (`candle_core::cuda_backend::cached_params`, held by the graph), the bf16
//!   autocast scope's weight copies ([`crate::bf16`], held by the graph) and tensors that a
//!   cache hands out during the capture ([`keep_alive`], held by the graph). cuDNN's workspace
//!   is allocated inside the graph while capturing, not taken from the per-thread one (which
//!   may grow and be freed later).
//! * **No host round trip.** A read back to the host or an upload of host data larger than
//!   candle's capture cache (4 KiB) cannot be recorded: the capture fails with candle's error.
//! * **Ordering.** Everything runs on candle's one stream; the outputs of a replay are copied
//!   before the next replay overwrites them. Graphs stay on the thread that captured them
//!   (candle's cache of uploaded host data is per thread).

use candle_core::{Device, Result, Tensor};
use std::cell::{Cell, RefCell};

thread_local! {
    /// Whether this thread is recording a graph.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// Tensors made before the capture that the recorded work reads (see [`keep_alive`]).
    static KEPT: RefCell<Vec<Tensor>> = const { RefCell::new(Vec::new()) };
}

/// Whether this thread is recording a graph ([`capture`]).
pub fn capturing() -> bool {
    CAPTURING.with(Cell::get)
}

/// Tells a capture in progress that the work it records reads `t`, a tensor made before it (a
/// per-thread cache's entry): the graph keeps it alive. Nothing happens outside a capture.
pub fn keep_alive(t: &Tensor) {
    if capturing() {
        KEPT.with(|k| k.borrow_mut().push(t.clone()));
    }
}

/// A few values by key, the most recently used first: a per-thread cache of tensors made from
/// host data (positional encodings, a dense head's locations), which on a GPU would otherwise
/// be made and uploaded at every step, and which a CUDA graph could not record being uploaded.
#[derive(Debug)]
pub struct Recent<K, V> {
    keep: usize,
    entries: Vec<(K, V)>,
}

impl<K: PartialEq, V: Clone> Recent<K, V> {
    /// An empty cache that keeps at most `keep` values.
    pub const fn new(keep: usize) -> Self {
        Self { keep, entries: Vec::new() }
    }

    /// The value kept for `key`, or `make(&key)` kept from now on (the least recently used
    /// value dropped beyond the bound). A value found while a graph is being recorded was made
    /// before it: its device tensors, `tensors(&value)`, are [`keep_alive`]d.
    pub fn get_or_make(
        &mut self,
        key: K,
        make: impl FnOnce(&K) -> Result<V>,
        tensors: impl Fn(&V) -> Vec<&Tensor>,
    ) -> Result<V> {
        if let Some(at) = self.entries.iter().position(|(k, _)| *k == key) {
            let entry = self.entries.remove(at);
            let found = entry.1.clone();
            self.entries.insert(0, entry);
            tensors(&found).into_iter().for_each(keep_alive);
            return Ok(found);
        }
        let made = make(&key)?;
        self.entries.insert(0, (key, made.clone()));
        self.entries.truncate(self.keep);
        Ok(made)
    }
}

/// Whether CUDA graphs may be used: not when `GLIP_CUDA_GRAPH=0` is set (to compare with the
/// eager launches, or to rule the graphs out).
pub fn allowed() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GLIP_CUDA_GRAPH").map_or(true, |v| v != "0"))
}

/// A recorded pass ([`capture`]).
pub struct Graph {
    // Declared first so that they are dropped first: they free the last replay's outputs (memory
    // the graph allocated) before the graph is destroyed.
    outputs: Vec<Tensor>,
    inputs: Vec<Tensor>,
    #[cfg(feature = "cuda")]
    exec: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    #[cfg(feature = "cuda")]
    _params: Vec<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<usize>>>,
    _kept: Vec<Tensor>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<_> = self.inputs.iter().map(|t| t.dims().to_vec()).collect();
        f.debug_struct("Graph").field("inputs", &dims).finish_non_exhaustive()
    }
}

/// Runs `f(&inputs)` eagerly, then records `f(&inputs)` into a CUDA graph whose input buffers
/// are `inputs` (kept by the graph; [`Graph::run`] copies new values into them) and checks one
/// replay against the eager outputs. Returns the graph and the eager outputs. `f` must be
/// deterministic (the same kernels each call) and must not read values back to the host;
/// whatever it reads besides `inputs` must outlive the graph (the weights) or be made inside it.
/// An error when `inputs` are not on a CUDA device, in a build without CUDA, or when the pass
/// cannot be recorded; the device is usable afterwards.
pub fn capture(
    inputs: Vec<Tensor>,
    f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Result<(Graph, Vec<Tensor>)> {
    let Some(device) = inputs.first().map(|t| t.device().clone()) else {
        candle_core::bail!("CUDA graph: no inputs")
    };
    if !device.is_cuda() {
        candle_core::bail!("CUDA graph: the inputs are on {:?}, not a CUDA device", device)
    }
    if let Some(t) = inputs.iter().find(|t| !t.device().same_device(&device)) {
        candle_core::bail!("CUDA graph: inputs on two devices ({:?})", t.device())
    }
    if let Some(t) = inputs.iter().find(|t| !t.is_contiguous()) {
        candle_core::bail!("CUDA graph: an input of shape {:?} is not contiguous", t.dims())
    }
    if capturing() {
        candle_core::bail!("CUDA graph: a capture is already in progress on this thread")
    }
    record(device, inputs, f)
}

#[cfg(not(feature = "cuda"))]
fn record(
    device: Device,
    _inputs: Vec<Tensor>,
    _f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Result<(Graph, Vec<Tensor>)> {
    candle_core::bail!("CUDA graph: this build has no CUDA ({device:?})")
}

#[cfg(feature = "cuda")]
fn record(
    device: Device,
    inputs: Vec<Tensor>,
    f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Result<(Graph, Vec<Tensor>)> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    if stream.context().is_managing_stream_synchronization() {
        // Each buffer's events, recorded outside the capture, would be waited on inside it.
        candle_core::bail!(
            "CUDA graph: the device orders buffers with events (a device made by \
             candle_core::Device::new_cuda); make it with glip_kernels::cuda::new_device"
        )
    }
    let wrap = |what: &str, e: &dyn std::fmt::Display| {
        candle_core::Error::Msg(format!("CUDA graph: {what}: {e}"))
    };
    // candle's capture mode for the whole warm-up and capture: host data uploaded in the
    // warm-up is cached by content, and found there while recording.
    let _guard = cuda.enable_cuda_graph_htod_cache();
    let eager = f(&inputs)?;
    device.synchronize()?;

    struct Recording;
    impl Drop for Recording {
        fn drop(&mut self) {
            CAPTURING.with(|c| c.set(false));
        }
    }
    KEPT.with(|k| k.borrow_mut().clear());
    let recording = Recording;
    CAPTURING.with(|c| c.set(true));
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| wrap("begin", &e))?;
    let recorded = f(&inputs);
    // Always ended, so that the stream leaves capture mode whatever `f` did. cudarc keeps the
    // errors of calls that cannot return one (a free) and returns the first from its next
    // call that checks, which `end_capture` is: taken first, or capture mode would stay on.
    let stale = stream.context().check_err();
    let ended = stream.end_capture(
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
    );
    drop(recording);
    let kept = KEPT.with(|k| std::mem::take(&mut *k.borrow_mut()));
    let (outputs, exec) = match (recorded, ended, stale) {
        (Ok(outputs), Ok(Some(exec)), Ok(())) => (outputs, exec),
        (recorded, ended, stale) => {
            // What the failed recording made is dropped now; its frees were recorded against
            // a capture that no longer exists, and cudarc keeps their errors for the next
            // call that checks: cleared, as nothing of it is used.
            let why = match (&recorded, &ended, &stale) {
                (Err(e), _, _) => e.to_string(),
                (_, _, Err(e)) => format!("a call during the capture failed: {e}"),
                (_, Err(e), _) => e.to_string(),
                _ => "the capture recorded nothing".to_string(),
            };
            drop(recorded);
            drop(ended);
            let _ = stream.context().check_err();
            candle_core::bail!("CUDA graph: the pass could not be recorded: {why}")
        }
    };
    if outputs.len() != eager.len() {
        candle_core::bail!(
            "CUDA graph: the recorded pass returned {} outputs, the eager one {}",
            outputs.len(),
            eager.len()
        )
    }
    let graph = Graph {
        outputs,
        inputs,
        exec,
        _params: candle_core::cuda_backend::cached_params(),
        _kept: [kept, crate::bf16::scope_tensors()].concat(),
    };
    if let Err(e) = graph.exec.launch() {
        drop(graph);
        let _ = stream.context().check_err();
        return Err(wrap("first replay", &e));
    }
    for (k, (got, want)) in graph.outputs.iter().zip(&eager).enumerate() {
        if let Some(why) = differs(got, want)? {
            candle_core::bail!(
                "CUDA graph: output {k} of the replay differs from the eager pass: {why}"
            )
        }
    }
    Ok((graph, eager))
}

/// Where `got` and `want` differ bit for bit (shape, dtype, or the first differing element and
/// how many do), or `None`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code, reason = "used by the CUDA capture"))]
fn differs(got: &Tensor, want: &Tensor) -> Result<Option<String>> {
    if got.dims() != want.dims() || got.dtype() != want.dtype() {
        return Ok(Some(format!(
            "{:?} {:?} against {:?} {:?}",
            got.dims(),
            got.dtype(),
            want.dims(),
            want.dtype()
        )));
    }
    // Compared as f64 bit patterns: every dtype a pass returns converts exactly.
    let bits = |t: &Tensor| -> Result<Vec<u64>> {
        Ok(t.flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    let (g, w) = (bits(got)?, bits(want)?);
    let bad: Vec<usize> = (0..g.len()).filter(|&i| g[i] != w[i]).collect();
    Ok(bad.first().map(|&i| {
        format!(
            "{} of {} elements, the first at {i}: {} against {}",
            bad.len(),
            g.len(),
            f64::from_bits(g[i]),
            f64::from_bits(w[i])
        )
    }))
}

impl Graph {
    /// The recorded input buffers.
    pub fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }

    /// Copies `inputs` into the recorded input buffers (a recorded buffer passed as itself is
    /// left as it is), replays the pass and returns copies of its outputs (the next replay
    /// overwrites the recorded ones). An error naming the input whose shape, dtype or device
    /// is not the recorded one.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        if inputs.len() != self.inputs.len() {
            candle_core::bail!(
                "CUDA graph: {} inputs, the graph was recorded with {}",
                inputs.len(),
                self.inputs.len()
            )
        }
        for (k, (new, buf)) in inputs.iter().zip(&self.inputs).enumerate() {
            glip_core::types::check_stands_in(&format!("CUDA graph: input {k}"), new, buf)?;
            if new.id() != buf.id() {
                buf.slice_set(&new.contiguous()?, 0, 0)?;
            }
        }
        self.launch()?;
        self.outputs.iter().map(Tensor::copy).collect()
    }

    #[cfg(feature = "cuda")]
    fn launch(&self) -> Result<()> {
        self.exec.launch().map_err(|e| candle_core::Error::Msg(format!("CUDA graph: replay: {e}")))
    }

    #[cfg(not(feature = "cuda"))]
    fn launch(&self) -> Result<()> {
        candle_core::bail!("CUDA graph: this build has no CUDA")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn recent_keeps_the_most_recently_used_values() {
        let mut r: Recent<u32, u32> = Recent::new(2);
        let made = std::cell::Cell::new(0);
        let get = |r: &mut Recent<u32, u32>, k: u32| {
            r.get_or_make(
                k,
                |k| {
                    made.set(made.get() + 1);
                    Ok(k * 10)
                },
                |_| Vec::new(),
            )
            .unwrap()
        };
        assert_eq!((get(&mut r, 1), get(&mut r, 2), get(&mut r, 1)), (10, 20, 10));
        assert_eq!(made.get(), 2, "1 was found, not made again");
        // 3 pushes out 2, the least recently used.
        assert_eq!((get(&mut r, 3), get(&mut r, 1)), (30, 10));
        assert_eq!(made.get(), 3);
        assert_eq!(get(&mut r, 2), 20);
        assert_eq!(made.get(), 4, "2 had been dropped");
        let e = r.get_or_make(9, |_| candle_core::bail!("no"), |_| Vec::new()).unwrap_err();
        assert!(e.to_string().contains("no"));
        assert_eq!(get(&mut r, 2), 20, "a failed make keeps nothing and drops nothing");
    }

    #[test]
    fn capture_refuses_the_cpu_with_a_reason() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let err = capture(vec![x], |i| Ok(vec![(&i[0] + 1.0)?])).unwrap_err().to_string();
        assert!(err.contains("not a CUDA device"), "{err}");
        let err = capture(Vec::new(), |_| Ok(Vec::new())).unwrap_err().to_string();
        assert!(err.contains("no inputs"), "{err}");
    }

    #[test]
    fn keep_alive_holds_nothing_outside_a_capture() {
        assert!(!capturing());
        keep_alive(&Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
        assert!(KEPT.with(|k| k.borrow().is_empty()));
    }

    #[test]
    fn differs_names_the_first_difference_and_counts() {
        let a = Tensor::new(&[1f32, 2.0, f32::NAN, 4.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, 2.5, f32::NAN, 5.0], &Device::Cpu).unwrap();
        assert_eq!(differs(&a, &a.copy().unwrap()).unwrap(), None, "NaN equals its own bits");
        let why = differs(&a, &b).unwrap().unwrap();
        assert!(why.starts_with("2 of 4 elements, the first at 1: 2 against 2.5"), "{why}");
        let c = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(differs(&a, &c).unwrap().unwrap().contains("[4] F32 against [2] F32"));
        // -0 and +0 are different bits.
        let z = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        let nz = Tensor::new(&[-0f32], &Device::Cpu).unwrap();
        assert!(differs(&z, &nz).unwrap().is_some());
    }
}
