"""Build the ``gpt2-sst2-lora`` benchmark family: DP-LoRA adapters on the public GPT-2 of ``gpt2-sst2-lm``.

    python benchmarks/families/gpt2_sst2_lora.py --threads 1      # builds benchmarks/families/gpt2-sst2-lora/
    python benchmarks/families/gpt2_sst2_lora.py --tune           # the ε = 8 grid on public validation

Base: ``benchmarks/families/gpt2-sst2-lm/base`` (the GPT-2 of ``gpt2_sst2_lm.py``, pre-trained
without DP on a public slice of SST-2 train); built with that script's :func:`build_base` when
missing. Data, privacy unit (one sentence), utility (mean per-sentence next-token accuracy) and
splits are the ``gpt2-sst2-lm`` family's. Every member gets the same LoRA adapter init
(seed 7) on the base's attention and MLP ``Conv1D`` layers, is DP-trained with Opacus (ghost
clipping; only ``lora_A``/``lora_B`` train) at ε ∈ {1, 2, 4, 8}, δ = 1e-5, and is saved twice:
as a peft adapter folder (``adapter/eps-<ε>``) and merged into the base (``merged/eps-<ε>``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from hf_dpdedup.training import DPConfig, load_privacy, train_dp, train_members
from hf_dpdedup.training.lora import LoraMemberSaver, LoraSpec, trainable_names, wrap_lora
from gpt2_sst2_lm import (  # sibling build script: same base, data, loss and utility
    DELTA, N_PRIVATE_TRAIN, SEED, SequenceCrossEntropy, forward, load_base, utility,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import write_results  # noqa: E402  (benchmarks/common.py)

BASE = HERE / "gpt2-sst2-lm" / "base"
EPSILONS = [1.0, 2.0, 4.0, 8.0]
DATASET_ID = f"glue/sst2:train.tsv#lm-private-train(seed={SEED},n={N_PRIVATE_TRAIN})"
# The grid's starting point: r 8, α 16, all Conv1D layers, Adam 1e-2, 2 epochs (32 steps).
START = LoraSpec(r=8, alpha=16, target_modules=("c_attn", "c_proj", "c_fc"), dropout=0.0)
START_CONFIG = DPConfig(
    epsilon=8.0, delta=DELTA, epochs=2, batch_size=512, lr=1e-2, optimizer="adam",
    max_grad_norm=1.0, grad_sample_mode="ghost", seed=SEED,
)
# (LoRA spec, DP config) pairs tried by --tune, in the order they were run.
GRID = [
    (START, START_CONFIG),
    (START, replace(START_CONFIG, lr=3e-3)),
    (START, replace(START_CONFIG, lr=3e-2)),
    (replace(START, r=4, alpha=8), START_CONFIG),
    (replace(START, r=16, alpha=32), START_CONFIG),
    (replace(START, target_modules=("c_attn",)), START_CONFIG),
    (START, replace(START_CONFIG, epochs=4)),
    # second round, around the best of the first (r = 4)
    (replace(START, r=2, alpha=4), START_CONFIG),
    (replace(START, r=4, alpha=8), replace(START_CONFIG, lr=5e-3)),
    (replace(START, r=4, alpha=8), replace(START_CONFIG, epochs=4)),
]
# Chosen by --tune at ε = 8 on public validation only (grid point 9; see benchmarks/RESULTS.md).
LORA, CONFIG = GRID[9]


def tune(base_dir: Path, points: list[int] | None = None) -> list[dict]:
    """Grid points (all, or those indexed by ``points``) at ε = 8: public validation utility only."""
    rows = []
    for i, (spec, config) in enumerate(GRID):
        if points is not None and i not in points:
            continue
        model, _, _, packed = load_base(base_dir)
        peft_model = wrap_lora(model, spec, task_type="CAUSAL_LM", seed=SEED, base_name=str(base_dir))
        result = train_dp(peft_model, TensorDataset(packed["private_train"]), forward=forward,
                          criterion=SequenceCrossEntropy(), config=config, dataset_ids=(DATASET_ID,))
        row = {"point": i, "lora": spec.to_dict(), "lr": config.lr, "epochs": config.epochs, "optimizer": config.optimizer,
               "steps": result.steps, "epsilon": result.epsilon,
               "public_val": utility(peft_model, packed["public_val"]), "seconds": round(result.seconds, 1)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "gpt2-sst2-lora")
    parser.add_argument("--base", type=Path, default=BASE)
    parser.add_argument("--epsilons", type=float, nargs="+", default=EPSILONS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tune", action="store_true", help="run the ε = 8 grid on public validation and exit")
    parser.add_argument("--points", type=int, nargs="+", help="with --tune: only these grid indices")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.tune:
        print(json.dumps(tune(args.base, args.points), indent=2))
        return 0
    model, tokenizer, _, packed = load_base(args.base)
    base_val, base_test = utility(model, packed["public_val"]), utility(model, packed["public_test"])
    peft_model = wrap_lora(model, LORA, task_type="CAUSAL_LM", seed=SEED, base_name=str(args.base))
    rows = train_members(
        model=peft_model, module=peft_model, train_set=TensorDataset(packed["private_train"]), forward=forward,
        criterion=SequenceCrossEntropy(),
        evaluate=lambda m: (utility(m, packed["public_val"]), utility(m, packed["public_test"])),
        epsilons=args.epsilons, config=CONFIG, out=args.out, dataset_id=DATASET_ID,
        trained_names=trainable_names(peft_model),
        saver=LoraMemberSaver({"adapter": args.out / "adapter", "merged": args.out / "merged"}, processor=tokenizer),
        extra_args={"base": str(args.base), "strategy": "lora", "lora": LORA.to_dict(),
                    "utility": "mean per-sentence next-token accuracy",
                    "base_public_val_utility": base_val, "base_public_test_utility": base_test},
    )
    total = time.perf_counter() - started
    write_figures(rows, total, base_val, base_test)
    print(json.dumps({"wall_seconds": round(total, 1), "base_public_val": base_val, "base_public_test": base_test,
                      "members": [r.__dict__ for r in rows]}, indent=2))
    return 0


def write_figures(rows, wall_seconds: float, base_val: float, base_test: float) -> Path:
    """``benchmarks/results/gpt2_sst2_lora_family.json`` (recorded ε read back from each member)."""
    figures: dict[str, float] = {"wall_seconds": round(wall_seconds, 1), "members": len(rows),
                                 "base_val_acc": base_val, "base_test_acc": base_test,
                                 "lora_r": LORA.r, "lora_alpha": LORA.alpha}
    for r in rows:
        key = f"eps{r.epsilon:g}"
        figures.update({f"{key}_recorded_epsilon": load_privacy(r.path).epsilon,
                        f"{key}_test_acc": r.public_test_accuracy, f"{key}_val_acc": r.public_val_accuracy,
                        f"{key}_noise_multiplier": r.noise_multiplier, f"{key}_steps": r.steps,
                        f"{key}_seconds": round(r.seconds, 1)})
    return write_results("gpt2_sst2_lora_family", figures)


if __name__ == "__main__":
    sys.exit(main())
