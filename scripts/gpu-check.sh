#!/usr/bin/env bash
# The device check of issue 13 as one prepared script for a lent GPU machine, where nothing is
# built: (a) the parity suite and the op tests on CUDA (the test binary of
# crates/glip-train/tests/cuda.rs), (b) `glip bench` on the issue's presets in f32, f32 with
# TF32 and bf16 (then each training step's phases, and glip's normalisation kernels against
# candle's compositions), (c) the default experiment on the GPU for a short budget, printing validation
# AP50 against training minutes.
#
# Here (no GPU needed): `bash scripts/gpu-pack.sh` builds both binaries with `--features cudnn`
# into gpu/ (stripped, xz-compressed) and prints what each device call should carry. Then on the
# device machine, from the repository root:
#   GLIP_XZ=gpu/glip.xz GLIP_TESTS_XZ=gpu/cuda-tests.xz bash scripts/gpu-check.sh
# The binaries load libcuda.so.1 (the driver's) at start-up and libcublas, libcurand, libnvrtc
# and libcudnn from the CUDA 13 wheels of the machine's Python (PyTorch's), found below.
# Smoke test on the CPU with the ordinary build: DEVICE=cpu PARTS=bc ITERS=1 BUDGET_MIN=0.2 QUICK=1
#
# Environment: GLIP (the binary, default target/release/glip) or GLIP_XZ (it, xz-compressed;
# unpacked into OUT), GLIP_TESTS / GLIP_TESTS_XZ (the GPU test binary, for part a), PARTS (which
# of a, b, c to run; default abc), DEVICE (cuda), ITERS (bench iterations, 10), BUDGET_MIN
# (experiment training minutes, 3), EXPERIMENT_SET (one more --set for it, run.tf32=true), OUT (where the run goes, a temporary folder), QUICK (1: small
# bench shapes, for the CPU smoke test), GLIP_FIXTURES (the fixtures, default fixtures/).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
PARTS="${PARTS:-abc}"
ITERS="${ITERS:-10}"
BUDGET_MIN="${BUDGET_MIN:-3}"
# PyTorch's defaults, against which the issue's learning curve was measured: TF32 convolutions.
EXPERIMENT_SET="${EXPERIMENT_SET:-run.tf32=true}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export GLIP_FIXTURES="${GLIP_FIXTURES:-$PWD/fixtures}"

# `unpack FILE.xz NAME`: xz, or Python's lzma where the machine has no xz; prints the path.
unpack() {
  xz -dc "$1" >"$OUT/$2" 2>/dev/null ||
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$OUT/$2"
  chmod +x "$OUT/$2"
  echo "$OUT/$2"
}
GLIP="${GLIP:-target/release/glip}"
[[ -n "${GLIP_XZ:-}" ]] && GLIP=$(unpack "$GLIP_XZ" glip)
GLIP_TESTS="${GLIP_TESTS:-}"
[[ -n "${GLIP_TESTS_XZ:-}" ]] && GLIP_TESTS=$(unpack "$GLIP_TESTS_XZ" cuda-tests)

if [[ "$DEVICE" != cpu ]]; then
  # The CUDA libraries of the machine's Python packages (PyTorch's nvidia-* wheels), then the
  # toolkit's, for the dynamically linked cuBLAS, cuRAND, NVRTC and cuDNN.
  libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for so in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
PY
)
  export LD_LIBRARY_PATH="${libs:+$libs:}${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda/lib64"
  # candle ships PTX, which the driver compiles for the GPU when a module is first loaded
  # (17-21 s measured on the H100 for a model's kernels); the driver's JIT cache keeps the
  # result for every later process on this machine. Large enough for all of candle's kernels.
  export CUDA_CACHE_PATH="${CUDA_CACHE_PATH:-$HOME/.nv/ComputeCache}" CUDA_CACHE_MAXSIZE=4294967296
fi

echo "== glip $("$GLIP" --version 2>&1), device $DEVICE, parts $PARTS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

# (a) The parity suite and the op tests on CUDA. Tests whose fixtures were not carried are
# skipped by name (and said so); MiniLM's test skips itself without the real model.
if [[ "$PARTS" == *a* ]]; then
  if [[ -z "$GLIP_TESTS" ]]; then
    echo "== (a) skipped: no GLIP_TESTS / GLIP_TESTS_XZ (scripts/gpu-pack.sh builds it)"
  else
    skip=()
    need() { # need FIXTURE TEST-NAME-FILTER...
      local f="$1"
      shift
      if [[ ! -e "$GLIP_FIXTURES/$f" ]]; then
        echo "(a) not carried: $f; skipping $*"
        for t in "$@"; do skip+=(--skip "$t"); done
      fi
    }
    # Reads configs/ through the path it was compiled at (this machine's is another); part (c)
    # runs a whole experiment on the device instead.
    skip+=(--skip trainer::an_experiment)
    need resnet50.safetensors backbone_parity::resnet50 backbone_parity::a_wrong_shape
    need mobilenet_v2/model.safetensors backbone_parity::mobilenet backbone_parity::pth
    need seed-tiny/model.safetensors seed_parity backbone_parity::seed_tiny
    need bert-tiny/config.json text_parity
    need bert-tiny/tokenizer.json trainer::
    need tokenization.json text_parity::tokenization
    need bert-tiny_io.safetensors text_parity::bert_tiny
    need boxes_losses.safetensors loss_parity
    need matcher_cases.json loss_parity
    need resnet50_io.safetensors backbone_parity::resnet50
    echo "== (a) parity suite and op tests on $DEVICE"
    start=$(date +%s)
    GLIP_TEST_DEVICE="$DEVICE" "$GLIP_TESTS" --test-threads 4 "${skip[@]}" 2>&1 |
      tee "$OUT/cuda-tests.log" | grep -E "^test |largest error|SKIP|skipped|panicked|test result" || true
    echo "(a) took $(($(date +%s) - start)) s; whole log in $OUT/cuda-tests.log"
  fi
fi

# (b) The issue's presets: (preset, batch, size, modes). PyTorch 2.11 on the H200:
# seed-r50 b8@512 infer 0.031 s / train 0.083 s; seed-r18 b32@256 infer 0.0115 s / train
# 0.081 s; seed-r18 b8@128 train 0.060 s.
if [[ "$PARTS" == *b* ]]; then
  if [[ "${QUICK:-0}" == 1 ]]; then
    rows=("seed-r18 1 64 infer train")
  else
    rows=("seed-r50 8 512 infer train" "seed-r18 32 256 infer train" "seed-r18 8 128 train")
  fi
  echo "== (b) bench (medians of $ITERS after one warm-up; the process time includes start-up and any kernel compilation)"
  for row in "${rows[@]}"; do
    read -r preset batch size modes <<<"$row"
    for mode in $modes; do
      for variant in f32 tf32 bf16; do
        case "$variant" in
          tf32) flags=(--precision f32 --tf32) ;;
          *) flags=(--precision "$variant") ;;
        esac
        start=$(date +%s%N)
        line=$("$GLIP" bench --device "$DEVICE" --preset "$preset" --mode "$mode" \
          --batch "$batch" --size "$size" --iters "$ITERS" "${flags[@]}" 2>&1 | tail -1)
        end=$(date +%s%N)
        echo "$preset $mode b$batch@$size $variant: $line (process $(((end - start) / 1000000)) ms)"
      done
    done
  done
fi

# (b, continued) Where a training step's time goes: each phase with the device synchronised at
# its boundaries (so the sum can exceed the plain step above).
if [[ "$PARTS" == *b* ]]; then
  echo "== (b) phases of a training step (medians; forward, loss, backward, optimizer)"
  for row in "${rows[@]}"; do
    read -r preset batch size modes <<<"$row"
    [[ "$modes" == *train* ]] || continue
    for precision in f32 bf16; do
      line=$("$GLIP" bench --device "$DEVICE" --preset "$preset" --mode train --batch "$batch" \
        --size "$size" --iters "$ITERS" --precision "$precision" --phases 2>&1 | tail -1)
      echo "$preset train b$batch@$size $precision phases: $(python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("phases"))' "$line" 2>/dev/null || echo "$line")"
    done
  done
fi

# (b, continued) glip's CUDA kernels for softmax, layer norm and batch norm against candle's
# compositions of them (GLIP_CUDA_COMPOSED=1), which the CUDA path ran before: which to keep.
if [[ "$PARTS" == *b* && "$DEVICE" != cpu ]]; then
  echo "== (b) training steps with candle's compositions for softmax, layer norm and batch norm"
  for row in "${rows[@]}"; do
    read -r preset batch size modes <<<"$row"
    [[ "$modes" == *train* ]] || continue
    line=$(GLIP_CUDA_COMPOSED=1 "$GLIP" bench --device "$DEVICE" --preset "$preset" --mode train \
      --batch "$batch" --size "$size" --iters "$ITERS" --precision f32 2>&1 | tail -1)
    echo "$preset train b$batch@$size f32 composed: $line"
  done
fi

# (c) The default experiment on the device for a short budget.
if [[ "$PARTS" == *c* ]]; then
  echo "== (c) experiment: configs/shapes.toml, $BUDGET_MIN min of training, --set $EXPERIMENT_SET, out $OUT"
  "$GLIP" experiment configs/shapes.toml --device "$DEVICE" --out "$OUT/shapes" \
    --set "run.time_budget_min=$BUDGET_MIN" --set "$EXPERIMENT_SET" >"$OUT/experiment.log" 2>&1 || {
    tail -20 "$OUT/experiment.log"
    exit 1
  }
  echo "val AP50 against training minutes (eval.jsonl):"
  python3 - "$OUT/shapes/eval.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    print(f"step {e['step']:5d}  {e['train_minutes']:5.2f} min  val AP50 {e['val']['stats']['AP50']:.3f}"
          f"  held-out AP50 {e['heldout_ap50']:.3f}")
PY
fi
echo "== done"
