"""Deduplication reports: per model and per family, as JSON, a readable table and a PNG plot.

Compression follows the paper: a target's *own* stored bytes (rows it added to the store plus its
extras file) divided by its original size; the family figure divides everything stored (shards,
index, member folders) by the original bytes of all members. Utilities printed here are public
(validation or test); private figures never appear unnoised.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..privacy import SEEDED_LABEL, PrivacyMetadata
from ..privacy.charge import sum_rounded_up
from ..store.constitution import Constitution
from ..store.family import FamilyStore
from ..store.format import EXTRAS_FILE
from ..store.records import (
    AtDelta,
    BeforeAfter,
    BlocksRecord,
    DedupRecord,
    Fairness,
    LooseTight,
    PrivateValidation,
    PublicTest,
)


def stored_bytes_of(family: FamilyStore, constitution: Constitution, rows_before: int,
                    extras_bytes: int | None = None) -> int:
    """Bytes a member added: its new rows (first stored by it) plus its extras file (its size as
    given, else read from the member folder)."""
    row_bytes = family.blocks.block_size * family.blocks.dtype.itemsize
    new_rows = {r for r in constitution.all_rows if r >= rows_before}
    if extras_bytes is None:
        extras_bytes = (family.member_path(constitution.name) / EXTRAS_FILE).stat().st_size
    return len(new_rows) * row_bytes + extras_bytes


def stored_bytes_of_tensors(family: FamilyStore, constitution: Constitution, rows_before: int,
                            state: dict[str, Any], names: set[str]) -> tuple[int, int]:
    """(own stored bytes, original bytes) of the tensors ``names`` alone: their new rows, and the
    bytes of those among them that are extras (stored whole in the member's extras file)."""
    row_bytes = family.blocks.block_size * family.blocks.dtype.itemsize
    blocked = {t.name: t for t in constitution.tensors}
    new_rows = {r for n in names if n in blocked for r in blocked[n].rows if r >= rows_before}
    extras = sum(state[n].numel() * state[n].element_size() for n in names if n not in blocked and n in state)
    original = sum(state[n].numel() * state[n].element_size() for n in names if n in state)
    return len(new_rows) * row_bytes + extras, original


@dataclass
class ModelReport:
    name: str
    role: str  # "base" | "target" | "dropped" (flagged by the fairness verdict, left out on request)
    epsilon_before: float
    delta_before: float
    n_blocks: int = 0
    from_base: int = 0
    from_self: int = 0
    candidates: int = 0
    validations: int = 0
    halted: bool = False
    floor: float | None = None
    base: str | None = None
    val_utility_before: float | None = None
    val_utility_after: float | None = None
    test_utility_before: float | None = None
    test_utility_after: float | None = None
    val_utility_se: float | None = None  # standard errors of the utilities before (sample std / √n)
    test_utility_se: float | None = None
    confirmations: int = 0  # validations on the public confirmation split
    rejected_by_confirmation: int = 0  # accepted by the search, reverted by the confirmation
    own_bytes: int = 0
    original_bytes: int = 0
    # the tensors in which the member differs from the base (where exact sharing cannot help, e.g.
    # those DP training changed), and the member's own/original bytes over them alone
    differing_tensors: tuple[str, ...] = ()
    own_bytes_differing: int = 0
    original_bytes_differing: int = 0
    public_test_name: str | None = None  # Hub id of the public test set, when known
    public_test_split: str = "test"
    ledger: Any = None  # privacy.LedgerReport: loose and tight at the same (summed) δ per component
    ledger_at_own_delta: Any = None  # the same charges converted at the δ the member was trained with
    fairness: dict[str, Any] | None = None  # the verdict: flagged, dominated_by, compared_with, on
    noise: str = "secure"  # the dedup noise (DedupConfig.noise_seed): "secure" or SEEDED_LABEL
    charges: list = field(default_factory=list, repr=False)
    model: Any = field(default=None, repr=False)
    #: the paired SE of the drop (after − before on the same examples): what the measured drop is worth
    val_drop_se: float | None = None
    test_drop_se: float | None = None
    #: the model's per-example scores on public validation after the search (the next paired floor's)
    val_scores: list | None = field(default=None, repr=False)
    #: the per-example scores before the search, until the drops' SEs are computed
    val_scores_before: list | None = field(default=None, repr=False)
    test_scores_before: list | None = field(default=None, repr=False)

    @classmethod
    def start(cls, member, role: str, n_blocks: int) -> "ModelReport":
        return cls(member.name, role, member.privacy.epsilon, member.privacy.delta, n_blocks=n_blocks)

    def record_search(self, result, candidates: int, floor: float | None) -> None:
        counts = Counter(r.source for r in result.accepted)
        self.from_base, self.from_self = counts["base"], counts["self"]
        self.candidates, self.validations, self.halted, self.floor = candidates, result.validations, result.halted, floor
        self.confirmations, self.rejected_by_confirmation = result.confirmations, result.rejected_by_confirmation

    @property
    def own_blocks(self) -> int:
        return self.n_blocks - self.from_base - self.from_self

    @property
    def compression(self) -> float | None:
        return self.own_bytes / self.original_bytes if self.original_bytes else None

    @property
    def compression_differing(self) -> float | None:
        """Own stored bytes ÷ original over the tensors that differ from the base alone."""
        return self.own_bytes_differing / self.original_bytes_differing if self.original_bytes_differing else None

    @property
    def epsilon_after(self) -> float:
        return self.ledger.epsilon if self.ledger is not None else self.epsilon_before

    @property
    def svt_epsilon(self) -> float:
        """ε of the SVT sessions alone (kept for old readers; ``private_validation`` has every mechanism)."""
        return sum_rounded_up(c.epsilon for c in self.charges if c.kind == "svt")

    @property
    def seeded(self) -> bool:
        """True when any noise behind this member (training or dedup) came from a known seed."""
        return self.noise != "secure" or any(c.seeded for c in self.charges)

    @property
    def private_validation(self) -> dict[str, dict[str, Any]]:
        """Per private data set id: Σ ε of every non-training charge (SVT, Laplace floors, naive
        queries) and how many of each kind — what dedup spent querying private data."""
        out: dict[str, dict[str, Any]] = {}
        for charge in {c.source_id: c for c in self.charges if c.kind != "training"}.values():
            for dataset in charge.datasets:
                entry = out.setdefault(dataset, {"epsilon": 0.0, "mechanisms": {}})
                entry["epsilon"] = sum_rounded_up([entry["epsilon"], charge.epsilon])
                entry["mechanisms"][charge.kind] = entry["mechanisms"].get(charge.kind, 0) + 1
        return out

    @property
    def delta_after(self) -> float:
        return self.ledger.delta if self.ledger is not None else self.delta_before

    def public_test(self) -> PublicTest | None:
        """The public test result for a model card's ``model-index`` (needs the data set's Hub id)."""
        if not self.public_test_name or self.test_utility_after is None:
            return None
        return PublicTest(dataset=self.public_test_name, split=self.public_test_split, metric="accuracy",
                          before=self.test_utility_before, after=self.test_utility_after)

    def dedup_record(self, original: PrivacyMetadata) -> DedupRecord:
        """The constitution's ``dedup`` record (and from there the model card's): ``original`` is the
        budget the member was trained with. ``compression`` is known once its rows are stored."""
        own, ledger = self.ledger_at_own_delta, self.ledger
        return DedupRecord(
            role=self.role,
            base=self.base,
            original_privacy=original,
            ledger=ledger.to_dict() if ledger is not None else None,
            epsilon_after=LooseTight(ledger.epsilon_loose, ledger.epsilon_tight) if ledger is not None
            else LooseTight(original.epsilon, None),
            delta_after=LooseTight(ledger.delta_loose, ledger.delta_tight) if ledger is not None
            else LooseTight(original.delta, None),
            tight_at_training_delta=None if own is None or own.epsilon_tight is None
            else AtDelta(own.epsilon_tight, own.delta_tight),
            svt_epsilon=self.svt_epsilon,
            private_validation={k: PrivateValidation(v["epsilon"], v["mechanisms"])
                                for k, v in self.private_validation.items()},
            fairness=Fairness(self.fairness["flagged"], tuple(self.fairness["dominated_by"]),
                              tuple(self.fairness["compared_with"]), self.fairness["on"])
            if self.fairness is not None else None,
            seeded=self.seeded,
            noise=SEEDED_LABEL if self.seeded else "secure",
            blocks=BlocksRecord(self.n_blocks, self.from_base, self.from_self),
            validations=self.validations,
            public_test_accuracy=BeforeAfter(self.test_utility_before, self.test_utility_after, self.test_utility_se,
                                             self.test_drop_se),
            compression=self.compression,
            public_test=self.public_test(),
            public_validation_accuracy=None if self.val_utility_before is None
            else BeforeAfter(self.val_utility_before, self.val_utility_after, self.val_utility_se, self.val_drop_se),
            confirmations=self.confirmations if self.role == "target" else None,
            rejected_by_confirmation=self.rejected_by_confirmation if self.role == "target" else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "role": self.role, "base": self.base,
            "blocks": self.n_blocks, "from_base": self.from_base, "from_self": self.from_self,
            "own_blocks": self.own_blocks, "candidates": self.candidates, "validations": self.validations,
            "confirmations": self.confirmations, "rejected_by_confirmation": self.rejected_by_confirmation,
            "halted": self.halted, "floor": self.floor,
            "val_utility_before": self.val_utility_before, "val_utility_after": self.val_utility_after,
            "test_utility_before": self.test_utility_before, "test_utility_after": self.test_utility_after,
            "val_utility_se": self.val_utility_se, "test_utility_se": self.test_utility_se,
            "val_drop_se": self.val_drop_se, "test_drop_se": self.test_drop_se,
            "own_bytes": self.own_bytes, "original_bytes": self.original_bytes, "compression": self.compression,
            "compression_differing_tensors": self.compression_differing,
            "differing_tensors": len(self.differing_tensors),
            "epsilon_before": self.epsilon_before, "delta_before": self.delta_before,
            "epsilon_after": self.epsilon_after,
            "epsilon_after_loose": self.ledger.epsilon_loose if self.ledger is not None else None,
            "epsilon_after_tight": self.ledger.epsilon_tight if self.ledger is not None else None,
            "delta_after": self.delta_after,
            "svt_epsilon": self.svt_epsilon, "private_validation": self.private_validation,
            "fairness": self.fairness, "noise": SEEDED_LABEL if self.seeded else "secure",
        }


@dataclass
class FamilyReport:
    config: dict[str, Any]
    models: list[ModelReport] = field(default_factory=list)
    family_stored_bytes: int = 0
    #: what the run validated on, where the caller knows it (the CLI: ``public_splits``, the search's
    #: and the confirmation's public data and sizes); the engine itself sees only batches
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def targets(self) -> list[ModelReport]:
        return [m for m in self.models if m.role == "target"]

    def summary(self) -> dict[str, Any]:
        stored = [m for m in self.models if m.role != "dropped"]
        original = sum(m.original_bytes for m in stored)
        targets = self.targets
        target_original = sum(m.original_bytes for m in targets)
        drops = [m.test_utility_before - m.test_utility_after for m in stored
                 if m.test_utility_before is not None and m.test_utility_after is not None]
        differing = sum(m.original_bytes_differing for m in targets)
        return {
            "targets_compression": sum(m.own_bytes for m in targets) / target_original if target_original else None,
            "targets_compression_differing_tensors":
                sum(m.own_bytes_differing for m in targets) / differing if differing else None,
            "family_stored_over_original": self.family_stored_bytes / original if original else None,
            "family_stored_bytes": self.family_stored_bytes,
            "family_original_bytes": original,
            "validations": sum(m.validations for m in targets),
            "max_validations_per_target": max((m.validations for m in targets), default=0),
            "max_public_test_drop": max(drops, default=None),
            "fairness_holds": fairness_holds(stored),
            "fairness_flagged": [m.name for m in self.models if m.fairness and m.fairness["flagged"]],
            "dropped": [m.name for m in self.models if m.role == "dropped"],
        }

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, **({"data": self.data} if self.data else {}), "summary": self.summary(),
                "models": [m.to_dict() for m in self.models]}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dedup_report.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        (folder / "dedup_report.txt").write_text(self.table() + "\n")
        self.plot(folder / "dedup_report.png")

    def table(self) -> str:
        head = (f"{'model':<22}{'role':<8}{'blocks':>7}{'base':>6}{'self':>6}{'own':>6}{'valid.':>7}"
                f"{'compr.':>8}{'Δ-only':>8}{'test before':>12}{'test after':>11}{'ε before':>9}{'ε after':>9}"
                f"{'ε priv.':>8}{'δ after':>9}  fairness")
        lines = [head]
        for m in self.models:
            comp = f"{m.compression:.1%}" if m.compression is not None else "-"
            comp_d = f"{m.compression_differing:.1%}" if m.compression_differing is not None else "-"
            lines.append(
                f"{m.name:<22}{m.role:<8}{m.n_blocks:>7}{m.from_base:>6}{m.from_self:>6}{m.own_blocks:>6}"
                f"{m.validations:>7}{comp:>8}{comp_d:>8}{_fmt(m.test_utility_before):>12}"
                f"{_fmt(m.test_utility_after):>11}{m.epsilon_before:>9.3g}{m.epsilon_after:>9.3g}"
                f"{sum_rounded_up(v['epsilon'] for v in m.private_validation.values()):>8.3g}"
                f"{m.delta_after:>9.2g}  {_verdict(m.fairness)}"
            )
        s = self.summary()
        lines.append("")
        lines.append(
            "targets' compression {} (over the tensors that differ from the base: {}); family stored/original {}; "
            "validations {} (max {} per target); max public-test drop {}; fairness holds: {}".format(
                _pct(s["targets_compression"]), _pct(s["targets_compression_differing_tensors"]),
                _pct(s["family_stored_over_original"]), s["validations"],
                s["max_validations_per_target"], _fmt(s["max_public_test_drop"]), s["fairness_holds"])
        )
        if self.config.get("noise_seed") is not None or any(m.seeded for m in self.models):
            lines.append(SEEDED_LABEL)
        return "\n".join(lines)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        points = [(m.compression, m.test_utility_before - m.test_utility_after, m.name) for m in self.targets
                  if m.compression is not None and m.test_utility_after is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        for comp, drop, name in points:
            ax.scatter(comp * 100, drop * 100)
            ax.annotate(name, (comp * 100, drop * 100), fontsize=8)
        ax.set_xlabel("own stored bytes / original (%)")
        ax.set_ylabel("public test accuracy drop (points)")
        ax.set_title("Compression vs. accuracy drop per target")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def fairness_holds(models: list[ModelReport]) -> bool:
    """Higher ε ⇒ at least equal public-test utility after dedup (when test data was given)."""
    known = [m for m in models if m.test_utility_after is not None]
    return all(not (a.epsilon_before > b.epsilon_before and a.test_utility_after < b.test_utility_after)
               for a in known for b in known)


def _verdict(fairness: dict[str, Any] | None) -> str:
    if fairness is None:
        return "-"
    if fairness["flagged"]:
        return "FLAGGED: lower utility than lower-ε " + ", ".join(fairness["dominated_by"])
    return "ok"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"
