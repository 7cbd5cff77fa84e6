//! Every kernel's contract ([`super::kernels`]) against its CUDA C: each kernel run under the
//! CPU emulation ([`super::emulation`]) on sampled arguments and grids, every buffer exactly as
//! long as the contract says the kernel may touch (with the conditions the contract sets met).
//! Each buffer ends where an inaccessible page begins, so the first read or write past its end
//! faults and fails the test naming the buffer; under AddressSanitizer
//! (`GLIP_EMULATION_SANITIZE=address`, a pass of CI) any access outside one does. A contract
//! that asks too little of a buffer, or a kernel that reaches further than its contract, fails.
//!
//! The arguments are sampled around the sizes the kernels meet (rows of 0, 1, a warp and
//! more; heads up to the widest; levels of one token to several; lengths not multiples of a
//! block), the buffers' contents random with NaNs and infinities among them (they steer
//! deformable sampling's reads and the pool's maxima). The optimiser's many-tensor kernels
//! (`glip_adamw_all`, `glip_sum_squares_all`) are left out: their buffers are reached through
//! a table of device addresses, whose entries the contract does not describe.

use super::emulation::emulate;
use super::kernels::{Count, GlipLevels, KernelInfo, Launch, Module, Param, Value, ALL};
use super::{DEFORMABLE_MAX_LEVELS, THREADS};
use glip_core::rng::Rng;
use std::fmt::Write as _;

/// Sampled launches per kernel.
const TRIALS: usize = 8;
/// Sampled launches per kernel of the contracts with the most arithmetic (attention's strided
/// rows and grid, deformable sampling's levels).
const TRIALS_INTRICATE: usize = 24;

/// A sampled launch: the arguments (buffers as placeholders), grid `(x, y)` and block size.
struct Sample {
    args: Vec<Value>,
    grid: (u32, u32),
    block: u32,
}

/// A buffer whose length the contract sets.
const B: Value = Value::Buffer(Some(0));

fn int(n: u64) -> Value {
    Value::Int(n)
}

fn float(x: f64) -> Value {
    Value::Float(x)
}

/// Sizes the kernels meet: none, one, around a warp and a block, a few odd ones.
fn size(r: &mut Rng) -> u64 {
    [0, 1, 2, 3, 5, 7, 16, 31, 32, 33, 64, 100, 257][r.below(13)]
}

/// A small positive size.
fn small(r: &mut Rng) -> u64 {
    1 + r.below(6) as u64
}

fn pick<T: Copy>(r: &mut Rng, from: &[T]) -> T {
    from[r.below(from.len())]
}

/// A block size for a kernel of any size: one thread, under a warp, a warp, odd sizes.
fn any_block(r: &mut Rng) -> u32 {
    pick(r, &[1, 7, 32, 33, 64, 128])
}

/// A reduction's block size: a power of two up to [`THREADS`].
fn reduce_block(r: &mut Rng) -> u32 {
    pick(r, &[1, 2, 32, 64, 128, THREADS])
}

/// Up to three blocks.
fn blocks(r: &mut Rng) -> u32 {
    1 + r.below(3) as u32
}

/// Levels of 1 to 4 tokens a side, tiling `s` value rows from the first (with up to two rows
/// after the last level).
fn levels(r: &mut Rng) -> (GlipLevels, u64) {
    let n = 1 + r.below(3);
    let mut lv = GlipLevels { n: n as u32, hws: [0; 3 * DEFORMABLE_MAX_LEVELS] };
    let mut s = 0u32;
    for l in 0..n {
        let (h, w) = (1 + r.below(4) as u32, 1 + r.below(4) as u32);
        lv.hws[3 * l..3 * l + 3].copy_from_slice(&[h, w, s]);
        s += h * w;
    }
    (lv, u64::from(s) + r.below(3) as u64)
}

/// A launch of kernel `name` as the host makes them, and around them; `None` for the kernels
/// left out (see the module's comment).
fn sample(name: &str, r: &mut Rng) -> Option<Sample> {
    let any =
        |r: &mut Rng, args: Vec<Value>| Sample { args, grid: (blocks(r), 1), block: any_block(r) };
    let reduce = |r: &mut Rng, args: Vec<Value>| Sample {
        args,
        grid: (blocks(r), 1),
        block: reduce_block(r),
    };
    let eps = float(1e-5);
    Some(match name {
        "glip_adamw_moments" => {
            let n = size(r);
            any(
                r,
                vec![B, B, int(n), float(1.0), float(0.9), float(0.1), float(0.999), float(1e-3)],
            )
        }
        "glip_adamw_apply" => {
            let n = size(r);
            any(r, vec![B, B, int(n), float(0.99), float(1e-3), float(1.2), float(1e-8)])
        }
        "glip_ema" => {
            let n = size(r);
            any(r, vec![B, B, int(n), float(0.9), float(0.1)])
        }
        "glip_sum_squares_all" | "glip_adamw_all" => return None,
        "glip_sum_f64" => {
            let n = size(r);
            reduce(r, vec![B, int(n), B])
        }
        "glip_softmax" | "glip_softmax_backward" => {
            let (rows, d) = (size(r), size(r));
            let buffers = if name == "glip_softmax" { 2 } else { 3 };
            let mut args = vec![B; buffers];
            args.extend([int(rows), int(d)]);
            reduce(r, args)
        }
        "glip_layer_norm" => {
            let (rows, d) = (size(r), size(r));
            reduce(r, vec![B, B, B, B, int(rows), int(d), eps])
        }
        "glip_add_layer_norm" | "glip_layer_norm_backward" => {
            let (rows, d) = (size(r), size(r));
            reduce(r, vec![B, B, B, B, B, int(rows), int(d), eps])
        }
        "glip_layer_norm_params" => {
            let (rows, d, chunk) = (size(r), size(r), small(r));
            let block = any_block(r);
            // As the host: enough blocks for the columns, a chunk of rows per grid row; and
            // sometimes more or fewer chunks than the rows need.
            let columns = d.div_ceil(u64::from(block)).max(1) as u32;
            let parts = rows.div_ceil(chunk).max(1) as u32 + pick(r, &[0, 0, 1]);
            Sample {
                args: vec![B, B, B, B, int(rows), int(d), int(chunk)],
                grid: (columns, parts),
                block,
            }
        }
        "glip_sum_parts" => {
            let (parts, m) = (small(r), size(r));
            any(r, vec![B, B, int(parts), int(m)])
        }
        "glip_batch_norm_stats" => {
            let (b, c, hw) = (small(r), small(r), size(r));
            reduce(r, vec![B, B, int(b), int(c), int(hw), float(1e-5)])
        }
        "glip_batch_norm_sums" => {
            let (b, c, hw) = (small(r), small(r), size(r));
            reduce(r, vec![B, B, B, B, int(b), int(c), int(hw)])
        }
        "glip_batch_norm" | "glip_batch_norm_backward" => {
            let (b, c, hw) = (small(r), small(r), size(r));
            let mut args = vec![B; if name == "glip_batch_norm" { 3 } else { 4 }];
            args.extend([int(b * c * hw), int(c), int(hw)]);
            if name == "glip_batch_norm_backward" {
                args.push(float((b * hw) as f64));
            }
            any(r, args)
        }
        "glip_bn_constants" => {
            let c = size(r);
            any(r, vec![B, B, B, B, B, int(c), eps])
        }
        "glip_affine_f32"
        | "glip_affine_bf16"
        | "glip_affine_backward_f32"
        | "glip_affine_backward_bf16" => {
            let (b, c, hw) = (small(r), small(r), size(r));
            let flags = r.below(4) as u64;
            any(r, vec![B, B, B, B, int(b * c * hw), int(c), int(hw), int(flags)])
        }
        "glip_max_pool_f32"
        | "glip_max_pool_bf16"
        | "glip_max_pool_backward_f32"
        | "glip_max_pool_backward_bf16" => {
            let (planes, h, w) = (small(r), size(r).max(1), size(r).max(1));
            let pooled = |n: u64| (n - 1) / 2 + 1;
            let buffers = if name.contains("backward") { 3 } else { 2 };
            let mut args = vec![B; buffers];
            args.extend([int(planes), int(h), int(w), int(pooled(h)), int(pooled(w))]);
            any(r, args)
        }
        "glip_bf16_cast_fill" => {
            let (rows, cols) = (size(r), size(r));
            let n = rows * size(r).max(1);
            any(r, vec![B, B, int(n), B, B, int(rows), int(cols)])
        }
        "glip_dropout_mask" => {
            let (n, seed) = (size(r), r.next_u64());
            any(r, vec![B, int(n), int(seed), float(0.1), float(1.0 / 0.9)])
        }
        "glip_dropout" => {
            let (n, seed) = (size(r), r.next_u64());
            any(r, vec![B, B, int(n), int(seed), float(0.1), float(1.0 / 0.9)])
        }
        "glip_relu_backward" | "glip_gelu_erf_backward" => {
            let n = size(r);
            any(r, vec![B, B, B, int(n)])
        }
        "glip_top_k" => {
            let (s, rows) = (size(r), small(r));
            let k = r.below(s as usize + 3) as u64;
            let block = pick(r, &[32, 64, 100, THREADS]);
            let grid = (s.div_ceil(u64::from(block)).max(1) as u32, rows as u32);
            Sample { args: vec![B, B, int(s), int(k)], grid, block }
        }
        "glip_attention" => {
            let (b, heads) = (small(r).min(2), small(r).min(3));
            let dh = pick(r, &[1, 8, 16, 33, 64]);
            let (lq, lk) = (size(r).min(40), size(r).min(40));
            // Rows of their own (`heads dh`, or a little wider), or q, k and v side by side in
            // one product's rows (`3 heads dh`).
            let ld = |r: &mut Rng| heads * dh * pick(r, &[1, 3]) + pick(r, &[0, 0, 2]);
            let (ldq, ldk, ldv) = (ld(r), ld(r), ld(r));
            let scale_scores = r.below(2) as u64;
            Sample {
                args: vec![
                    B,
                    B,
                    B,
                    B,
                    B,
                    int(heads),
                    int(lq),
                    int(lk),
                    int(dh),
                    int(ldq),
                    int(ldk),
                    int(ldv),
                    float(0.125),
                    int(scale_scores),
                ],
                grid: (lq.div_ceil(16).max(1) as u32, (b * heads) as u32),
                block: super::ATTENTION_THREADS,
            }
        }
        "glip_deformable_sample" | "glip_deformable_value_grad" | "glip_deformable_sample_grad" => {
            let (lv, s) = levels(r);
            let (bh, q, dh, points) = (small(r).min(2), small(r).min(3), small(r), small(r).min(3));
            let scalars = [int(s), int(dh), int(q), int(points)];
            let n = if name == "glip_deformable_sample_grad" {
                bh * q * u64::from(lv.n) * points
            } else {
                bh * q * dh
            };
            let mut args = match name {
                "glip_deformable_sample" => vec![B, B, Value::Levels(lv), B],
                "glip_deformable_value_grad" => vec![B, B, Value::Levels(lv), B],
                _ => vec![B, B, B, Value::Levels(lv), B],
            };
            args.extend(scalars);
            args.push(int(n));
            any(r, args)
        }
        other => panic!("{other}: no sampled launches (add them here)"),
    })
}

/// The C type of a buffer's elements.
fn c_type(p: Param) -> &'static str {
    use super::kernels::Elem;
    match p {
        Param::Read(e) | Param::Write(e) => match e {
            Elem::F32 => "float",
            Elem::Bf16 => "glip_bf16",
            Elem::F64 => "double",
            Elem::U8 => "unsigned char",
            Elem::U32 => "unsigned",
            Elem::U64 => "unsigned long long",
        },
        _ => unreachable!("not a buffer: {p:?}"),
    }
}

/// A scalar or the levels as a C expression.
fn c_value(p: Param, v: &Value) -> String {
    use super::kernels::Elem;
    match (p, v) {
        (Param::Scalar(Elem::U32), Value::Int(n)) => format!("{n}u"),
        (Param::Scalar(Elem::U64), Value::Int(n)) => format!("{n}ull"),
        (Param::Scalar(Elem::F32), Value::Float(x)) => format!("{:e}f", *x as f32),
        (Param::Scalar(Elem::F64), Value::Float(x)) => format!("{x:e}"),
        (Param::Levels, Value::Levels(l)) => {
            let hws: Vec<String> = l.hws.iter().map(u32::to_string).collect();
            format!("GlipLevels{{{}u, {{{}}}}}", l.n, hws.join(", "))
        }
        _ => panic!("argument {v:?} for a parameter {p:?}"),
    }
}

/// Buffers: `glip_buf<T>(n, name)`, `n` elements of random contents (NaNs and infinities
/// among them). Under AddressSanitizer from `new[]`, which it watches; otherwise each buffer
/// ends where an inaccessible page begins, so the first read or write past its end faults, and
/// the handler names the buffer (and exits).
const HELPERS: &str = r#"
#include <csignal>
#include <cstdlib>
#include <sys/mman.h>
#include <unistd.h>
static unsigned long long glip_state = 0x243f6a8885a308d3ull;
static unsigned long long glip_next() {
    glip_state ^= glip_state << 13; glip_state ^= glip_state >> 7; glip_state ^= glip_state << 17;
    return glip_state;
}
static float glip_value() {
    unsigned long long u = glip_next();
    if (u % 29 == 0) return NAN;
    if (u % 31 == 0) return (u & 64) ? INFINITY : -INFINITY;
    return -3.0f + 10.0f * (float)((u >> 40) & 0xffffff) / 16777216.0f;
}
static void glip_fill(float *p) { *p = glip_value(); }
static void glip_fill(double *p) { *p = (double)glip_value(); }
static void glip_fill(unsigned char *p) { *p = (unsigned char)(glip_next() & 1); }
static void glip_fill(unsigned *p) { *p = (unsigned)glip_next(); }
static void glip_fill(unsigned long long *p) { *p = glip_next(); }
GLIP_BF16_FILL
#if defined(__SANITIZE_ADDRESS__)
template <class T> static T *glip_buf(size_t n, const char *) {
    T *p = new T[n];
    for (size_t i = 0; i < n; ++i) glip_fill(p + i);
    return p;
}
template <class T> static void glip_free(T *p, size_t) { delete[] p; }
#else
struct glip_region { const char *name; unsigned char *end; };
static glip_region glip_regions[32];
static int glip_count = 0;
static size_t glip_page() { return (size_t)sysconf(_SC_PAGESIZE); }
static void glip_fault(int, siginfo_t *info, void *) {
    unsigned char *at = (unsigned char *)info->si_addr;
    char msg[256];
    int len = std::snprintf(msg, sizeof msg, "a fault at %p, outside every buffer\n", (void *)at);
    for (int i = 0; i < glip_count; ++i)
        if (at >= glip_regions[i].end && at < glip_regions[i].end + glip_page())
            len = std::snprintf(msg, sizeof msg, "read or written past the end of %s (byte %ld after it)\n",
                                glip_regions[i].name, (long)(at - glip_regions[i].end));
    if (write(2, msg, (size_t)len) < 0) _exit(5);
    _exit(3);
}
template <class T> static T *glip_buf(size_t n, const char *name) {
    static bool handler = false;
    if (!handler) {
        struct sigaction sa = {};
        sa.sa_sigaction = glip_fault;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
        handler = true;
    }
    const size_t page = glip_page(), bytes = n * sizeof(T);
    const size_t span = (bytes + page - 1) / page * page + page;
    unsigned char *base = (unsigned char *)mmap(nullptr, span, PROT_READ | PROT_WRITE,
                                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(base + span - page, page, PROT_NONE) != 0) std::abort();
    unsigned char *end = base + span - page;
    T *p = (T *)(end - bytes);
    for (size_t i = 0; i < n; ++i) glip_fill(p + i);
    glip_regions[glip_count++] = {name, end};
    return p;
}
template <class T> static void glip_free(T *p, size_t n) {
    const size_t page = glip_page(), bytes = n * sizeof(T);
    unsigned char *end = (unsigned char *)p + bytes;
    const size_t span = (bytes + page - 1) / page * page + page;
    munmap(end + page - span, span);
    for (int i = 0; i < glip_count; ++i)
        if (glip_regions[i].end == end) glip_regions[i] = glip_regions[--glip_count];
}
#endif
"#;

/// The C of one launch of `info` with these arguments (buffers `lens` long, `None` null).
fn c_launch(info: &KernelInfo, trial: usize, s: &Sample, lens: &[Option<u64>]) -> String {
    let mut c = String::from("{\n");
    let mut call = Vec::new();
    for (i, (&p, v)) in info.params.iter().zip(&s.args).enumerate() {
        match p {
            Param::Read(_) | Param::Write(_) => {
                let t = c_type(p);
                match lens[i] {
                    Some(n) => {
                        let what = format!(
                            "`{}` ({n} elements) in {}'s launch {trial}",
                            info.names[i], info.name
                        );
                        let _ = writeln!(c, "{t} *b{i} = glip_buf<{t}>({n}, \"{what}\");");
                    }
                    None => {
                        let _ = writeln!(c, "{t} *b{i} = nullptr;");
                    }
                }
                call.push(format!("b{i}"));
            }
            _ => call.push(c_value(p, v)),
        }
    }
    let _ = writeln!(
        c,
        "glip_launch({}, {}, {}, [&] {{ {}({}); }});",
        s.grid.0,
        s.grid.1,
        s.block,
        info.name,
        call.join(", ")
    );
    for (i, &p) in info.params.iter().enumerate() {
        if let (Param::Read(_) | Param::Write(_), Some(n)) = (p, lens[i]) {
            let _ = writeln!(c, "glip_free(b{i}, {n});");
        }
    }
    c.push_str("}\n");
    c
}

/// Each module's kernels on [`TRIALS`] (or [`TRIALS_INTRICATE`]) sampled launches each, their
/// buffers as long as the contracts say: no read or write past one (see the module's comment).
#[test]
fn kernels_stay_inside_their_contracts() {
    let mut rng = Rng::new(0x00c0_ffee);
    let mut programs = Vec::new();
    for module in Module::ALL {
        let mut body = String::new();
        let mut launches = 0;
        for info in ALL.iter().filter(|k| k.module == module) {
            let mut refused = 0;
            let intricate = info.module == Module::Attention || info.module == Module::Deformable;
            for trial in 0..if intricate { TRIALS_INTRICATE } else { TRIALS } {
                let Some(s) = sample(info.name, &mut rng) else { break };
                let launch = Launch::new((s.grid.0, s.grid.1, 1), (s.block, 1, 1));
                assert!(
                    info.threads.admits((s.block, 1, 1)),
                    "{}: sampled blocks of {} threads",
                    info.name,
                    s.block
                );
                let needs = match (info.needs)(&s.args, launch) {
                    Ok(needs) => needs,
                    Err(e) => {
                        // The samples are drawn to meet every contract's conditions, as the
                        // host's launches do: a refusal is a mismatch between the two.
                        refused += 1;
                        eprintln!("{}: sample {trial} refused: {e}", info.name);
                        continue;
                    }
                };
                // Null where the kernel touches nothing through a buffer or tests it for
                // null, half the time; the needs again with those null (a bias left out
                // leaves the output alone).
                let mut args = s.args.clone();
                let mut buffers = 0;
                for (i, p) in info.params.iter().enumerate() {
                    if matches!(p, Param::Read(_) | Param::Write(_)) {
                        let need = needs.iter().find(|n| n.name == info.names[i]).unwrap();
                        if (need.elements == 0 || need.may_be_null) && rng.below(2) == 0 {
                            args[i] = Value::Buffer(None);
                        }
                        buffers += 1;
                    }
                }
                assert_eq!(buffers, needs.iter().count(), "{}: buffers and needs", info.name);
                let needs = (info.needs)(&args, launch).unwrap();
                let mut lens = vec![None; info.params.len()];
                for (i, p) in info.params.iter().enumerate() {
                    if matches!(p, Param::Read(_) | Param::Write(_))
                        && !matches!(args[i], Value::Buffer(None))
                    {
                        let need = needs.iter().find(|n| n.name == info.names[i]).unwrap();
                        let Count(n) = need.elements;
                        assert!(n < 1 << 24, "{}: {} needs {n} elements", info.name, need.name);
                        lens[i] = Some(n as u64);
                        args[i] = Value::Buffer(Some(n as u64));
                    }
                }
                // Exactly these lengths pass `launch`'s check.
                (info.needs)(&args, launch).and_then(|n| n.check()).unwrap();
                body.push_str(&c_launch(info, trial, &Sample { args, ..s }, &lens));
                launches += 1;
            }
            assert_eq!(refused, 0, "{}: sampled launches its contract refuses", info.name);
        }
        if launches == 0 {
            continue;
        }
        let _ = write!(body, "std::printf(\"launches %d\\n\", {launches});");
        programs.push((module, body, launches));
    }
    // The modules' programs compiled and run side by side.
    let summary: Vec<String> = std::thread::scope(|scope| {
        let runs: Vec<_> = programs
            .iter()
            .map(|(module, body, launches)| {
                scope.spawn(move || {
                    let source = module.source();
                    let bf16_fill = if source.contains("struct glip_bf16") {
                        "static void glip_fill(glip_bf16 *p) { p->bits = glip_bf16_bits(glip_value()); }"
                    } else {
                        ""
                    };
                    let text = format!("{source}\n{}", HELPERS.replace("GLIP_BF16_FILL", bf16_fill));
                    let out = emulate(&text, &[], body)?;
                    assert_eq!(
                        out.get("launches"),
                        Some(&vec![*launches as f32]),
                        "{module:?}: launches run"
                    );
                    Some(format!("{module:?} {launches}"))
                })
            })
            .collect();
        runs.into_iter()
            .filter_map(|r| r.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    eprintln!("launches run per module: {}", summary.join(", "));
}
