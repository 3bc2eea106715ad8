"""``hf-dpdedup dedup MODEL... --out STORE``: deduplicate a family of DP fine-tuned models.

Each MODEL is a transformers folder with a ``privacy.json`` (written by ``train-family``: ε, δ,
data set ids, accountant history), or a peft adapter folder (``adapter_config.json`` naming its base
by folder or Hub id) with a ``privacy.json``: adapters are stored on one shared copy of the base and
deduplicated against each other (use a ``--block-size`` no larger than the adapter matrices). Utility
data are any data source, ``PATH_OR_ID[:SPLIT]``: a Hub data set id, a ``save_to_disk`` folder, a
csv/tsv/json/jsonl/parquet file or a GLUE folder split (:mod:`hf_dpdedup.cli.data_flags`).
``--task image-classification`` reads an image column through the first member's image processor.

Under ``torchrun`` / ``accelerate launch`` (more than one process) the run is distributed with
:mod:`hf_dpdedup.distributed`: ``torchrun --nproc_per_node 4 -m hf_dpdedup.cli dedup ...``.
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

from ..errors import PrivacyBudgetError, TrainingConfigError
from .data_flags import add_data_flags, data_source


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help="deduplicate a family of DP fine-tuned models into a store")
    p.add_argument("models", nargs="+", help="member folders (transformers or peft adapter folders, each with privacy.json)")
    p.add_argument("--out", required=True, help="new family store folder")
    p.add_argument("--base", help="member folder name to use as base (default: smallest ε)")
    p.add_argument("--task", default="text-classification",
                   choices=["text-classification", "image-classification", "causal-lm"],
                   help="text tasks use the first member's tokenizer, image-classification its image processor")
    p.add_argument("--val", required=True, help="public validation data, PATH_OR_ID[:SPLIT] (see 'data sources')")
    p.add_argument("--confirm", help="second public data set: accepted replacements are confirmed on it and the "
                   "longest cheapest-first prefix that passes is kept (guards against overfitting --val)")
    p.add_argument("--test", help="public test data for reported accuracies")
    p.add_argument("--test-dataset-id", help="Hub id of the public test set, for model-card results (e.g. stanfordnlp/sst2)")
    p.add_argument("--private-val", help="private validation data (read only into the private-data firewall; "
                                         "used only through SVT / naive Laplace)")
    p.add_argument("--private-id", help="data set id of the private validation set (default: the members' training id)")
    p.add_argument("--private-size", type=int,
                   help="public normaliser n of the private validation set, fixed before looking at it (e.g. the "
                        "planned split size); its true row count is private. Required with --private-val")
    p.add_argument("--validation", default="public", choices=["public", "svt", "naive"])
    p.add_argument("--threshold", type=float, default=0.015, help="allowed utility drop (0.015 = 1.5 points)")
    p.add_argument("--strategy", default="gallop", choices=["gallop", "greedy", "binary", "halving", "mcts"])
    p.add_argument("--greedy-n", type=int, default=10)
    p.add_argument("--min-group", type=int, default=4)
    p.add_argument("--max-validations", type=int, default=25, help="gallop: validations per target at most")
    p.add_argument("--mcts-group", type=int, default=20)
    p.add_argument("--mcts-episodes", type=int, default=20)
    p.add_argument("--block-size", type=int, default=65536)
    p.add_argument("--candidates", default="aligned", choices=["aligned", "nearest"],
                   help="aligned: the base's block at the same position (default); nearest: the paper's rule")
    p.add_argument("--aligned-only", action="store_true",
                   help="candidates are only the base's blocks at the same position: no search for close blocks "
                        "elsewhere (it compares every block with every other and holds two block matrices in memory; "
                        "use this for LLM-sized members)")
    p.add_argument("--close-ratio", type=float, default=0.5,
                   help="offer another block only if nearer than this × the aligned distance")
    p.add_argument("--order", default="cost", choices=["cost", "saliency"],
                   help="cost: estimated loss increase of each replacement (default); saliency: the paper's")
    p.add_argument("--cost", default="fisher", choices=["fisher", "taylor", "wanda", "delta"])
    p.add_argument("--saliency", default="magnitude", choices=["magnitude", "gradient", "fisher", "wanda"])
    p.add_argument("--aggregate", default="mean", choices=["mean", "l1", "l2", "linf", "q3"])
    p.add_argument("--metric", default="l2", choices=["l2", "l1", "cosine"])
    p.add_argument("--svt-epsilon", type=float, default=1.0)
    p.add_argument("--svt-cutoff", type=int, default=3)
    p.add_argument("--naive-epsilon", type=float, default=0.1)
    p.add_argument("--no-interactive", action="store_true", help="no floor from the previous model")
    p.add_argument("--fairness", choices=["flag", "drop", "off"], default="flag",
                   help="flag (default): members with a higher ε but a lower public utility than a lower-ε member are "
                        "stored and flagged; drop: leave them out of the store; off: no verdict. Any verdict charges "
                        "each member the training of every lower-ε member it compared with")
    p.add_argument("--overlap", nargs=2, action="append", default=[], metavar=("ID_A", "ID_B"),
                   help="two data set ids that share individuals (composed sequentially); repeatable")
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


def strategy_options(args: argparse.Namespace) -> dict:
    return {
        "gallop": {"min_group": args.min_group, "max_validations": args.max_validations},
        "greedy": {"n": args.greedy_n},
        "binary": {"min_group": args.min_group},
        "halving": {"min_group": args.min_group},
        "mcts": {"group": args.mcts_group, "episodes": args.mcts_episodes},
    }[args.strategy]


def run(args: argparse.Namespace) -> int:
    import transformers

    from .. import distributed
    from ..adapters import model_config
    from ..dedup.plan import PlanConfig
    from ..dedup.planner import DedupConfig, DedupData, Member, deduplicate_family
    from ..dedup.tasks import SCORES, private_source, source_batches
    from ..training.members import load_privacy

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
    data = DedupData(
        score_fn=SCORES[args.task],
        public_val=source_batches(processor, source(args.val), args.task, **kw),
        public_test=source_batches(processor, source(args.test), args.task, **kw) if args.test else None,
        public_confirm=source_batches(processor, source(args.confirm), args.task, **kw) if args.confirm else None,
        private_val=private,
        public_test_dataset=args.test_dataset_id,
    )
    config = DedupConfig(
        block_size=args.block_size, threshold=args.threshold, strategy=args.strategy,
        strategy_options=strategy_options(args),
        plan=PlanConfig(candidates=args.candidates, close_ratio=args.close_ratio, order=args.order, cost=args.cost,
                        saliency=args.saliency, aggregate=args.aggregate, metric=args.metric,
                        use_self=not args.aligned_only),
        validation=args.validation, svt_epsilon=args.svt_epsilon, svt_cutoff=args.svt_cutoff,
        naive_epsilon=args.naive_epsilon, interactive=not args.no_interactive, base=args.base,
        fairness=args.fairness, overlaps=tuple(tuple(pair) for pair in args.overlap),
    )
    if distributed.launched_distributed():
        report = distributed.deduplicate_family_distributed(members, data, config, args.out, parallel=args.parallel,
                                                            cpu=args.cpu, timeout_s=args.timeout)
        if report is None:  # not the main process: the main one saves and prints
            return 0
    else:
        report = deduplicate_family(members, data, config, args.out)
    report.save(args.report or Path(args.out) / "report")
    print(report.table())
    return 0
