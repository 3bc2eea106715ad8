"""``hf-dpdedup dedup MODEL... --out STORE``: deduplicate a family of DP fine-tuned models.

Each MODEL is a transformers folder with a ``privacy.json`` (written by ``train-family``: ε, δ,
data set ids, accountant history), or a peft adapter folder (``adapter_config.json`` naming its base
by folder or Hub id) with a ``privacy.json``: adapters are stored on one shared copy of the base and
deduplicated against each other (use a ``--block-size`` no larger than the adapter matrices). Utility
data are any data source, ``PATH_OR_ID[:SPLIT]``: a Hub data set id, a ``save_to_disk`` folder, a
csv/tsv/json/jsonl/parquet file or a GLUE folder split (:mod:`hf_dpdedup.cli.data_flags`).
``--task image-classification`` reads an image column through the first member's image processor.
The search never confirms its replacements on the data it chose them on: without ``--confirm``, half
of ``--val`` (``--hold-out``, seeded) is held out as the confirmation set.

Under ``torchrun`` / ``accelerate launch`` (more than one process) the run is distributed with
:mod:`hf_dpdedup.distributed`: ``torchrun --nproc_per_node 4 -m hf_dpdedup.cli dedup ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
from pathlib import Path
from typing import Any

import transformers

from . import COMMANDS
from .. import distributed
from ..adapters import model_config
from ..dedup.planner import DedupData, Member
from ..dedup.storing import deduplicate_family
from ..dedup.tasks import SCORES, classification_predict, held_out_batches, private_source, source_batches
from ..training.members import load_privacy
from ..dedup.config import MCTS, STRATEGIES, SVT, VALIDATIONS, DedupConfig, Gallop, Greedy, NaiveLaplace, PlanConfig
from ..dedup.typed import literal_choices
from ..errors import ConfigError, PrivacyBudgetError, TrainingConfigError
from .data_flags import add_data_flags, data_source


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help=COMMANDS["dedup"][1])
    p.add_argument("models", nargs="+", help="member folders (transformers or peft adapter folders, each with privacy.json)")
    p.add_argument("--out", required=True, help="new family store folder")
    p.add_argument("--task", default="text-classification",
                   choices=["text-classification", "image-classification", "causal-lm"],
                   help="text tasks use the first member's tokenizer, image-classification its image processor")
    p.add_argument("--val", required=True, help="public validation data, PATH_OR_ID[:SPLIT] (see 'data sources')")
    p.add_argument("--confirm", help="second public data set: accepted replacements are confirmed on it and the "
                   "longest cheapest-first prefix that passes is kept (guards against overfitting --val)")
    p.add_argument("--hold-out", type=float, default=None, metavar="FRACTION",
                   help="without --confirm: hold out this fraction of --val (at random, --hold-out-seed) as the "
                        f"confirmation set (default {DEFAULT_HOLD_OUT:g}; 0 searches on all of --val, unconfirmed)")
    p.add_argument("--hold-out-seed", type=int, default=0, help="seed of the --hold-out cut (default 0)")
    p.add_argument("--test", help="public test data for reported accuracies")
    p.add_argument("--test-dataset-id", help="Hub id of the public test set, for model-card results (e.g. stanfordnlp/sst2)")
    p.add_argument("--private-val", help="private validation data (read only into the private-data firewall; "
                                         "used only through SVT / naive Laplace)")
    p.add_argument("--private-id", help="data set id of the private validation set (default: the members' training id)")
    p.add_argument("--private-size", type=int,
                   help="public normaliser n of the private validation set, fixed before looking at it (e.g. the "
                        "planned split size); its true row count is private. Required with --private-val")
    add_config_flags(p)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--report", help="folder for dedup_report.{json,txt,png} (default: OUT/report)")
    add_data_flags(p, image=True, member_labels=True)
    d = p.add_argument_group("distributed (under torchrun / accelerate launch)")
    d.add_argument("--parallel", default="auto", choices=["auto", "data", "groups"],
                   help="auto: one team of processes per model group; data: all on each model; groups: one per process")
    d.add_argument("--cpu", action="store_true", help="run on CPU with gloo even where GPUs exist")
    d.add_argument("--timeout", type=float, default=3600.0, help="seconds a process waits for a silent peer")
    d.add_argument("--device-map", help="load each member with this Accelerate device map (e.g. auto) over "
                                        "this process' GPUs: for members larger than one device")
    p.set_defaults(func=run)


def class_names(config) -> tuple[str, ...] | None:
    """The members' class names in id order (``id2label``), unless they are transformers' placeholders
    ``LABEL_<i>``: string labels in the data are mapped to ids through them."""
    id2label = getattr(config, "id2label", None) or {}
    names = tuple(str(id2label[i]) for i in sorted(id2label, key=int))
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


# --- the DedupConfig flags: every default is the dataclass's own ------------------------------------
_CONFIG = DedupConfig()
#: without --confirm, the share of --val held out to confirm the search's replacements on
DEFAULT_HOLD_OUT = 0.5
_PLAN = PlanConfig()
# interactive's dataclass default is None ("not agreement"), which the resolved DedupConfig() hides
_CONFIG_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DedupConfig)}

#: DedupConfig fields no flag sets, and why (tests/test_dedup_config.py checks every other field has one)
PYTHON_ONLY = {
    "noise_seed": "seeded noise is for tests only; the command line always draws secure noise",
}


def _default(value) -> str:
    return f"(default: {value})"


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The flags that build :class:`~hf_dpdedup.dedup.config.DedupConfig` (see :func:`config_from_args`).

    Flags of a validation or strategy kind default to None: the kind's own dataclass default applies."""
    p.add_argument("--block-size", type=int, default=_CONFIG.block_size, help=_default(_CONFIG.block_size))
    p.add_argument("--threshold", type=float, default=_CONFIG.threshold,
                   help=f"allowed utility drop (0.015 = 1.5 points) {_default(_CONFIG.threshold)}")
    p.add_argument("--base", default=_CONFIG.base, help="member folder name to use as base (default: smallest ε)")
    p.add_argument("--validation", default=_CONFIG.validation.kind, choices=list(VALIDATIONS),
                   help="public: public validation data; svt / naive: --private-val through the Sparse Vector "
                        f"Technique / one Laplace release per query {_default(_CONFIG.validation.kind)}")
    p.add_argument("--svt-epsilon", type=float, help=f"svt: ε per target {_default(SVT().epsilon)}")
    p.add_argument("--svt-cutoff", type=int, help=f"svt: 'too big a drop' answers before it halts {_default(SVT().cutoff)}")
    p.add_argument("--naive-epsilon", type=float,
                   help=f"naive: ε per query {_default(NaiveLaplace().epsilon_per_query)}")
    p.add_argument("--floor-epsilon", type=float, help="svt / naive: ε of the interactive floor's release of the "
                                                      f"previous model's private utility {_default(SVT().floor_epsilon)}")
    p.add_argument("--strategy", default=_CONFIG.strategy.kind, choices=list(STRATEGIES), help=_default(_CONFIG.strategy.kind))
    p.add_argument("--greedy-n", type=int, help=f"greedy: group size {_default(Greedy().n)}")
    p.add_argument("--min-group", type=int, help=f"gallop / binary / halving: smallest group {_default(Gallop().min_group)}")
    p.add_argument("--max-validations", type=int,
                   help=f"gallop: validations per target at most {_default(Gallop().max_validations)}")
    p.add_argument("--mcts-group", type=int, help=f"mcts: replacements per decision {_default(MCTS().group)}")
    p.add_argument("--mcts-episodes", type=int, help=f"mcts: validations {_default(MCTS().episodes)}")
    p.add_argument("--mcts-seed", type=int, help=f"mcts: tree search seed (not a privacy noise seed) {_default(MCTS().seed)}")
    p.add_argument("--candidates", default=_PLAN.candidates, choices=literal_choices(PlanConfig, "candidates"),
                   help="aligned: the base's block at the same position (default); nearest: the paper's rule")
    p.add_argument("--aligned-only", dest="use_self", action="store_false", default=_PLAN.use_self,
                   help="candidates are only the base's blocks at the same position: no search for close blocks "
                        "elsewhere (it compares every block with every other and holds two block matrices in memory; "
                        "use this for LLM-sized members)")
    p.add_argument("--close-ratio", type=_ratio, default=_PLAN.close_ratio,
                   help="offer another block only if nearer than this × the aligned distance ('none': no guard) "
                        f"{_default(_PLAN.close_ratio)}")
    p.add_argument("--order", default=_PLAN.order, choices=literal_choices(PlanConfig, "order"),
                   help="cost: estimated loss increase of each replacement (default); saliency: the paper's")
    p.add_argument("--cost", default=_PLAN.cost, choices=literal_choices(PlanConfig, "cost"), help=_default(_PLAN.cost))
    p.add_argument("--saliency", default=_PLAN.saliency, choices=literal_choices(PlanConfig, "saliency"),
                   help=_default(_PLAN.saliency))
    p.add_argument("--aggregate", default=_PLAN.aggregate, choices=literal_choices(PlanConfig, "aggregate"),
                   help=_default(_PLAN.aggregate))
    p.add_argument("--metric", default=_PLAN.metric, choices=literal_choices(PlanConfig, "metric"), help=_default(_PLAN.metric))
    p.add_argument("--top-k", type=int, default=_PLAN.top_k, help=f"nearest blocks looked at per block {_default(_PLAN.top_k)}")
    p.add_argument("--similarity-method", dest="method", default=_PLAN.method, choices=literal_choices(PlanConfig, "method"),
                   help=f"nearest-block search; sketch for very large families {_default(_PLAN.method)}")
    p.add_argument("--fisher-micro-batch", type=_count_or_none, default=_PLAN.fisher_micro_batch,
                   help=f"examples per Fisher gradient (1: per example; 'none': whole batches) {_default(_PLAN.fisher_micro_batch)}")
    p.add_argument("--fisher-max-examples", type=_count_or_none, default=_PLAN.fisher_max_examples,
                   help=f"examples the Fisher is estimated on ('none': all) {_default(_PLAN.fisher_max_examples)}")
    p.add_argument("--only-tensor", dest="only_tensors", action="append", metavar="NAME",
                   help="replace blocks of this tensor only (repeatable; default: every tensor)")
    p.add_argument("--interactive", action=argparse.BooleanOptionalAction, default=_CONFIG_FIELD_DEFAULTS["interactive"],
                   help="floor from the previous model: max(U'_{i-1}, U_i − threshold) (default: on, off under --agreement)")
    p.add_argument("--floor-margin-se", type=float, default=_CONFIG.floor_margin_se,
                   help="public validation: the floor lets a target end this many paired standard errors of the "
                        "per-example difference below the previous model (0: the paper's exact comparison) "
                        f"{_default(_CONFIG.floor_margin_se)}")
    p.add_argument("--drop-bound-se", type=float, default=_CONFIG.drop_bound_se,
                   help="public validation: accept only when the drop plus this many paired standard errors is "
                        f"within the threshold (an upper confidence bound; 0: the measured drop) {_default(_CONFIG.drop_bound_se)}")
    p.add_argument("--agreement", action="store_true", default=_CONFIG.agreement,
                   help="validate on agreement with each target's own predictions instead of on labels "
                        "(classification tasks)")
    p.add_argument("--confirm-margin-se", type=float, default=_CONFIG.confirm_margin_se,
                   help="--confirm accepts threshold + this many standard errors of the drop "
                        f"{_default(_CONFIG.confirm_margin_se)}")
    p.add_argument("--confirmation", default=_CONFIG.confirmation, choices=literal_choices(DedupConfig, "confirmation"),
                   help="what --confirm keeps when it rejects: prefix (longest cheapest-first prefix that passes) or "
                        f"gallop (skip rejected replacements) {_default(_CONFIG.confirmation)}")
    p.add_argument("--fairness", choices=literal_choices(DedupConfig, "fairness"), default=_CONFIG.fairness,
                   help="flag (default): members with a higher ε but a lower public utility than a lower-ε member are "
                        "stored and flagged; drop: leave them out of the store; off: no verdict. Any verdict charges "
                        "each member the training of every lower-ε member it compared with")
    p.add_argument("--overlap", nargs=2, action="append", default=[], metavar=("ID_A", "ID_B"),
                   help="two data set ids that share individuals (composed sequentially); repeatable")


def _ratio(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _count_or_none(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


_STRATEGY_FLAGS = {"min_group": "min_group", "max_validations": "max_validations", "n": "greedy_n",
                   "group": "mcts_group", "episodes": "mcts_episodes", "seed": "mcts_seed"}
_VALIDATION_FLAGS = {"svt": {"epsilon": "svt_epsilon", "cutoff": "svt_cutoff", "floor_epsilon": "floor_epsilon"},
                     "naive": {"epsilon_per_query": "naive_epsilon", "floor_epsilon": "floor_epsilon"}}


def config_from_args(args: argparse.Namespace) -> DedupConfig:
    """The DedupConfig the flags ask for: unset kind options keep their dataclass defaults."""
    kind = STRATEGIES[args.strategy]
    strategy = kind(**{name: getattr(args, _STRATEGY_FLAGS[name]) for name in kind().options()
                       if getattr(args, _STRATEGY_FLAGS[name]) is not None})
    flags = _VALIDATION_FLAGS.get(args.validation, {})
    validation = VALIDATIONS[args.validation](**{name: getattr(args, flag) for name, flag in flags.items()
                                                 if getattr(args, flag) is not None})
    plan = PlanConfig(candidates=args.candidates, close_ratio=args.close_ratio, order=args.order, cost=args.cost,
                      saliency=args.saliency, aggregate=args.aggregate, metric=args.metric, use_self=args.use_self,
                      top_k=args.top_k, method=args.method, fisher_micro_batch=args.fisher_micro_batch,
                      fisher_max_examples=args.fisher_max_examples,
                      only_tensors=frozenset(args.only_tensors) if args.only_tensors else None)
    return DedupConfig(
        block_size=args.block_size, threshold=args.threshold, strategy=strategy, plan=plan, validation=validation,
        interactive=args.interactive, agreement=args.agreement, confirm_margin_se=args.confirm_margin_se,
        floor_margin_se=args.floor_margin_se, drop_bound_se=args.drop_bound_se,
        confirmation=args.confirmation, base=args.base, fairness=args.fairness,
        overlaps=tuple(tuple(pair) for pair in args.overlap),
    )


def public_splits(args: argparse.Namespace, processor, source, **kw) -> tuple[list, list | None, dict[str, Any]]:
    """The search's validation batches, the confirmation's (``--confirm``'s data set, else the
    ``--hold-out`` part of ``--val``; none with ``--hold-out 0``) and a record of how they were
    formed, for the report (the engine sees only the batches)."""
    fraction = DEFAULT_HOLD_OUT if args.hold_out is None else args.hold_out
    if args.confirm:
        val = source_batches(processor, source(args.val), args.task, **kw)
        confirm = source_batches(processor, source(args.confirm), args.task, **kw)
        record: dict[str, Any] = {"confirm": args.confirm}
    elif fraction == 0:
        val, confirm = source_batches(processor, source(args.val), args.task, **kw), None
        record = {"confirm": None}
    else:
        val, confirm = held_out_batches(processor, source(args.val), args.task, fraction=fraction,
                                        seed=args.hold_out_seed, **kw)
        record = {"confirm": f"held out of {args.val}", "hold_out": fraction, "hold_out_seed": args.hold_out_seed}
    counts = [sum(len(next(iter(b.values()))) for b in part) for part in (val, confirm or [])]
    if "hold_out" in record:
        print(f"confirmation: {fraction:.0%} of --val held out (seed {args.hold_out_seed}): {counts[0]} examples "
              f"searched, {counts[1]} confirming (--hold-out 0 searches on all of them, unconfirmed)", file=sys.stderr)
    return val, confirm, {"search": args.val, **record, "search_examples": counts[0], "confirm_examples": counts[1]}


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # bad values fail before any model is loaded
    if args.confirm and args.hold_out:
        raise ConfigError("--hold-out cuts a confirmation set out of --val; --confirm gives one already: pass one "
                          "of them.")
    if args.hold_out is not None and not 0 <= args.hold_out < 1:
        raise ConfigError(f"--hold-out must be in [0, 1), got {args.hold_out:g}; e.g. 0.5 (0: no held-out part).")
    if config.agreement and args.task == "causal-lm":
        raise ConfigError("--agreement compares class predictions: use it with text- or image-classification, "
                          "or drop it for causal-lm.")
    if args.validation != "public" and not args.private_val:
        raise ConfigError(f"--validation {args.validation} validates on private data: pass --private-val (and "
                          "--private-size), or use --validation public.")
    members = []
    # One process: members are loaded when needed and let go once stored (at most the base and the
    # model under validation in memory). Distributed processes hold theirs (they are placed on devices).
    lazy = not distributed.launched_distributed()
    for folder in map(Path, args.models):
        if not (folder / "privacy.json").is_file():
            raise TrainingConfigError(
                f"{folder} has no privacy.json: every member needs its ε, δ and data set id "
                "(train-family writes it; see hf_dpdedup.privacy.PrivacyMetadata)."
            )
        load = functools.partial(distributed.load_member_model, folder, device_map=args.device_map)
        if lazy:
            members.append(Member.from_folder(folder, load_privacy(folder), load))
        else:
            members.append(Member(folder.name, load(), load_privacy(folder), files_from=folder))
    if args.task == "image-classification":
        processor = transformers.AutoImageProcessor.from_pretrained(args.models[0])
    else:
        processor = transformers.AutoTokenizer.from_pretrained(args.models[0])
    names = class_names(model_config(args.models[0]))

    def source(spec: str):
        return data_source(args, spec, label_names=names)

    kw = {"max_length": args.max_length}
    private = None
    if args.private_val:
        if args.private_size is None:
            raise PrivacyBudgetError("--private-val needs --private-size N: the public size every private "
                                     "mechanism normalises by, fixed in advance (the true row count is private).")
        dataset_id = args.private_id or members[0].privacy.datasets[0]
        private = private_source(processor, source(args.private_val), args.task, dataset_id=dataset_id,
                                 public_size=args.private_size, **kw)
    val, confirm, splits = public_splits(args, processor, source, **kw)
    data = DedupData(
        score_fn=SCORES[args.task],
        public_val=val,
        public_test=source_batches(processor, source(args.test), args.task, **kw) if args.test else None,
        public_confirm=confirm,
        private_val=private,
        public_test_dataset=args.test_dataset_id,
        predict_fn=classification_predict if config.agreement else None,
    )
    if distributed.launched_distributed():
        report = distributed.deduplicate_family_distributed(members, data, config, args.out, parallel=args.parallel,
                                                            cpu=args.cpu, timeout_s=args.timeout)
        if report is None:  # not the main process: the main one saves and prints
            return 0
    else:
        report = deduplicate_family(members, data, config, args.out)
    report.data["public_splits"] = splits  # what the search and the confirmation validated on
    report.save(args.report or Path(args.out) / "report")
    print(report.table())
    return 0
