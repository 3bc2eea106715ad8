"""Family planner: group, pre-filter, pick a base, deduplicate targets in order, account.

The outcomes go to :mod:`.storing`, which writes them into a family folder.

Semantics (DESIGN "The deduplication algorithm"):

1. members are grouped by architecture signature (tensor names, shapes, dtypes) and training data;
2. fairness verdict (``fairness="flag"``, the default): a member with a higher ε but a lower public
   utility than a lower-ε member is *flagged* in the report and its card, and stored like any other
   (utility on the public test set when given — the figure buyers see —, else on public validation).
   The verdict reads every lower-ε member of the group, so each member is charged their training,
   whatever the verdict says (a charge that depended on the verdict would itself leak it).
   ``fairness="drop"`` also leaves flagged members out of the store (an explicit choice); the search
   still runs on them so that no other member's decisions depend on who was dropped.
   ``fairness="off"``: no verdict, nothing read, nothing charged;
3. the base is the smallest-ε member unless named; it is stored as is;
4. targets go in ascending ε order; with ``interactive`` the floor of model i is
   ``max(U'_{i-1}, U_i − threshold)`` so a higher-ε model never ends below a lower-ε one; on public
   validation "below" means by more than ``floor_margin_se`` paired standard errors of the two
   models' per-example difference (0: the paper's exact comparison; see ``DedupConfig``);
5. every target's replacements are searched against a validator (public, SVT or naive);
6. the ledger composes each target's (ε, δ): its own training, the base's training (charged
   whenever the base's blocks were candidates: the search's choices depend on them), the
   validation mechanisms, and — for the interactive floor — everything the previous model's
   result depended on (the floor is a function of that model).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS

from ..blocks import BlockRows
from ..errors import DivergedProcessesError, UnderpoweredValidationWarning
from ..privacy import (
    SEEDED_LABEL,
    Charge,
    LaplaceSampler,
    NaiveLaplaceValidator,
    PrivacyMetadata,
    PrivateDataset,
    SVTSession,
    account,
    release_utility,
)
from ..collective import current_collective
from .config import (  # re-exported: ``from hf_dpdedup.dedup.planner import DedupConfig`` keeps working
    MCTS,
    SVT,
    Binary,
    DedupConfig,
    Gallop,
    Greedy,
    Halving,
    NaiveLaplace,
    PlanConfig,
    Public,
)
from .live import Decision, LiveBlocks, Replacement, apply_decisions
from .plan import plan_replacements
from .report import ModelReport
from .search import confirm, run_search
from .typed import literal_choices
from .validate import (
    MechanismValidator,
    PublicValidator,
    agreement_batches,
    public_utility,
    paired_difference,
    public_utility_and_scores,
)


@dataclass
class Member:
    """One model of a family, with what it cost.

    A member given a ``load`` function (and ``model=None``) is *lazy*: the planner loads it when it
    needs it and lets it go once it is stored, so a family is deduplicated with at most the base and
    the model under validation in memory (:meth:`from_folder`). A member given a model keeps it.
    """

    name: str
    model: torch.nn.Module | None
    privacy: PrivacyMetadata
    tokenizer: Any = None
    files_from: str | Path | None = None
    load: Callable[[], torch.nn.Module] | None = field(default=None, repr=False)

    @classmethod
    def from_folder(cls, folder: str | Path, privacy: PrivacyMetadata, load: Callable[[], torch.nn.Module], *,
                    name: str | None = None, tokenizer: Any = None) -> "Member":
        """A lazy member: ``load()`` builds its model from ``folder`` (memory-mapped safetensors)."""
        folder = Path(folder)
        return cls(name or folder.name, None, privacy, tokenizer=tokenizer, files_from=folder, load=load)

    def loaded(self) -> torch.nn.Module:
        """The model, loaded now if the member is lazy and not in memory."""
        if self.model is None and self.load is not None:
            self.model = self.load()
        if self.model is None:
            raise ValueError(f"Member {self.name!r} has neither a model nor a load function.")
        return self.model

    def release(self) -> None:
        """Let a lazy member's model go (it is loaded again when needed); a given model is kept."""
        if self.load is not None:
            self.model = None


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


def signature(model: torch.nn.Module) -> tuple:
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())


FAIRNESS_MODES = literal_choices(DedupConfig, "fairness")


def fairness_verdicts(members: list[Member], utility: dict[str, float], *, on: str) -> dict[str, dict[str, Any]]:
    """Per member: the lower-ε members its verdict read, and those of them with a higher utility.

    A member is flagged when some member with a smaller ε has a higher utility. ``compared_with``
    (every lower-ε member) depends on the budgets only, never on the data: it is what gets charged.
    """
    verdicts = {}
    for m in members:
        lower = sorted((o for o in members if o.privacy.epsilon < m.privacy.epsilon), key=lambda o: o.name)
        dominated_by = [o.name for o in lower if utility[o.name] > utility[m.name]]
        verdicts[m.name] = {"flagged": bool(dominated_by), "dominated_by": dominated_by,
                            "compared_with": [o.name for o in lower], "on": on}
    return verdicts


def verdict_charges(members: list[Member], verdict: dict[str, Any] | None) -> list[Charge]:
    """The training of every member a fairness verdict read (whatever the verdict said)."""
    if verdict is None:
        return []
    by_name = {m.name: m for m in members}
    return [Charge.from_metadata(name, by_name[name].privacy) for name in verdict["compared_with"]]


def group_members(members: list[Member]) -> list[list[Member]]:
    """Members with one architecture signature and one training data set, in input order (a lazy
    member is loaded for its signature and let go again)."""
    groups: dict[tuple, list[Member]] = {}
    for m in members:
        key = (signature(m.loaded()), frozenset(m.privacy.datasets))
        m.release()
        groups.setdefault(key, []).append(m)
    return list(groups.values())


@dataclass
class Outcome:
    """One member's result: its report and the replacements kept. ``applied``: the member's model in
    memory carries them (a lazy member's model is let go once searched; its ``decisions`` are
    re-applied to a fresh load when it is stored)."""

    member: Member
    report: ModelReport
    accepted: list[Replacement] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    applied: bool = True

    def __post_init__(self) -> None:
        if self.accepted and not self.decisions:
            self.decisions = [(r.block, r.source, r.source_block) for r in self.accepted]

    @property
    def stored(self) -> bool:
        return self.report.role != "dropped"

    def release(self) -> None:
        """Let a lazy member's model go; what was decided stays (``decisions``)."""
        if self.member.load is None:
            return
        self.member.release()
        self.report.model = None
        self.accepted = []  # their rows are views of the base's blocks
        self.applied = not self.decisions

    def materialise(self, base: torch.nn.Module | None, block_size: int) -> torch.nn.Module:
        """The member's model with its decisions applied (loading a lazy member again if needed)."""
        model = self.member.loaded()
        if not self.applied:
            if base is None:
                raise ValueError(f"{self.member.name!r} needs its base {self.report.base!r} to be rebuilt.")
            apply_decisions(model, base, self.decisions, block_size)
            self.applied = True
        self.report.model = model
        return model


def search_family(members: list[Member], data: DedupData, config: DedupConfig, *,
                  executor: "GroupExecutor | None" = None) -> Iterator[Outcome]:
    """The family loop: group the members, search every group, yield the outcomes in storing order
    (group by group: the base, then the targets by ascending ε). Nothing is stored.

    Each outcome is yielded as soon as it is final (a caller may store it and let a lazy member go
    before the next one is loaded). ``executor`` runs the groups elsewhere (several processes:
    :mod:`hf_dpdedup.distributed`); it yields the outcomes in the same order, on the main process
    only.
    """
    check_unique_names(members)
    groups = group_members(members)
    sampler = config.sampler()  # one noise source for the whole run

    def search(group: list[Member]) -> Iterator[Outcome]:
        return iter_group(group, data, config, sampler=sampler)

    if executor is None:
        for group in groups:
            yield from search(group)
    else:
        yield from executor(groups, search)


GroupExecutor = Callable[[list[list[Member]], Callable[[list[Member]], Iterator[Outcome]]], Iterable[Outcome]]


def check_unique_names(members: list[Member]) -> None:
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"Member names must be unique, got {names}.")


def dedup_group(group: list[Member], data: DedupData, config: DedupConfig, *,
                sampler: LaplaceSampler | None = None) -> list[Outcome]:
    """Search one group (same architecture and data): models are edited in place, nothing is stored.

    Outcomes come in order: the base, then the targets by ascending ε (with ``fairness="drop"`` the
    flagged ones have role "dropped" and are not stored). Every member ends up in memory: to
    store as you go, consume :func:`iter_group` instead.
    """
    return list(iter_group(group, data, config, sampler=sampler))


def iter_group(group: list[Member], data: DedupData, config: DedupConfig, *,
               sampler: LaplaceSampler | None = None) -> Iterator[Outcome]:
    """:func:`dedup_group` one outcome at a time, each yielded as soon as it is final: the caller
    stores it and may release a lazy member before the next target is loaded. The base stays in
    memory until the group is done (its blocks are every target's candidates)."""
    sampler = sampler if sampler is not None else config.sampler()
    verdicts = _fairness(group, data, config)
    ordered = sorted(group, key=lambda m: (m.privacy.epsilon, m.name))
    base = next((m for m in ordered if m.name == config.base), None) if config.base else ordered[0]
    if base is None:
        raise ValueError(f"Base {config.base!r} is not a member of this group: {[m.name for m in ordered]}.")
    base_state = base.loaded().state_dict()  # held until the group is done, even once the base is stored
    base_rows = LiveBlocks(base.model, config.block_size).rows  # views: the base is never edited
    base_report = _start(base, "base", len(base_rows), data, config)
    base_report.fairness = verdicts.get(base.name)
    base_report.charges = [Charge.from_metadata(base.name, base.privacy),
                           *verdict_charges(group, base_report.fairness)]
    if len(base_report.charges) > 1:  # a named base above the smallest ε: its verdict read others
        base_report.ledger = _account(base_report.charges, config)
        base_report.ledger_at_own_delta = _account_at_own_delta(base_report.charges, base, config)
    targets = [m for m in ordered if m is not base]
    base_outcome = Outcome(base, _finish(base, base_report, data))
    # The next target's floor is a function of the model just finished: taken now, while that
    # model is still in memory (the caller may let it go once it is stored).
    floor = _next_floor(base_report, bool(targets), data, config, sampler)
    yield _dropped_if_flagged(base_outcome, config)
    # one bar for the group, advancing per validation (the expensive step), the member in its postfix
    with tqdm(desc=f"dedup against {base.name}", unit="validation", disable=None) as bar:
        for i, target in enumerate(targets):
            bar.set_postfix_str(target.name, refresh=False)
            outcome = _dedup_target(target, base, base_state, base_rows, floor, data, config,
                                    verdict=verdicts.get(target.name), group=group, sampler=sampler,
                                    progress=bar.update)
            floor = _next_floor(outcome.report, i + 1 < len(targets), data, config, sampler)
            yield _dropped_if_flagged(outcome, config)


@dataclass(frozen=True)
class _Floor:
    """The interactive floor a target inherits: U'_{i-1} and everything it depended on (and, for the
    paired comparison on public validation, the previous model's per-example scores)."""

    value: float
    charges: list[Charge]
    scores: list[torch.Tensor | None] | None = None


def _next_floor(previous: ModelReport, needed: bool, data: DedupData, config: DedupConfig,
                sampler: LaplaceSampler) -> _Floor | None:
    if not (config.interactive and needed):
        return None
    value, release = _previous_floor(previous, data, config, sampler)
    paired = isinstance(config.validation, Public) and config.floor_margin_se > 0
    return _Floor(value, release + previous.charges, previous.val_scores if paired else None)


def _dropped_if_flagged(outcome: Outcome, config: DedupConfig) -> Outcome:
    """``fairness="drop"``: a flagged member keeps its report but is left out of the store (the
    verdict is known before any search, so this changes nothing else)."""
    if config.fairness == "drop" and outcome.report.fairness and outcome.report.fairness["flagged"]:
        outcome.report.role = "dropped"
    return outcome


def _fairness(group: list[Member], data: DedupData, config: DedupConfig) -> dict[str, dict[str, Any]]:
    """Verdicts on the public utilities buyers are shown: the public test set's when there is one."""
    if config.fairness == "off":
        return {}
    on_test = data.public_test is not None
    fair_data = data.public_test if on_test else data.public_val
    utility = {}
    for m in group:  # one member in memory at a time
        utility[m.name] = public_utility(m.loaded(), fair_data, data.score_fn)
        m.release()
    return fairness_verdicts(group, utility, on="public test" if on_test else "public validation")


def _dedup_target(target: Member, base: Member, base_state: Mapping[str, torch.Tensor], base_rows: BlockRows,
                  previous: _Floor | None,
                  data: DedupData, config: DedupConfig, *, verdict: dict[str, Any] | None = None,
                  group: list[Member] | None = None, sampler: LaplaceSampler | None = None,
                  progress: Callable[[int], object] | None = None) -> Outcome:
    sampler = sampler if sampler is not None else config.sampler()
    live = LiveBlocks(target.loaded(), config.block_size)
    model_report = _start(target, "target", live.n_blocks, data, config)
    model_report.base = base.name
    model_report.differing_tensors = differing_tensors(target.model, base_state)
    model_report.fairness = verdict
    charges = [Charge.from_metadata(target.name, target.privacy), Charge.from_metadata(base.name, base.privacy),
               *verdict_charges(group or [], verdict)]
    floor = None
    if previous is not None:
        floor, charges = previous.value, charges + previous.charges
    validator = _validator(target, data, config, previous, sampler)
    confirmation = _confirmation_validator(target, data, config)  # built on the unedited target
    calibration = _calibration(target, data, config)
    sequence = plan_replacements(target.model, live, base_rows, config.plan, calibration=calibration,
                                 loss_fn=data.calibration_loss)
    _check_same_plan(target.name, sequence)
    try:
        result = run_search(config.strategy.kind, target.model, live, sequence, validator, progress=progress,
                            keep_undo=confirmation is not None, **config.strategy.options())
    finally:
        validator.close()  # a private mechanism's reference sum is wiped as soon as the search ends
    if confirmation is not None:  # public data: no private mechanism involved
        confirm(target.model, live, result, confirmation, mode=config.confirmation)
    charges += getattr(validator, "charges", [])
    model_report.record_search(result, len(sequence), floor)
    model_report.charges = charges
    model_report.ledger = _account(charges, config)
    model_report.ledger_at_own_delta = _account_at_own_delta(charges, target, config)
    _finish(target, model_report, data)
    _warn_if_underpowered(model_report, config)
    return Outcome(target, model_report, list(result.accepted))


def differing_tensors(model: torch.nn.Module, base: torch.nn.Module | Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """Names of the tensors whose values differ from the base's (before any replacement)."""
    theirs = base if isinstance(base, Mapping) else base.state_dict()
    return tuple(n for n, t in model.state_dict().items() if n not in theirs or not torch.equal(t, theirs[n]))


def _account(charges: list[Charge], config: DedupConfig):
    """The ledger: loose and tight both at each component's summed δ, so the min of the two is valid."""
    return account(charges, overlaps=config.overlaps)


def _account_at_own_delta(charges: list[Charge], member: Member, config: DedupConfig):
    """The RDP figure at the δ the member was trained with (None when that is the ledger's δ anyway)."""
    own = member.privacy.delta
    ledger = account(charges, overlaps=config.overlaps)
    if own == 0 or own == ledger.delta or ledger.epsilon_tight is None:
        return None
    return account(charges, target_delta=own, overlaps=config.overlaps)


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


def _start(member: Member, role: str, n_blocks: int, data: DedupData, config: DedupConfig) -> ModelReport:
    """A report with the member's public utilities before any change."""
    model_report = ModelReport.start(member, role, n_blocks)
    model_report.noise = SEEDED_LABEL if config.noise_seed is not None else "secure"
    val, model_report.val_scores_before = public_utility_and_scores(member.model, data.public_val, data.score_fn)
    model_report.val_utility_before, model_report.val_utility_se = val.mean, val.se
    if data.public_test is not None:
        test, model_report.test_scores_before = public_utility_and_scores(member.model, data.public_test,
                                                                          data.score_fn)
        model_report.test_utility_before, model_report.test_utility_se = test.mean, test.se
    return model_report


def _previous_floor(previous: ModelReport, data: DedupData, config: DedupConfig,
                    sampler: LaplaceSampler) -> tuple[float, list[Charge]]:
    """U'_{i-1}: on public data it is free; on private data it is released with Laplace noise."""
    if isinstance(config.validation, Public):
        return previous.val_utility_after, []
    release = release_utility(data.private_val, previous.model, score_fn=data.score_fn,
                              epsilon=config.validation.floor_epsilon, sampler=sampler,
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
    return PublicValidator(batches, data.score_fn, reference=target.model, threshold=config.threshold,
                           margin_se=config.confirm_margin_se, drop_bound_se=config.drop_bound_se)


def _validator(target: Member, data: DedupData, config: DedupConfig, previous: _Floor | None,
               sampler: LaplaceSampler):
    validation = config.validation
    floor = previous.value if previous is not None else None
    if isinstance(validation, Public) and config.agreement:
        batches = agreement_batches(data.public_val, target.model, data.predict_fn)
        return PublicValidator(batches, data.score_fn, reference=target.model, threshold=config.threshold,
                               drop_bound_se=config.drop_bound_se)
    if isinstance(validation, Public):
        return PublicValidator(data.public_val, data.score_fn, reference=target.model, threshold=config.threshold,
                               floor=floor, floor_scores=previous.scores if previous is not None else None,
                               floor_margin_se=config.floor_margin_se, drop_bound_se=config.drop_bound_se)
    if data.private_val is None:
        raise ValueError(f"validation={validation!r} needs private validation data (DedupData.private_val).")
    # On private data, agreement is scored inside the mechanism: it keeps the unedited target's
    # predictions in the firewall's vault when it opens (the live target is then edited in place; no
    # frozen copy of it is made), and no prediction on private data ever leaves it.
    if config.agreement and data.predict_fn is None:
        raise ValueError("agreement validation needs DedupData.predict_fn (per-example predictions).")
    scoring = dict(predict_fn=data.predict_fn) if config.agreement else dict(score_fn=data.score_fn)
    # the mechanisms (privacy/svt.py, privacy/laplace.py) call the threshold ``allowed_drop``
    common = dict(reference=target.model, **scoring, allowed_drop=config.threshold, floor=floor,
                  sampler=sampler, label=f"{validation.kind}-{target.name}")
    if isinstance(validation, SVT):
        return MechanismValidator(SVTSession(data.private_val, epsilon=validation.epsilon,
                                             cutoff=validation.cutoff, **common))
    if isinstance(validation, NaiveLaplace):
        return MechanismValidator(NaiveLaplaceValidator(data.private_val, epsilon_per_query=validation.epsilon_per_query,
                                                        **common))
    raise TypeError(f"Unknown validation {validation!r}: DedupConfig only admits Public, SVT and NaiveLaplace.")


def _finish(member: Member, model_report: ModelReport, data: DedupData) -> ModelReport:
    """Public utilities after the search (the next model's floor may need them)."""
    model_report.model = member.model
    # the per-example scores too: the next target's paired floor compares against them, and the drop's
    # paired SE (what the measured drop is worth) compares them with the scores before
    val, model_report.val_scores = public_utility_and_scores(member.model, data.public_val, data.score_fn)
    model_report.val_utility_after = val.mean
    model_report.val_drop_se = _drop_se(model_report.val_scores, model_report.val_scores_before)
    if data.public_test is not None:
        test, scores = public_utility_and_scores(member.model, data.public_test, data.score_fn)
        model_report.test_utility_after = test.mean
        model_report.test_drop_se = _drop_se(scores, model_report.test_scores_before)
        model_report.public_test_name = data.public_test_dataset
        model_report.public_test_split = data.public_test_split
    model_report.val_scores_before = model_report.test_scores_before = None  # used up
    return model_report


def _drop_se(after: list[torch.Tensor | None], before: list[torch.Tensor | None] | None) -> float | None:
    return None if before is None else paired_difference(after, before).se


def _warn_if_underpowered(report: ModelReport, config: DedupConfig) -> None:
    """The search's public split cannot tell a drop within the threshold from one beyond it: say so
    (private validation decides on other data: its report carries the public figure all the same)."""
    underpowered = report.val_drop_se is not None and report.val_drop_se > config.threshold
    if underpowered and isinstance(config.validation, Public) and report.from_base + report.from_self:
        warnings.warn(UnderpoweredValidationWarning(
            f"{report.name}: the public validation data measures the drop of the accepted replacements only to "
            f"± {100 * report.val_drop_se:.2f} points (paired SE), more than the threshold of "
            f"{100 * config.threshold:.2f}: it may be larger on new data. Give more public validation examples "
            "(and a confirmation split, DedupData(public_confirm=...)), raise the threshold, or ask for a bound "
            "(DedupConfig(drop_bound_se=1))."), stacklevel=2)
