"""``hf-dpdedup train-family``: DP fine-tune one base model at several privacy budgets.

Example::

    hf-dpdedup train-family --base path/to/bert --data hf_dpdedup/data/sst2 \\
        --epsilons 1 2 4 6 8 --delta 1e-5 --out families/my-family

``--data`` and the public flags take any data source (``hf_dpdedup.cli.data_flags``): a GLUE folder as
above, ``stanfordnlp/sst2`` (train / validation / test splits), a ``save_to_disk`` folder, or files.

DP-LoRA (peft adapter on the frozen base; only the adapter and the classifier are DP-trained)::

    hf-dpdedup train-family --base path/to/bert --data hf_dpdedup/data/sst2 \\
        --lora r=8,alpha=16,target_modules=query+value --save adapter \\
        --epsilons 1 2 4 8 --delta 1e-5 --out families/my-lora-family
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS

from . import COMMANDS
from ..data import DataSource, available_splits
from ..errors import TrainingConfigError
from ..training import DPConfig, check_family_request, load_text_data, split_private, train_text_family
from ..training.lora import parse_lora_spec
from .data_flags import add_data_flags, data_source


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-family", help=COMMANDS["train-family"][1],
        description="Fine-tune one base model on one private data set once per ε with DP-SGD "
        "(Opacus) and save every member as a transformers folder with privacy.json "
        "(with --lora: a DP-trained peft adapter, saved as an adapter folder or merged).",
    )
    p.add_argument("--base", required=True, help="transformers model folder or Hub id (a sequence classifier base)")
    p.add_argument("--data", required=True,
                   help="private training data, PATH_OR_ID[:SPLIT] (see 'data sources' below). Without :SPLIT, a "
                        "source with splits (GLUE folder, DatasetDict, Hub data set) gives train, dev or validation, "
                        "and test; a single file or split needs --public-test")
    p.add_argument("--public-val", help="public validation data (default: the dev/validation split of --data, "
                                        "else --public-test)")
    p.add_argument("--public-test", help="public test data (default: the test split of --data)")
    p.add_argument("--epsilons", type=float, nargs="+", required=True, help="one member per ε, e.g. 1 2 4 6 8")
    p.add_argument("--delta", type=float, required=True, help="δ of every member, e.g. 1e-5")
    p.add_argument("--out", type=Path, required=True, help="family folder; one eps-<ε> subfolder per member")
    p.add_argument("--dataset-id", help="id recorded in privacy.json (default: the training file path)")
    p.add_argument("--validation-fraction", type=float, default=0.05,
                   help="held out of the private data as private validation for the dedup engine (default 0.05)")
    p.add_argument("--strategy", choices=("top-cls", "direct", "lora"),
                   help="top-cls (default): cache frozen activations, train top layer + head (BERT); "
                        "direct: all but embeddings; lora: implied by --lora")
    p.add_argument("--lora", metavar="SPEC",
                   help="DP-train a LoRA adapter (peft) + the classifier instead: comma-separated key=value, "
                        "keys r (int), alpha (number), target_modules (names joined by '+'; default: peft's "
                        "choice for the model type), dropout (default 0.0); e.g. "
                        "r=8,alpha=16,target_modules=query+value,dropout=0.0")
    p.add_argument("--save", choices=("adapter", "merged"),
                   help="with --lora: save each member as a peft adapter folder (default) or merged into the base")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1024, help="logical (expected Poisson) batch size")
    p.add_argument("--physical-batch-size", type=int, help="largest batch held in memory at once")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--optimizer", choices=("sgd", "adam", "lars"), default="sgd")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C")
    p.add_argument("--grad-sample-mode", choices=("ghost", "hooks"), default="ghost")
    p.add_argument("--max-length", type=int, default=32, help="tokens per sentence")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the split and classifier init (and, with --seeded-noise, sampling and noise)")
    p.add_argument("--seeded-noise", action="store_true",
                   help="TEST ONLY: seed DP-SGD's sampling and noise from --seed (reproducible, not a privacy "
                        "guarantee; recorded as seeded in privacy.json and every card). Default: os.urandom")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_flags(p)
    p.set_defaults(func=run)


def _data_sources(args: argparse.Namespace) -> tuple[DataSource, DataSource, DataSource]:
    """(private training, public validation, public test) sources of the command line."""
    data = data_source(args, args.data)
    splits = () if data.split is not None else available_splits(data)
    if not splits:  # one file, one split, one saved Dataset
        if args.public_test is None:
            raise TrainingConfigError("--data is a file (or one split): also pass --public-test (and optionally "
                                      "--public-val).")
        train, test = data, data_source(args, args.public_test)
        val = data_source(args, args.public_val) if args.public_val else test
        return train, val, test
    val_split = next((s for s in ("dev", "validation") if s in splits), "validation")
    val = data_source(args, args.public_val) if args.public_val else data.with_split(val_split)
    test = data_source(args, args.public_test) if args.public_test else data.with_split("test")
    return data.with_split("train"), val, test


def _lora_options(args: argparse.Namespace):
    """``(strategy, LoraSpec | None, save_as)`` from ``--strategy``, ``--lora`` and ``--save``."""
    if args.lora is None:
        if args.strategy == "lora":
            raise TrainingConfigError("--strategy lora needs the adapter's shape: pass --lora r=8,alpha=16 "
                                      "(see --help for the keys).")
        if args.save is not None:
            raise TrainingConfigError("--save adapter|merged applies to LoRA members only; add --lora or drop --save.")
        return args.strategy or "top-cls", None, "adapter"
    if args.strategy not in (None, "lora"):
        raise TrainingConfigError(f"--lora is its own strategy and cannot be combined with --strategy {args.strategy}; "
                                  "drop --strategy.")
    return "lora", parse_lora_spec(args.lora), args.save or "adapter"


def run(args: argparse.Namespace) -> int:
    # Validate everything cheap before loading a model or touching the data in earnest.
    strategy, lora, save_as = _lora_options(args)
    config = DPConfig(
        epsilon=args.epsilons[0], delta=args.delta, epochs=args.epochs, batch_size=args.batch_size,
        physical_batch_size=args.physical_batch_size, lr=args.lr, optimizer=args.optimizer,
        momentum=args.momentum, max_grad_norm=args.max_grad_norm,
        grad_sample_mode=args.grad_sample_mode, seed=args.seed, secure_mode=not args.seeded_noise,
    )
    train_source, val_source, test_source = _data_sources(args)
    private = load_text_data(train_source)
    public_val, public_test = load_text_data(val_source), load_text_data(test_source)
    check_family_request(args.epsilons, args.delta, private, public_val, public_test)
    train, private_val = split_private(private, validation_fraction=args.validation_fraction, seed=args.seed)
    split = f"train(seed={args.seed},frac={1 - args.validation_fraction:g})"
    dataset_id = args.dataset_id or f"{train_source.describe()}#{split}"
    bars = _Bars(disabled=args.no_progress)
    try:
        rows = train_text_family(
            base=args.base, train=train, public_val=public_val, public_test=public_test,
            epsilons=args.epsilons, config=config, out=args.out, dataset_id=dataset_id,
            strategy=strategy, lora=lora, save_as=save_as, max_length=args.max_length, progress=bars.update,
            extra_args={"private_split": {"seed": args.seed, "validation_fraction": args.validation_fraction,
                                          "n_train": len(train), "n_validation": len(private_val)}},
        )
    finally:
        bars.close()
    print(format_table(rows))
    return 0


def format_table(rows) -> str:
    """The family summary: one line per member."""
    header = f"{'ε':>6} {'δ':>8} {'steps':>6} {'σ':>7} {'val acc':>8} {'test acc':>8}  path"
    lines = [header, "-" * len(header)]
    for r in rows:
        eps = "inf" if math.isinf(r.epsilon) else f"{r.epsilon:g}"
        lines.append(
            f"{eps:>6} {r.delta:>8.0e} {r.steps:>6d} {r.noise_multiplier:>7.3f} "
            f"{r.public_val_accuracy:>8.4f} {r.public_test_accuracy:>8.4f}  {r.path}"
        )
    return "\n".join(lines)


class _Bars:
    """One tqdm bar per stage label (caching, then one per member)."""

    def __init__(self, *, disabled: bool) -> None:
        self.disabled, self.label, self.bar = disabled, None, None

    def update(self, label: str, done: int, total: int) -> None:
        if label != self.label:
            self.close()
            self.label = label
            self.bar = tqdm(total=total, desc=label, disable=self.disabled, leave=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
