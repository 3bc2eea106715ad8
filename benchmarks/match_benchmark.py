"""Match benchmark: nearest blocks of a synthetic 1B-parameter base/target pair on 2 CPU threads.

Target (from the issue): block size 2^20, 954 blocks per model (≈ 1.0 B parameters each), matched
with the sketch pre-filter + exact re-ranking in ≤ 120 s, with recall@1 ≥ 0.99 against exact
search on a sample of targets. Both models are stored in bfloat16 (2 × 2 GiB; float32 would be
2 × 4 GiB), as a family converted with ``model.to(torch.bfloat16)`` would be.

The synthetic target is shaped like a DP fine-tune of the base: every block is a base block plus
noise (5 % of the weight scale; 50 % on one block in 20, "heavily updated"), 10 % of the blocks
are shuffled among themselves (their nearest base block has another index), and 3 % are near
copies of another block of the target itself (their nearest is a "self" candidate).

Figures (one run, so compare ratios: the machine is shared):
- ``l2_sketch_s``: sketch + re-rank, all targets against base ∪ target (1,908 candidates).
- ``l2_exact_sample_s`` on ``--sample`` targets, ``l2_exact_full_extrapolated_s`` = that × n / sample.
- ``l2_recall_at_1``: sketch top-1 = exact top-1 (or an equal distance) on the sample.
- ``l2_exact_over_sketch``: extrapolated exact time ÷ sketch time.
- the same for ``l1`` and ``cosine`` on a smaller pair (``--small-blocks`` blocks per model).
- ``peak_rss_gib``: the process's peak resident memory.

Run: python benchmarks/match_benchmark.py [--blocks 954] [--sample 48] [--small-blocks 96]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from common import write_results
from hf_dpdedup.dedup.similarity import nearest_blocks
from hf_dpdedup.testing import candidate_pool

BLOCK_SIZE = 2**20
WEIGHT_STD = 0.02


def synthetic_pair(n: int, bs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(base, target)`` bfloat16 block matrices; filled a few rows at a time (no float32 copy)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.empty(n, bs, dtype=torch.bfloat16)
    target = torch.empty(n, bs, dtype=torch.bfloat16)
    source = torch.arange(n)
    shuffled = torch.randperm(n, generator=g)[: n // 10]
    source[shuffled] = shuffled[torch.randperm(shuffled.numel(), generator=g)]
    noise = torch.full((n,), 0.05 * WEIGHT_STD)
    noise[torch.randperm(n, generator=g)[: n // 20]] = 0.5 * WEIGHT_STD
    buf = torch.empty(16, bs)
    for r0 in range(0, n, 16):
        rows = buf[: min(16, n - r0)]
        base[r0 : r0 + rows.shape[0]] = torch.randn(rows.shape, generator=g, out=rows).mul_(WEIGHT_STD)
    for r0 in range(0, n, 16):
        rows = buf[: min(16, n - r0)]
        torch.randn(rows.shape, generator=g, out=rows).mul_(noise[r0 : r0 + rows.shape[0], None])
        target[r0 : r0 + rows.shape[0]] = rows.add_(base[source[r0 : r0 + rows.shape[0]]])
    # Near copies of other target blocks: their nearest candidate is the target's own block.
    copies = torch.randperm(n, generator=g)[: 2 * (3 * n // 100)].view(2, -1)
    for dst, src in copies.T.tolist():
        target[dst] = target[src].float() + 0.01 * WEIGHT_STD * torch.randn(bs, generator=g)
    return base, target


def run_metric(metric: str, base: torch.Tensor, target: torch.Tensor, sample: int, seed: int = 1) -> dict[str, float]:
    pool = candidate_pool(base, target)
    start = time.perf_counter()
    sketch = nearest_blocks(target, pool.parts, metric=metric, exclude_self=pool.exclude_self, method="sketch")
    sketch_s = time.perf_counter() - start
    rows = torch.randperm(target.shape[0], generator=torch.Generator().manual_seed(seed))[:sample].sort().values
    start = time.perf_counter()
    # The sample's own rows keep their candidate numbers: exclude_self still points at each target itself.
    exact = nearest_blocks(target[rows], pool.parts, metric=metric, exclude_self=pool.exclude_self[rows])
    exact_s = time.perf_counter() - start
    same = (sketch.indices[rows, 0] == exact.indices[:, 0]) | (sketch.distances[rows, 0] <= exact.distances[:, 0])
    full = exact_s * target.shape[0] / rows.numel()
    return {
        f"{metric}_blocks_per_model": target.shape[0],
        f"{metric}_sketch_s": sketch_s,
        f"{metric}_exact_sample_targets": rows.numel(),
        f"{metric}_exact_sample_s": exact_s,
        f"{metric}_exact_full_extrapolated_s": full,
        f"{metric}_exact_over_sketch": full / sketch_s,
        f"{metric}_recall_at_1": same.double().mean().item(),
        f"{metric}_self_matches_share": (sketch.indices[:, 0] >= base.shape[0]).double().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=954, help="blocks per model for the L2 run (954 ≈ 1 B parameters)")
    parser.add_argument("--sample", type=int, default=48, help="targets searched exactly for recall and timing")
    parser.add_argument("--small-blocks", type=int, default=96, help="blocks per model for the L1 / cosine runs")
    parser.add_argument("--small-sample", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    figures: dict[str, float] = {"threads": 2, "block_size": BLOCK_SIZE}
    start = time.perf_counter()
    base, target = synthetic_pair(args.blocks, BLOCK_SIZE)
    figures["params_per_model"] = target.numel()
    figures["generate_s"] = time.perf_counter() - start
    figures.update(run_metric("l2", base, target, args.sample))
    del base, target
    base, target = synthetic_pair(args.small_blocks, BLOCK_SIZE, seed=2)
    for metric in ("l1", "cosine"):
        figures.update(run_metric(metric, base, target, args.small_sample))
    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    write_results("match", figures)


if __name__ == "__main__":
    main()
