#!/usr/bin/env bash
# Builds, here (no GPU needed), what scripts/gpu-check.sh runs on a lent GPU machine: the glip
# binary and the GPU test binary (crates/glip-train/tests/cuda.rs) with `--features cudnn`, from
# the pinned CUDA 13.0 and cuDNN 9 wheels (`cargo xtask cuda-env --cudnn`), stripped and
# xz-compressed into gpu/ (ignored by git). About 10 minutes on 2 cores from a warm target
# folder, longer from a cold one.
#
# Each binary is about 80 MB (candle's PTX is in it) and about 9-10 MB compressed. A device call
# carries 64 MiB at most (working tree included), so the fixtures go in two calls while the
# machine stays warm (it keeps carried, ignored files between calls): the script prints the
# carry lists with their sizes. Then, on the device machine, from the repository root:
#   GLIP_XZ=gpu/glip.xz GLIP_TESTS_XZ=gpu/cuda-tests.xz bash scripts/gpu-check.sh
#
# Environment: CARGO_TARGET_DIR (default target/cuda: kept apart from the CPU build, whose
# candle is built without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(cargo xtask cuda-env --cudnn)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
cargo build --release -p glip-cli --features cudnn
tests=$(cargo test --release -p glip-train --features cudnn --test cuda --no-run \
  --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])')
[[ -n "$tests" ]] || { echo "gpu-pack: no test binary for tests/cuda.rs" >&2; exit 1; }
mkdir -p gpu
strip -o gpu/glip "$CARGO_TARGET_DIR/release/glip"
strip -o gpu/cuda-tests "$tests"
xz -T2 -6 -f gpu/glip gpu/cuda-tests
size() { du -cb "$@" | tail -1 | awk '{printf "%.1f MB", $1 / 1e6}'; }
echo "gpu-pack: gpu/glip.xz and gpu/cuda-tests.xz ($(size gpu/*.xz))"
f=fixtures
if [[ ! -e "$f/seed-tiny" ]]; then
  echo "gpu-pack: warning: $f/ has not been made here yet (cargo xtask fixtures): the device" \
    "check would skip the parity tests that read it" >&2
fi
first=(gpu "$f/seed-tiny" "$f/bert-tiny" "$f/bert-tiny_io.safetensors" "$f/boxes_losses.safetensors" \
  "$f/tokenization.json" "$f/matcher_cases.json" "$f/minilm_io.safetensors")
second=("$f/resnet50.safetensors" "$f/resnet50_io.safetensors")
third=("$f/mobilenet_v2")
echo "carry, first call ($(size "${first[@]}") beside the tracked files): ${first[*]}"
echo "carry, second call ($(size "${second[@]}")): ${second[*]}"
echo "carry, third call ($(size "${third[@]}")): ${third[*]}"
