#!/usr/bin/env python3
"""Issue 13's targets from one gpu-check call's bench.jsonl: each row's times beside PyTorch's.

Reads the JSON lines `glip bench` and `reference/bench_torch.py` printed in the same call
(scripts/gpu-check.sh part b appends both to bench.jsonl) and prints, for every (preset, mode,
batch, size) that has a PyTorch line, glip's medians in f32 and bf16, eager and replaying a CUDA
graph, their ratios to PyTorch's f32 median, and whether the issue's targets hold: f32 within
1.5x of PyTorch, bf16 at or under PyTorch's f32. For each precision the faster of the eager and
the graphed row counts (a researcher may pass `--cuda-graph`). Lines with phases, TF32 or a
`variant` (an A/B row run with an environment switch) are left out of the verdict; the
variants come after it in a table of their own, each beside the plain row of the same
precision and round (gpu-check.sh measures them in round 1): what the switch would make of the
row, and of its ratio to PyTorch's f32, were it the default.

A row measured more than once (gpu-check.sh with ROUNDS > 1 marks each line with its `round`)
counts with the median of its times of each kind, and the table adds the bf16 ratio of each
round (glip's rows against PyTorch's line of the same round): how far the machine's drift
moves the verdict.

Usage: python3 scripts/bench-summary.py OUT/bench.jsonl
Exit status: 0 when every row meets both targets, 1 when one does not, 2 when nothing compares.

python3 scripts/bench-summary.py --close FRACTION OUT/bench.jsonl prints instead the rows
(`preset mode batch size`, one a line) whose verdict is close: a ratio within FRACTION of its
target (|ratio / target - 1| <= FRACTION), or a time missing; gpu-check.sh measures those again
in its later rounds. Exit status 0.
"""

import json
import statistics
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
            if "torch" in line:
                kind = "torch"
            elif not line.get("phases") and not line.get("tf32"):
                kind = line.get("precision", "f32") + (" graph" if line.get("graph") else "")
                if line.get("variant"):
                    # Kept apart from the verdict's kinds: `bf16 [GLIP_CHANNELS_LAST=1]`.
                    kind += f" [{line['variant']}]"
            else:
                continue
            # A round's first line of a kind counts (a `--cuda-graph` run that fell back to
            # eager launches comes after the eager row of its round).
            times = rows.setdefault(key, {}).setdefault(kind, {})
            times.setdefault(line.get("round", 1), line["median_s"])
    return rows


def median(times):
    """The median over the rounds of one kind's times ({round: seconds}); None without any."""
    if not times:
        return None
    return statistics.median(times.values())


def best_ratio(row, precision, torch, rounds=None):
    """The faster of `precision`'s eager and graphed medians (over `rounds`, all by default)
    as a ratio to `torch`; None without a time."""
    found = []
    for kind in (precision, precision + " graph"):
        times = row.get(kind, {})
        if rounds is not None:
            times = {r: t for r, t in times.items() if r in rounds}
        m = median(times)
        if m is not None:
            found.append(m)
    return min(found) / torch if found and torch else None


def close_rows(rows, fraction):
    """The keys of the rows whose verdict a re-measurement could turn: a ratio within
    `fraction` of its target, or no PyTorch time or no time for a precision."""
    close = []
    for key, row in sorted(rows.items()):
        torch = median(row.get("torch"))
        ratios = [(best_ratio(row, p, torch), limit)
                  for p, limit in (("f32", F32_LIMIT), ("bf16", BF16_LIMIT))]
        if torch is None or any(r is None or abs(r / limit - 1) <= fraction for r, limit in ratios):
            close.append(key)
    return close


def print_variants(rows):
    """The A/B rows: each variant's time beside the plain row of its precision and round, and
    both ratios (to the plain row, and to PyTorch's f32 of that round). Nothing without any."""
    out = []
    for (preset, mode, batch, size), row in sorted(rows.items()):
        for kind, times in sorted(row.items()):
            if not kind.endswith("]"):
                continue
            base, variant = kind[:-1].split(" [", 1)
            for r, t in sorted(times.items()):
                plain = row.get(base, {}).get(r)
                torch = row.get("torch", {}).get(r)
                cells = [variant, base, str(r), f"{plain:.4f}" if plain else "-", f"{t:.4f}",
                         f"{t / plain:.2f}x" if plain else "-",
                         f"{t / torch:.2f}x" if torch else "-"]
                out.append(f"| {preset} | {mode} | {batch}@{size} | " + " | ".join(cells) + " |")
    if out:
        print("\nA/B rows (an environment switch; not in the verdict):")
        print("| preset | mode | batch@size | switch | row | round | plain s | with the switch s "
              "| switch / plain | with the switch / PyTorch f32 |")
        print("| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(out))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--close":
        try:
            fraction = float(sys.argv[2])
        except ValueError:
            sys.exit(f"--close takes a fraction such as 0.15, not {sys.argv[2]!r}")
        for key in close_rows(read(sys.argv[3]), fraction):
            print(*key)
        return
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rows = read(sys.argv[1])
    fmt = lambda s: f"{s:.4f}" if s is not None else "-"
    ratio = lambda r: f"{r:.2f}x" if r is not None else "-"
    rounds = max((len(k) for row in rows.values() for k in row.values()), default=1)
    per_round = " | bf16 / PyTorch per round" if rounds > 1 else ""
    print("| preset | mode | batch@size | PyTorch f32 s | glip f32 s | f32 graph s | f32 / PyTorch "
          f"| glip bf16 s | bf16 graph s | bf16 / PyTorch f32{per_round} | targets |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---:"
          f"{' | ---' if per_round else ''} | --- |")
    compared, met = 0, 0
    for (preset, mode, batch, size), row in sorted(rows.items()):
        torch = median(row.get("torch"))
        if torch is None:
            continue
        best = {p: best_ratio(row, p, torch) for p in ("f32", "bf16")}
        ok = (best["f32"] is not None and best["f32"] <= F32_LIMIT
              and best["bf16"] is not None and best["bf16"] <= BF16_LIMIT)
        why = [f"{p} {r:.2f}x > {lim}x" for p, r, lim in
               (("f32", best["f32"], F32_LIMIT), ("bf16", best["bf16"], BF16_LIMIT))
               if r is not None and r > lim]
        why += [f"no {p} row" for p in ("f32", "bf16") if best[p] is None]
        compared += 1
        met += ok
        cells = [fmt(torch), fmt(median(row.get("f32"))), fmt(median(row.get("f32 graph"))),
                 ratio(best["f32"]), fmt(median(row.get("bf16"))),
                 fmt(median(row.get("bf16 graph"))), ratio(best["bf16"])]
        if per_round:
            each = [ratio(best_ratio(row, "bf16", t, {r})) for r, t in sorted(row["torch"].items())]
            cells.append(" / ".join(each))
        cells.append("met" if ok else "NOT met: " + ", ".join(why))
        print(f"| {preset} | {mode} | {batch}@{size} | " + " | ".join(cells) + " |")
    if compared == 0:
        print("no row has both glip and PyTorch times")
        print_variants(rows)
        sys.exit(2)
    over = f", medians over up to {rounds} rounds" if rounds > 1 else ""
    print(f"targets (f32 <= {F32_LIMIT}x, bf16 <= {BF16_LIMIT}x PyTorch f32, the faster of eager "
          f"and graph{over}): met on {met} of {compared} rows")
    print_variants(rows)
    sys.exit(0 if met == compared else 1)


if __name__ == "__main__":
    main()
