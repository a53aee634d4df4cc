"""How long one quantile comparison takes at 100,000 latencies per arm, for each method.

Why: the evaluator compares p95/p99 latency on every look (every ``cadence_s``, 5 s by default)
over the whole stage window; at 100,000 requests per arm the comparison must stay a small part
of a look (the target is under 0.1 s per method), or rollback waits on it. This was a timed
assertion in the tests; a time depends on the machine, so it is a figure here instead.

Lognormal latencies (median about 800 ms, sigma 0.8), both arms from the same distribution.
Each method is run once to warm up, then ``--repeat`` times; the script prints the median and
the slowest run.

    .venv/bin/python bench/quantile_speed.py [--per-arm 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from extproc.stats import quantile_difference
from extproc.stats.quantiles import QuantileMethod

METHODS: tuple[QuantileMethod, ...] = ("order-statistic", "bootstrap")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-arm", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(8)
    control = rng.lognormal(6.7, 0.8, args.per_arm)
    treatment = rng.lognormal(6.7, 0.8, args.per_arm)
    for method in METHODS:
        quantile_difference(control, treatment, method=method)  # warm-up
        runs = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            quantile_difference(control, treatment, method=method)
            runs.append(time.perf_counter() - started)
        print(
            f"{method:<16} {args.per_arm} per arm: median {statistics.median(runs) * 1000:.1f} ms, "
            f"slowest {max(runs) * 1000:.1f} ms over {args.repeat} runs"
        )


if __name__ == "__main__":
    main()
