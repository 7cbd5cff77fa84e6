#!/usr/bin/env python3
"""Issue 13's targets from one gpu-check call's bench.jsonl: each row's times beside PyTorch's.

Reads the JSON lines `glip bench` and `reference/bench_torch.py` printed in the same call
(scripts/gpu-check.sh part b appends both to bench.jsonl) and prints, for every (preset, mode,
batch, size) that has a PyTorch line, glip's medians in f32 and bf16, eager and replaying a CUDA
graph, their ratios to PyTorch's f32 median, and whether the issue's targets hold: f32 within
1.5x of PyTorch, bf16 at or under PyTorch's f32. For each precision the faster of the eager and
the graphed row counts (a researcher may pass `--cuda-graph`). Lines with phases, TF32 or a
`variant` (an A/B row run with an environment switch) are left out of the verdict.

Usage: python3 scripts/bench-summary.py OUT/bench.jsonl
Exit status: 0 when every row meets both targets, 1 when one does not, 2 when nothing compares.
"""

import json
import sys

F32_LIMIT = 1.5
BF16_LIMIT = 1.0


def read(path):
    rows = {}
    with open(path) as f:
        for n, text in enumerate(f, 1):
            text = text.strip()
            if not text:
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                print(f"{path}:{n}: not JSON (a failed run?): {text[:80]}", file=sys.stderr)
                continue
            if not isinstance(line, dict) or "median_s" not in line:
                continue
            key = (line["preset"], line["mode"], line["batch"], line["size"])
            row = rows.setdefault(key, {})
            if "torch" in line:
                row.setdefault("torch", line["median_s"])
            elif not line.get("phases") and not line.get("tf32") and not line.get("variant"):
                kind = line.get("precision", "f32") + (" graph" if line.get("graph") else "")
                row.setdefault(kind, line["median_s"])
    return rows


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rows = read(sys.argv[1])
    fmt = lambda s: f"{s:.4f}" if s is not None else "-"
    print("| preset | mode | batch@size | PyTorch f32 s | glip f32 s | f32 graph s | f32 / PyTorch "
          "| glip bf16 s | bf16 graph s | bf16 / PyTorch f32 | targets |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    compared, met = 0, 0
    for (preset, mode, batch, size), row in sorted(rows.items()):
        torch = row.get("torch")
        if torch is None:
            continue
        best = {}
        for p in ("f32", "bf16"):
            times = [t for t in (row.get(p), row.get(p + " graph")) if t is not None]
            best[p] = min(times) / torch if times else None
        ok = (best["f32"] is not None and best["f32"] <= F32_LIMIT
              and best["bf16"] is not None and best["bf16"] <= BF16_LIMIT)
        why = [f"{p} {r:.2f}x > {lim}x" for p, r, lim in
               (("f32", best["f32"], F32_LIMIT), ("bf16", best["bf16"], BF16_LIMIT))
               if r is not None and r > lim]
        why += [f"no {p} row" for p in ("f32", "bf16") if best[p] is None]
        compared += 1
        met += ok
        ratio = lambda r: f"{r:.2f}x" if r is not None else "-"
        print(f"| {preset} | {mode} | {batch}@{size} | {fmt(torch)} | {fmt(row.get('f32'))} "
              f"| {fmt(row.get('f32 graph'))} | {ratio(best['f32'])} | {fmt(row.get('bf16'))} "
              f"| {fmt(row.get('bf16 graph'))} | {ratio(best['bf16'])} "
              f"| {'met' if ok else 'NOT met: ' + ', '.join(why)} |")
    if compared == 0:
        print("no row has both glip and PyTorch times")
        sys.exit(2)
    print(f"targets (f32 <= {F32_LIMIT}x, bf16 <= {BF16_LIMIT}x PyTorch f32, the faster of eager "
          f"and graph): met on {met} of {compared} rows")
    sys.exit(0 if met == compared else 1)


if __name__ == "__main__":
    main()
