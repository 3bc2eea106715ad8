"""Storing a searched family: outcomes of the family loop (:mod:`.planner`) written into a new family folder.

:func:`save_outcomes` builds the family in a hidden staging folder and renames it into place at the
end, so a failure leaves no family behind; :func:`store_outcome` writes one member with its dedup
record (the byte figures known once its rows are stored). :func:`deduplicate_family` is the one-pass
form: search and store, each member stored as soon as it is searched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..store.constitution import Constitution
from ..store.family import FamilyStore, staged_family_folder
from ..store.records import DedupRecord
from .config import DedupConfig
from .planner import DedupData, Member, Outcome, search_family
from .report import FamilyReport, ModelReport, stored_bytes_of, stored_bytes_of_tensors


def save_outcomes(outcomes: Iterable[Outcome], out: str | Path, config: DedupConfig, *,
                  report_extra: Mapping[str, Any] | None = None,
                  before_publish: Callable[[], None] | None = None) -> FamilyReport:
    """Store outcomes (in storing order) as a new family folder ``out``; return the family report.

    Built in a hidden staging folder and renamed to ``out`` at the end (after ``before_publish()``):
    a failure leaves no family behind. Outcomes may come from a running search (stored as they come:
    one target in memory) or from a finished one (a lazy member is loaded again and its decisions
    re-applied to it: bit-identical to what was searched). ``report_extra`` adds entries to the
    report's ``config`` section (a callable value is called once every outcome is stored).
    """
    report = new_family_report(config)
    with staged_family_folder(out, before_publish=before_publish) as staging:
        family: FamilyStore | None = None
        base: Outcome | None = None  # the current group's base: its targets' decisions are applied against it
        for outcome in outcomes:
            if outcome.report.base is None:  # a group's base (targets name theirs)
                if base is not None:
                    base.release()  # the previous group is done
                base = outcome
            if outcome.stored:
                on = base.member.loaded() if base is not None and outcome is not base else None
                outcome.materialise(on, config.block_size)
            if family is None:  # after materialising: the store's dtype costs no extra load of the member
                family = new_family_store(staging, [outcome.member], config)
            report.models.append(store_outcome(family, outcome))  # a dropped one: its report only
            if outcome is not base:
                outcome.release()
        if family is None:
            raise ValueError("No member to store: pass at least one member.")
        if base is not None:
            base.release()
        report.family_stored_bytes = family.stored_bytes()
        report.config.update({k: v() if callable(v) else v for k, v in (report_extra or {}).items()})
    return report


def new_family_report(config: DedupConfig, models: Iterable[ModelReport] = ()) -> FamilyReport:
    """A family report for ``config`` (its ``config`` section records every setting of the run)."""
    return FamilyReport(config=config.to_dict(), models=list(models))


def deduplicate_family(
    members: list[Member], data: DedupData, config: DedupConfig, out: str | Path
) -> FamilyReport:
    """Deduplicate ``members`` into a new family store at ``out``; return the report.

    One pass: each member is stored as soon as it is searched (see :class:`Member` for lazy members
    and memory). :class:`hf_dpdedup.DedupedFamily` is the object form (search now, save later).
    """
    return save_outcomes(search_family(members, data, config), out, config)


def new_family_store(out: str | Path, members: list[Member], config: DedupConfig) -> FamilyStore:
    first = members[0]
    was_loaded = first.model is not None
    dtype = next(first.loaded().parameters()).dtype
    if not was_loaded:
        first.release()
    family = FamilyStore.create(out, block_size=config.block_size, dtype=dtype)
    family.write_config(config.to_dict())  # dedup_config.json: DedupConfig.from_family(out) reads it back
    return family


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
    state = model.state_dict()
    model_report.original_bytes = sum(t.numel() * t.element_size() for t in state.values())

    def record(constitution: Constitution, extras_bytes: int) -> DedupRecord:
        """The member's dedup record, with the figures known once its rows are stored: written once."""
        model_report.own_bytes = stored_bytes_of(family, constitution, rows_before, extras_bytes)
        model_report.own_bytes_differing, model_report.original_bytes_differing = stored_bytes_of_tensors(
            family, constitution, rows_before, state, set(model_report.differing_tensors))
        return model_report.dedup_record(member.privacy)

    family.add_model(member.name, model, tokenizer=member.tokenizer, files_from=member.files_from,
                     privacy=privacy, dedup=record)
    return model_report
