"""Each target's throughput as a ratio of a reference target's, sweep by sweep, from reference-harness runs.

The harness (``../shared/bench/run.sh``) summarises each target by its median req/s over sweeps. On these
shared 2-core machines one target's sweep can move 25-40 % within a run while the next target's does not, so
a ratio of two medians can land anywhere in that spread. The sweeps are interleaved, so each sweep also gives
a ratio of its own (the two targets measured a few seconds apart); this prints both, every sweep's ratio and
their median, for every run named::

    python bench/harness_ratios.py ../shared/bench/results/20261203-225753 [more runs] [--ref envoy-jwt]

Read the spread before the median: a target whose sweep ratios run from 0.6 to 1.0 has not been measured to
two digits, whatever its median says.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load(run: Path) -> dict[str, dict[int, float]]:
    """req/s by target and sweep (one connection count: the highest in the run)."""
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
    conns = max(row["conns"] for row in rows)
    rps: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row["conns"] == conns:
            rps[row["target"]][row["sweep"]] = row["rps"]
    return rps


def report(run: Path, ref: str) -> list[str]:
    rps = load(run)
    if ref not in rps:
        raise SystemExit(f"{run}: no target {ref!r} (targets: {', '.join(rps)})")
    base = rps[ref]
    lines = [f"{run.name}: {ref} {statistics.median(base.values()):,.0f} req/s (median of {len(base)} sweeps)"]
    for target, sweeps in rps.items():
        if target == ref:
            continue
        ratios = [sweeps[s] / base[s] for s in sorted(sweeps) if s in base]
        if not ratios:
            continue
        of_medians = statistics.median(sweeps.values()) / statistics.median(base.values())
        lines.append(f"  {target:14s} ratio of medians {of_medians:.3f}  median of sweep ratios "
                     f"{statistics.median(ratios):.3f}  sweeps {' '.join(f'{r:.2f}' for r in ratios)}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="results directories of run.sh (each holds results.jsonl)")
    ap.add_argument("--ref", default="envoy-jwt", help="the target the others are divided by")
    args = ap.parse_args()
    for run in args.runs:
        print("\n".join(report(run, args.ref)))


if __name__ == "__main__":
    main()
