#!/usr/bin/env bash
# The device check of issue 13, parts (b) and (c), as one prepared script for a lent GPU
# machine, where nothing is built: `glip bench` on the issue's presets in f32 and bf16, then
# the default experiment on the GPU for a short budget, printing validation AP50 against
# training minutes. Part (a), the parity suite on CUDA, is not here yet (the tests run on the
# CPU only).
#
# Here (no GPU needed), build the CUDA binary from the pinned wheels (9 min on 2 cores), then
# shrink it: it is about 84 MB (candle's kernels are in it), over the 64 MiB a device call
# carries, and 8.9 MB once stripped and xz-compressed:
#   eval "$(cargo xtask cuda-env)" && cargo build --release -p glip-cli --features cuda
#   strip -o target/glip-cuda target/release/glip && xz -T2 -6 -f target/glip-cuda
# then carry `target/glip-cuda.xz` to the device machine and run from the repository root:
#   GLIP_XZ=target/glip-cuda.xz bash scripts/gpu-check.sh
# The CUDA binary loads libcuda.so.1 at start-up, so it runs only where a driver is installed.
# Smoke test on the CPU with the ordinary build: DEVICE=cpu ITERS=1 BUDGET_MIN=0.2 QUICK=1 ...
#
# Environment: GLIP (the binary, default target/release/glip) or GLIP_XZ (it, xz-compressed;
# unpacked into OUT), DEVICE (cuda), ITERS (bench
# iterations, 10), BUDGET_MIN (experiment training minutes, 3), OUT (where the run goes,
# a temporary folder), QUICK (1: small bench shapes, for the CPU smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
GLIP="${GLIP:-target/release/glip}"
DEVICE="${DEVICE:-cuda}"
ITERS="${ITERS:-10}"
BUDGET_MIN="${BUDGET_MIN:-3}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
if [[ -n "${GLIP_XZ:-}" ]]; then
  # xz, or Python's lzma where the machine has no xz.
  xz -dc "$GLIP_XZ" >"$OUT/glip" 2>/dev/null ||
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$GLIP_XZ" "$OUT/glip"
  chmod +x "$OUT/glip"
  GLIP="$OUT/glip"
fi

echo "== glip $("$GLIP" --version 2>&1), device $DEVICE"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

# (b) The issue's presets: (preset, batch, size, modes). PyTorch 2.11 on the H200:
# seed-r50 b8@512 infer 0.031 s / train 0.083 s; seed-r18 b32@256 infer 0.0115 s / train
# 0.081 s; seed-r18 b8@128 train 0.060 s.
if [[ "${QUICK:-0}" == 1 ]]; then
  rows=("seed-r18 1 64 infer train")
else
  rows=("seed-r50 8 512 infer train" "seed-r18 32 256 infer train" "seed-r18 8 128 train")
fi
echo "== bench (medians of $ITERS after one warm-up; the first call includes any kernel compilation)"
for row in "${rows[@]}"; do
  read -r preset batch size modes <<<"$row"
  for mode in $modes; do
    for precision in f32 bf16; do
      # Training rows in f32 only: bf16 has no CUDA path yet (it falls back to f32 there).
      [[ "$mode" == train && "$precision" == bf16 ]] && continue
      start=$(date +%s%N)
      line=$("$GLIP" bench --device "$DEVICE" --preset "$preset" --mode "$mode" \
        --batch "$batch" --size "$size" --iters "$ITERS" --precision "$precision" 2>&1 | tail -1)
      end=$(date +%s%N)
      echo "$preset $mode b$batch@$size $precision: $line (process $(( (end - start) / 1000000 )) ms)"
    done
  done
done

# (c) The default experiment on the device for a short budget.
echo "== experiment: configs/shapes.toml, $BUDGET_MIN min of training, out $OUT"
"$GLIP" experiment configs/shapes.toml --device "$DEVICE" --out "$OUT/shapes" \
  --set "run.time_budget_min=$BUDGET_MIN" >"$OUT/experiment.log" 2>&1 || {
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
echo "== done"
