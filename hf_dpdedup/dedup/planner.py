"""Family planner: group, pre-filter, pick a base, deduplicate targets in order, account, store.

Semantics (DESIGN "The deduplication algorithm"):

1. members are grouped by architecture signature (tensor names, shapes, dtypes) and training data;
2. fairness pre-filter: a member with a higher ε but a lower public utility than another is dropped
   (utility on the public test set when given — the figure buyers see —, else on public validation);
3. the base is the smallest-ε member unless named; it is stored as is;
4. targets go in ascending ε order; with ``interactive`` the floor of model i is
   ``max(U'_{i-1}, U_i − t)`` so a higher-ε model never ends below a lower-ε one;
5. every target's replacements are searched against a validator (public, SVT or naive);
6. the ledger composes each target's (ε, δ): its own training, the base's training (charged
   whenever the base's blocks were candidates: the search's choices depend on them), the
   validation mechanisms, and — for the interactive floor — everything the previous model's
   result depended on (the floor is a function of that model).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS

from ..errors import DivergedProcessesError
from ..privacy import (
    Charge,
    LaplaceSampler,
    NaiveLaplaceValidator,
    PrivacyMetadata,
    PrivateDataset,
    SVTSession,
    account,
    release_utility,
)
from ..privacy.private_data import current_collective
from ..store.family import FamilyStore
from ..store.member import update_dedup_record
from .live import LiveBlocks, Replacement
from .plan import PlanConfig, plan_replacements
from .report import FamilyReport, ModelReport, stored_bytes_of
from .search import confirm, run_search
from .validate import (
    MechanismValidator,
    PublicValidator,
    agreement_batches,
    agreement_score,
    public_utility,
    public_utility_stats,
)


@dataclass
class Member:
    """One model of a family, with what it cost."""

    name: str
    model: torch.nn.Module
    privacy: PrivacyMetadata
    tokenizer: Any = None
    files_from: str | Path | None = None


@dataclass
class DedupData:
    """Evaluation data: ``score_fn(model, batch)`` gives per-example scores in [0, 1]."""

    score_fn: Callable[[Any, Any], Any]
    public_val: list[Any]
    public_test: list[Any] | None = None
    private_val: PrivateDataset | None = None
    # public batches with labels for the cost order's gradients/Fisher (default: public_val)
    calibration: list[Any] | None = None
    calibration_loss: Callable[[Any, Any], Any] | None = None  # default: model(**batch).loss
    # a second public split the search never sees: the accepted replacements are confirmed on it
    # (the longest cheapest-first prefix that passes is kept), so the search cannot overfit public_val
    public_confirm: list[Any] | None = None
    public_test_dataset: str | None = None  # Hub id of the public test set (e.g. "stanfordnlp/sst2")
    predict_fn: Callable[[Any, Any], Any] | None = None  # per-example predictions, for agreement validation
    public_test_split: str = "test"


@dataclass
class DedupConfig:
    block_size: int = 65536
    threshold: float = 0.015
    strategy: str = "binary"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    plan: PlanConfig = field(default_factory=PlanConfig)
    validation: str = "public"  # "public" | "svt" | "naive"
    svt_epsilon: float = 1.0
    svt_cutoff: int = 3
    naive_epsilon: float = 0.1
    floor_epsilon: float = 0.1  # charged release of U'_{i-1} when validation is private
    interactive: bool = True
    # Validate on agreement with the target's own predictions instead of on labels: the "drop" is the
    # share of public validation examples whose prediction changed, which bounds the accuracy change
    # on any data set and is a far less noisy signal than the accuracy on a small validation set.
    agreement: bool = False

    def __post_init__(self) -> None:
        if self.agreement and self.interactive:
            raise ValueError("agreement validation compares each model with itself: use interactive=False.")
    base: str | None = None
    noise_seed: int | None = None  # seeded noise: tests only, marked in every report

    def sampler(self) -> LaplaceSampler:
        if self.noise_seed is None:
            return LaplaceSampler.secure()
        return LaplaceSampler.seeded_for_tests(self.noise_seed)


def signature(model: torch.nn.Module) -> tuple:
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())


def fairness_filter(members: list[Member], utility: dict[str, float]) -> tuple[list[Member], list[Member]]:
    """Drop every member that has a higher ε but a lower utility than some other member."""
    kept, dropped = [], []
    for m in members:
        dominated = any(
            o.privacy.epsilon < m.privacy.epsilon and utility[o.name] > utility[m.name] for o in members
        )
        (dropped if dominated else kept).append(m)
    return kept, dropped


def group_members(members: list[Member]) -> list[list[Member]]:
    groups: dict[tuple, list[Member]] = {}
    for m in members:
        groups.setdefault((signature(m.model), frozenset(m.privacy.datasets)), []).append(m)
    return list(groups.values())


@dataclass
class Outcome:
    """One member's result before storing: its report and the replacements applied to its model."""

    member: Member
    report: ModelReport
    accepted: list[Replacement] = field(default_factory=list)

    @property
    def stored(self) -> bool:
        return self.report.role != "dropped"


def deduplicate_family(
    members: list[Member], data: DedupData, config: DedupConfig, out: str | Path
) -> FamilyReport:
    """Deduplicate ``members`` into a new family store at ``out``; return the report."""
    check_unique_names(members)
    family = new_family_store(out, members, config)
    report = FamilyReport(config=_config_dict(config))
    for group in group_members(members):
        for outcome in dedup_group(group, data, config):
            report.models.append(store_outcome(family, outcome))
    report.family_stored_bytes = family.stored_bytes()
    return report


def check_unique_names(members: list[Member]) -> None:
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"Member names must be unique, got {names}.")


def new_family_store(out: str | Path, members: list[Member], config: DedupConfig) -> FamilyStore:
    return FamilyStore.create(out, block_size=config.block_size, dtype=next(members[0].model.parameters()).dtype)


def dedup_group(group: list[Member], data: DedupData, config: DedupConfig) -> list[Outcome]:
    """Search one group (same architecture and data): models are edited in place, nothing is stored.

    Outcomes come in storing order: dropped members, the base, then the targets by ascending ε.
    """
    # Fairness is about the utilities buyers are shown: the public test set's when there is one.
    on_test = data.public_test is not None
    fair_data = data.public_test if on_test else data.public_val
    utility = {m.name: public_utility(m.model, fair_data, data.score_fn) for m in group}
    kept, dropped = fairness_filter(group, utility)
    outcomes = [Outcome(m, ModelReport.dropped(m.name, m.privacy.epsilon, utility[m.name], on_test=on_test))
                for m in dropped]
    kept.sort(key=lambda m: (m.privacy.epsilon, m.name))
    base = next((m for m in kept if m.name == config.base), None) if config.base else kept[0]
    if base is None:
        raise ValueError(f"Base {config.base!r} is not among the kept members {[m.name for m in kept]}.")
    base_live = LiveBlocks(base.model, config.block_size)
    base_matrix = base_live.matrix()
    base_report = _start(base, "base", base_live.n_blocks, data)
    base_report.charges = [Charge.from_metadata(base.name, base.privacy)]
    outcomes.append(Outcome(base, _finish(base, base_report, data)))
    floor_source: ModelReport | None = base_report if config.interactive else None
    targets = [m for m in kept if m is not base]
    # one bar for the group, advancing per validation (the expensive step), the member in its postfix
    with tqdm(desc=f"dedup against {base.name}", unit="validation", disable=None) as bar:
        for target in targets:
            bar.set_postfix_str(target.name, refresh=False)
            outcome = _dedup_target(target, base, base_matrix, floor_source, data, config, progress=bar.update)
            outcomes.append(outcome)
            if config.interactive:
                floor_source = outcome.report
    return outcomes


def _dedup_target(target: Member, base: Member, base_matrix: torch.Tensor, previous: ModelReport | None,
                  data: DedupData, config: DedupConfig,
                  progress: Callable[[int], object] | None = None) -> Outcome:
    start = time.perf_counter()
    live = LiveBlocks(target.model, config.block_size)
    model_report = _start(target, "target", live.n_blocks, data)
    model_report.base = base.name
    charges = [Charge.from_metadata(target.name, target.privacy), Charge.from_metadata(base.name, base.privacy)]
    floor = None
    if previous is not None:
        floor, floor_charges = _previous_floor(previous, data, config)
        charges += floor_charges + previous.charges
    validator = _validator(target, data, config, floor)
    confirmation = _confirmation_validator(target, data, config)  # built on the unedited target
    calibration = _calibration(target, data, config)
    sequence = plan_replacements(target.model, live, base_matrix, config.plan, calibration=calibration,
                                 loss_fn=data.calibration_loss)
    _check_same_plan(target.name, sequence)
    result = run_search(config.strategy, target.model, live, sequence, validator, progress=progress,
                        **config.strategy_options)
    if confirmation is not None:
        confirm(target.model, live, result, confirmation)
    charges += getattr(validator, "charges", [])
    model_report.record_search(result, len(sequence), floor)
    model_report.charges = charges
    # Convert the tight (RDP) figure at the target's own δ, so ε before and after are comparable:
    # composition can then only raise ε (the loose sum, at the summed δ, is reported beside it).
    model_report.ledger = account(charges, target_delta=target.privacy.delta or None)
    model_report.seconds = time.perf_counter() - start
    return Outcome(target, _finish(target, model_report, data), list(result.accepted))


def _check_same_plan(name: str, sequence: list[Replacement]) -> None:
    """Across processes, every process must search the same plan (saliency and matching are
    deterministic; this catches a nondeterministic kernel before it silently desynchronises them)."""
    collective = current_collective()
    if collective.size == 1:
        return
    mine = [(r.block, r.source, r.source_block) for r in sequence]
    if collective.from_main(lambda: mine) != mine:
        raise DivergedProcessesError(
            f"Process {collective.rank} planned other replacements for {name!r} than the main process "
            "(nondeterministic saliency or similarity kernels?). Use deterministic kernels "
            "(torch.use_deterministic_algorithms(True)) or run with one process."
        )


def _start(member: Member, role: str, n_blocks: int, data: DedupData) -> ModelReport:
    """A report with the member's public utilities before any change."""
    model_report = ModelReport.start(member, role, n_blocks)
    val = public_utility_stats(member.model, data.public_val, data.score_fn)
    model_report.val_utility_before, model_report.val_utility_se = val.mean, val.se
    if data.public_test is not None:
        test = public_utility_stats(member.model, data.public_test, data.score_fn)
        model_report.test_utility_before, model_report.test_utility_se = test.mean, test.se
    return model_report


def _previous_floor(previous: ModelReport, data: DedupData, config: DedupConfig) -> tuple[float, list[Charge]]:
    """U'_{i-1}: on public data it is free; on private data it is released with Laplace noise."""
    if config.validation == "public":
        return previous.val_utility_after, []
    release = release_utility(data.private_val, previous.model, score_fn=data.score_fn,
                              epsilon=config.floor_epsilon, sampler=config.sampler(),
                              label=f"floor-after-{previous.name}")
    return min(1.0, max(0.0, release.value)), [release.charge]


def _calibration(target: Member, data: DedupData, config: DedupConfig) -> list[Any]:
    """Public batches for the cost order: the given calibration set, else the public validation set
    — relabelled with the target's own predictions under agreement validation, so that the Fisher
    measures how far a replacement moves the target's own predictions (the KL's second-order term)."""
    if data.calibration is not None:
        return data.calibration
    if config.agreement:
        return agreement_batches(data.public_val, target.model, data.predict_fn)
    return data.public_val


def _confirmation_validator(target: Member, data: DedupData, config: DedupConfig) -> PublicValidator | None:
    """The same acceptance rule on the public confirmation split (free: public data)."""
    if data.public_confirm is None:
        return None
    batches = (agreement_batches(data.public_confirm, target.model, data.predict_fn) if config.agreement
               else data.public_confirm)
    # The interactive floor is a utility on the validation data and does not transfer to another
    # split; the confirmation checks the threshold against the target's own utility on it.
    return PublicValidator(batches, data.score_fn, reference=target.model, allowed_drop=config.threshold)


def _validator(target: Member, data: DedupData, config: DedupConfig, floor: float | None):
    t = config.threshold
    if config.validation == "public" and config.agreement:
        batches = agreement_batches(data.public_val, target.model, data.predict_fn)
        return PublicValidator(batches, data.score_fn, reference=target.model, allowed_drop=t)
    if config.validation == "public":
        return PublicValidator(data.public_val, data.score_fn, reference=target.model, allowed_drop=t, floor=floor)
    if data.private_val is None:
        raise ValueError(f"validation={config.validation!r} needs private validation data (DedupData.private_val).")
    # On private data, agreement is scored inside the mechanism against a frozen copy of the target
    # (the live target is edited in place); no prediction on private data ever leaves it.
    score_fn = (agreement_score(copy.deepcopy(target.model).eval(), data.predict_fn) if config.agreement
                else data.score_fn)
    common = dict(reference=target.model, score_fn=score_fn, allowed_drop=t, floor=floor,
                  sampler=config.sampler(), label=f"{config.validation}-{target.name}")
    if config.validation == "svt":
        return MechanismValidator(SVTSession(data.private_val, epsilon=config.svt_epsilon,
                                             cutoff=config.svt_cutoff, **common))
    if config.validation == "naive":
        return MechanismValidator(NaiveLaplaceValidator(data.private_val, epsilon_per_query=config.naive_epsilon,
                                                        **common))
    raise ValueError(f"Unknown validation {config.validation!r}; use 'public', 'svt' or 'naive'.")


def _finish(member: Member, model_report: ModelReport, data: DedupData) -> ModelReport:
    """Public utilities after the search (the next model's floor may need them)."""
    model_report.model = member.model
    model_report.val_utility_after = public_utility(member.model, data.public_val, data.score_fn)
    if data.public_test is not None:
        model_report.test_utility_after = public_utility(member.model, data.public_test, data.score_fn)
        model_report.public_test_name = data.public_test_dataset
        model_report.public_test_split = data.public_test_split
    return model_report


def store_outcome(family: FamilyStore, outcome: Outcome) -> ModelReport:
    """Write a searched member into the store (a dropped one only gets its report back)."""
    member, model_report = outcome.member, outcome.report
    if not outcome.stored:
        return model_report
    model = member.model
    model_report.model = model
    rows_before = family.blocks.index.total_rows
    ledger = model_report.ledger
    privacy = ledger.to_metadata() if ledger is not None else member.privacy
    constitution = family.add_model(member.name, model, tokenizer=member.tokenizer,
                                    files_from=member.files_from, privacy=privacy,
                                    dedup=model_report.card_fields(member.privacy))
    model_report.own_bytes = stored_bytes_of(family, constitution, rows_before)
    model_report.original_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # Figures known only once the rows are stored go into the member's record afterwards.
    update_dedup_record(family.member_path(member.name),
                        {"compression": model_report.compression, "public_test": model_report.public_test()})
    return model_report


def _config_dict(config: DedupConfig) -> dict[str, Any]:
    return {
        "block_size": config.block_size, "threshold": config.threshold, "strategy": config.strategy,
        "strategy_options": config.strategy_options, "candidates": config.plan.candidates,
        "order": config.plan.order, "cost": config.plan.cost, "close_ratio": config.plan.close_ratio,
        "saliency": config.plan.saliency,
        "aggregate": config.plan.aggregate, "metric": config.plan.metric, "validation": config.validation,
        "svt_epsilon": config.svt_epsilon, "svt_cutoff": config.svt_cutoff, "interactive": config.interactive,
        "noise": "TEST ONLY: seeded noise" if config.noise_seed is not None else "secure",
    }
