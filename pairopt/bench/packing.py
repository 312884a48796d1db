"""`python -m pairopt.bench.packing`: how tightly the token-budget sampler packs each profile.

Packing efficiency (real tokens / padded tokens) of `pairopt.engine.packing.pack_batches` on
the six length profiles (pairs drawn as in `pairopt bench`), unshared and shared, rows padded
to a multiple of `--bucket` (varlen: any length runs) or to exactly the budget (compiled
kernels). Lengths only: no model runs.
"""

from __future__ import annotations

import argparse
import random
import sys

from pairopt.bench.data import load_profiles, profile_lengths
from pairopt.engine.packing import pack_batches, packing_efficiency
from pairopt.pairs import shared_length, unshared_length


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pairopt.bench.packing", description=__doc__.splitlines()[0]
    )
    p.add_argument("--pairs", type=int, default=10_000)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--jitter", type=float, default=0.25)
    args = p.parse_args(argv)
    print(
        f"{'profile':<15}{'layout':<10}{'batches':>8}{'bucket ' + str(args.bucket):>12}{'fixed':>8}"
    )
    for name, profile in load_profiles().items():
        triples = profile_lengths(profile, args.pairs, args.jitter, random.Random(0))
        for length in (unshared_length, shared_length):
            lengths = [length(P, [C, R]) for P, C, R in triples]
            batches = pack_batches(lengths, args.max_tokens, window=args.window, seed=0)
            bucketed = packing_efficiency(lengths, batches, args.max_tokens, args.bucket)
            fixed = packing_efficiency(lengths, batches, args.max_tokens, args.max_tokens)
            layout = "shared" if length is shared_length else "unshared"
            print(f"{name:<15}{layout:<10}{len(batches):>8}{bucketed:>12.4f}{fixed:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
