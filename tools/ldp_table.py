"""Print what local differential privacy costs and how well the aggregator's de-biasing works (the figures
in PRIVACY.md).

    python -m tools.ldp_table            # per epsilon: p, q, interval half-widths, simulated coverage
    python -m tools.ldp_table --trials 400

For each epsilon: the probability that randomized response keeps the true category (p) and reports one
given other category (q) over the shipped interest list, the 95% interval half-width of a de-biased count
for two fleet sizes, and the share of intervals that held the true count on simulated populations
(seeded: the same figures on every run).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

from sotto.edge.ldp import RandomizedResponse
from sotto.ldp_math import debias, grr_probabilities
from sotto.policy import Policy
from sotto.wire import epsilon_milli

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
#: (reports in the retention window, true reports of the category asked about)
FLEETS = ((10_000, 500), (100_000, 5_000))


def coverage(categories: list[str], epsilon: float, reports: int, trials: int, seed: int) -> float:
    """Share of de-biased intervals (5 categories per trial) that hold the true count."""
    rng = random.Random(seed)
    rr = RandomizedResponse(categories, epsilon, rng)
    weights = [1.0 / (rank + 1) for rank in range(len(categories))]  # a few popular, a long tail
    watched = categories[:3] + categories[40:42]
    covered = total = 0
    for _ in range(trials):
        true = rng.choices(categories, weights=weights, k=reports)
        observed = Counter(rr.perturb(c) for c in true)
        truth = Counter(true)
        for cid in watched:
            est = debias([(epsilon_milli(epsilon), observed[cid], reports)], len(categories))
            covered += est.low <= truth[cid] <= est.high
            total += 1
    return covered / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=200, help="simulated populations per epsilon")
    parser.add_argument("--reports", type=int, default=3000, help="reports per simulated population")
    parser.add_argument("--models", default=None, help="models folder (default: the shipped models/)")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.reports < 1:
        parser.error("--trials and --reports must be at least 1")
    categories = sorted(Policy.load(args.models).interest_ids)
    k = len(categories)
    fleet_cols = [f"±95% at N={n:,}, true {t:,}" for n, t in FLEETS]
    header = ["epsilon", "p (kept)", "q (each other)", *fleet_cols, "coverage (simulated)"]
    print(f"k = {k} allowed categories; {args.trials} populations of {args.reports} reports per epsilon")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for epsilon in EPSILONS:
        p, q = grr_probabilities(epsilon, k)
        widths = []
        for n, t in FLEETS:
            expected = round(n * q + t * (p - q))
            est = debias([(epsilon_milli(epsilon), expected, n)], k)
            widths.append(f"{(est.high - est.low) / 2:,.0f}")
        rate = coverage(categories, epsilon, args.reports, args.trials, seed=int(epsilon * 1000))
        print(f"| {epsilon:g} | {p:.4f} | {q:.5f} | {' | '.join(widths)} | {rate:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
