"""What a replacement order could reach with a perfect stopping rule (issue 12's targets, measured).

    python benchmarks/frontier_benchmark.py --family vit-digits --threads 2
    python benchmarks/frontier_benchmark.py --family bert-sst2 --threads 2
    python benchmarks/frontier_benchmark.py --family vit-digits --threads 2 --block-size 256

The engine's search decides, on a small public validation split, how far along a cost order it
may go. Its results therefore mix two things: how good the *order* is, and how well the split
*measures* the drop. This benchmark separates them. For every target of a family
(``dedup_classifier_benchmark.py``'s families) and every order it replaces the first k % of the
planned replacements (k = 0, 10, …, 100, and 75, 85) and measures the drop on a **held-out pool**:
the public test set together with the private validation set (360 images on ``vit-digits``, 3,821
sentences on ``bert-sst2``). The pool only measures: no decision, no order and no released figure
uses it. Nothing here is a deduplication a user would run.

Printed per target and order: the held-out drop ± its paired SE at each k, and the *ceiling*: the
largest k whose held-out drop is within the threshold (1.5 points), with the compression ratio
there (rows the target keeps ÷ its rows; the engine's C.R. adds the constitution's few KB). The
ceiling of the best order is an upper bound for any search over that order: a search that stops
later is, on this pool, beyond the threshold. Beside it, the drop on the two public splits the
engine validates and confirms on (180 / 872 examples) at the same k: the noise the search works
against. Results: ``results/frontier_<family>.json`` (``_block<size>`` added for another
block size than 1,024).

Orders: ``fisher`` (the engine's default: empirical Fisher on the search split), ``fisher_pretrain``
(on the public pre-training data), ``taylor``, ``wanda``, ``delta``, ``saliency`` (the paper's
magnitude saliency, aligned candidates) and ``old`` (the paper's engine: nearest block among base ∪
own, magnitude saliency).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's package, not whichever one is installed
sys.path.insert(0, str(HERE / "families"))

from common import write_results  # noqa: E402
from dedup_classifier_benchmark import BLOCK, FAMILIES, OLD, THRESHOLD, open_family  # noqa: E402
from hf_dpdedup.dedup.live import LiveBlocks  # noqa: E402
from hf_dpdedup.dedup.plan import PlanConfig, plan_replacements  # noqa: E402
from hf_dpdedup.dedup.tasks import classification_score  # noqa: E402
from hf_dpdedup.dedup.validate import example_scores, paired_utility_stats  # noqa: E402
from hf_dpdedup.store.row_digests import row_hashes  # noqa: E402

FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0)


def held_out_pool(spec) -> list[dict[str, torch.Tensor]]:
    """The public test batches and the private validation set, in batches of 512 (measurement only)."""
    private = spec.private_val
    n = len(private["labels"])
    return list(spec.test) + [{k: v[i : i + 512] for k, v in private.items()} for i in range(0, n, 512)]


class Drop:
    """A target's drop on some batches: the per-example scores before any edit, kept once."""

    def __init__(self, model, batches) -> None:
        self.model, self.batches = model, batches
        self.before = example_scores(model, batches, classification_score)

    def now(self) -> tuple[float, float]:
        """(drop, paired SE) of the model as it is now against the unedited target."""
        difference = paired_utility_stats(self.model, self.batches, classification_score, self.before)[1]
        return -difference.mean, difference.se


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="vit-digits", choices=sorted(FAMILIES))
    parser.add_argument("--folder", type=Path, help="the family's folder (default benchmarks/families/<family>)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=BLOCK)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec, members, _ = open_family(args.family, args.folder)
    members.sort(key=lambda m: (m.privacy.epsilon, m.name))
    base, targets = members[0], members[1:]
    pool, public = held_out_pool(spec), list(spec.val) + list(spec.confirm)
    orders = {
        "fisher": (PlanConfig(), spec.val), "fisher_pretrain": (PlanConfig(), spec.calibration),
        "taylor": (PlanConfig(cost="taylor"), spec.val), "wanda": (PlanConfig(cost="wanda"), spec.val),
        "delta": (PlanConfig(cost="delta"), None),
        "saliency": (PlanConfig(order="saliency", saliency="magnitude"), spec.val), "old": (OLD, spec.val),
    }
    base_rows = LiveBlocks(base.model, args.block_size).rows
    base_hashes = set(row_hashes(base_rows))
    figures: dict[str, float] = {}
    print(f"held-out pool: {sum(len(b['labels']) for b in pool)} examples (public test + private validation); "
          f"public splits: {sum(len(b['labels']) for b in public)}; threshold {100 * THRESHOLD:.1f} points")
    for target in targets:
        live = LiveBlocks(target.model, args.block_size)
        shared = sum(h in base_hashes for h in row_hashes(live.rows))
        on_pool, on_public = Drop(target.model, pool), Drop(target.model, public)
        print(f"\n== {target.name} (ε {target.privacy.epsilon:g}; {live.n_blocks} rows, {shared} equal to the base's)")
        print(f"{'order':<16}" + "".join(f"{f'{f:.0%}':>14}" for f in FRACTIONS) + f"{'ceiling':>10}{'C.R.':>8}")
        for name, (plan, calibration) in orders.items():
            sequence = plan_replacements(target.model, live, base_rows, plan, calibration=calibration)
            cells, ceiling = [], 0
            for fraction in FRACTIONS:
                k = round(fraction * len(sequence))
                undo = live.apply(sequence[:k])
                (drop, se), (public_drop, _) = on_pool.now(), on_public.now()
                live.revert(undo)
                cells.append(f"{100 * drop:+6.2f}/{100 * public_drop:+5.1f}")
                key = f"{target.name}.{name}.{round(100 * fraction)}"
                figures.update({f"{key}.held_out_drop": drop, f"{key}.held_out_paired_se": se,
                                f"{key}.public_drop": public_drop})
                if drop <= THRESHOLD + 1e-12:
                    ceiling = max(ceiling, k)
            replaced, kept = ceiling / max(1, len(sequence)), (live.n_blocks - shared - ceiling) / live.n_blocks
            figures.update({f"{target.name}.{name}.ceiling_replaced": replaced,
                            f"{target.name}.{name}.ceiling_rows_kept": kept})
            print(f"{name:<16}" + "".join(f"{c:>14}" for c in cells) + f"{replaced:>10.0%}{kept:>8.1%}")
        print("cells: held-out drop / drop on the public splits, points")
    for name in orders:
        kept = [figures[f"{t.name}.{name}.ceiling_rows_kept"] for t in targets]
        figures[f"{name}.mean_ceiling_rows_kept"] = sum(kept) / len(kept)
        print(f"{name:<16} mean rows kept at the ceiling: {sum(kept) / len(kept):.1%} (target {spec.target_compression:.0%})")
    print()
    suffix = "" if args.block_size == BLOCK else f"_block{args.block_size}"
    write_results(f"frontier_{args.family.replace('-', '_')}{suffix}", figures)


if __name__ == "__main__":
    main()
