"""The typed, versioned records a member's constitution carries: its privacy and its dedup record.

``Constitution.privacy`` is a :class:`~hf_dpdedup.privacy.PrivacyMetadata` (what the member as
stored costs) and ``Constitution.dedup`` a :class:`DedupRecord` (what deduplication did to it: its
base, the ledger, the budget after deduplication, the fairness verdict, block counts, public test
figures). In the JSON each carries ``"version": 1``; a record without one was written before
records were versioned and is read as version 1 (its fields are the same). A newer version is
refused with the "upgrade hf_dpdedup" error (:class:`~hf_dpdedup.errors.UnsupportedFormatVersionError`);
a field of the wrong type is a :class:`~hf_dpdedup.errors.ConstitutionError` that names it.

The ledger stays the JSON that :meth:`~hf_dpdedup.privacy.LedgerReport.to_dict` writes (its shape
is the privacy package's). Fields a newer writer added are kept in ``extra`` and written back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConstitutionError, PrivacyBudgetError, UnsupportedFormatVersionError
from ..privacy.metadata import AccountantStep, PrivacyMetadata, decode_float, encode_float
from .format import RESAVE

#: the version of the records this hf_dpdedup writes (and the newest it reads)
RECORD_VERSION = 1
_WHAT = "dedup_constitution.json"


# --- checks -----------------------------------------------------------------------------------------
def _bad(path: str, expected: str, value: Any) -> ConstitutionError:
    return ConstitutionError(f"{_WHAT}: {path!r} must be {expected}, found {value!r}; {RESAVE}.")


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, "an object", value)
    return value


def _number(value: Any, path: str, *, optional: bool = False) -> float | None:
    """A JSON number (``"inf"`` or an infinite float for ∞); ``None`` only when ``optional``."""
    if value is None and optional:
        return None
    if value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _bad(path, "a number" + (" or null" if optional else ""), value)
    return value


def _integer(value: Any, path: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(path, "an integer" + (" or null" if optional else ""), value)
    return value


def _string(value: Any, path: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _bad(path, "a string" + (" or null" if optional else ""), value)
    return value


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(path, "true or false", value)
    return value


def _strings(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(path, "a list of strings", value)
    return tuple(value)


def _version(data: dict[str, Any], path: str) -> None:
    """No ``version``: written before records were versioned, read as 1. A newer one is refused."""
    version = data.get("version", RECORD_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _bad(f"{path}.version", "a positive integer", version)
    if version > RECORD_VERSION:
        raise UnsupportedFormatVersionError(
            f"{_WHAT}: the {path!r} record has version {version}, but this hf_dpdedup reads version "
            f"{RECORD_VERSION}. Upgrade hf_dpdedup (pip install -U hf_dpdedup) to read this member."
        )


def _float_out(x: float | None) -> float | str | None:
    return None if x is None else encode_float(x)


# --- privacy ----------------------------------------------------------------------------------------
def privacy_to_dict(privacy: PrivacyMetadata, *, versioned: bool = True) -> dict[str, Any]:
    """The JSON of a privacy record (``versioned``: with its ``version``, as the constitution's own
    ``privacy``; nested in the dedup record it shares that record's version)."""
    return {**({"version": RECORD_VERSION} if versioned else {}), **privacy.to_dict()}


def privacy_from_dict(data: Any, path: str = "privacy") -> PrivacyMetadata:
    """Parse a privacy record (:func:`privacy_to_dict`), checking every field's type."""
    data = _object(data, path)
    _version(data, path)
    history = data.get("history") or []
    if not isinstance(history, list):
        raise _bad(f"{path}.history", "a list", history)
    steps = []
    for i, step in enumerate(history):
        step = _object(step, f"{path}.history[{i}]")
        steps.append((_number(step.get("noise_multiplier"), f"{path}.history[{i}].noise_multiplier"),
                      _number(step.get("sample_rate"), f"{path}.history[{i}].sample_rate"),
                      _integer(step.get("steps"), f"{path}.history[{i}].steps")))
    epsilon = _number(data.get("epsilon"), f"{path}.epsilon")
    delta = _number(data.get("delta"), f"{path}.delta")
    datasets = _strings(data.get("datasets"), f"{path}.datasets")
    accountant = _string(data.get("accountant"), f"{path}.accountant", optional=True)
    seeded = _boolean(data.get("seeded", False), f"{path}.seeded")
    try:
        return PrivacyMetadata(decode_float(epsilon), delta, datasets, accountant,
                               tuple(AccountantStep(*s) for s in steps), seeded)
    except PrivacyBudgetError as exc:
        raise ConstitutionError(f"{_WHAT}: {path!r}: {exc} {RESAVE[0].upper()}{RESAVE[1:]}.") from None


# --- the dedup record's parts -----------------------------------------------------------------------
@dataclass(frozen=True)
class LooseTight:
    """A figure after deduplication: ``loose`` (Theorem 4, always valid) and ``tight`` (RDP, or None)."""

    loose: float
    tight: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"loose": _float_out(self.loose), "tight": _float_out(self.tight)}

    @classmethod
    def from_dict(cls, data: Any, path: str, *, scalar_is_both: bool = False) -> "LooseTight":
        """Also reads the older scalar form: the loose figure (for δ: ``scalar_is_both``, both)."""
        if not isinstance(data, dict):
            value = _number(data, path)
            return cls(value, value if scalar_is_both else None)
        return cls(_number(data.get("loose"), f"{path}.loose"),
                   _number(data.get("tight"), f"{path}.tight", optional=True))


#: ε after deduplication, loose and tight at the same δ
EpsilonAfter = LooseTight
#: δ after deduplication, loose and tight
DeltaAfter = LooseTight


@dataclass(frozen=True)
class AtDelta:
    """A guarantee at one δ (the RDP figure at the δ the member was trained with)."""

    epsilon: float
    delta: float

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon": _float_out(self.epsilon), "delta": self.delta}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "AtDelta":
        data = _object(data, path)
        return cls(_number(data.get("epsilon"), f"{path}.epsilon"), _number(data.get("delta"), f"{path}.delta"))


@dataclass(frozen=True)
class PrivateValidation:
    """What dedup spent querying one private data set: Σ ε and how many mechanisms of each kind."""

    epsilon: float
    mechanisms: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon": _float_out(self.epsilon), "mechanisms": dict(self.mechanisms)}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "PrivateValidation":
        data = _object(data, path)
        mechanisms = _object(data.get("mechanisms", {}), f"{path}.mechanisms")
        return cls(_number(data.get("epsilon"), f"{path}.epsilon"),
                   {k: _integer(v, f"{path}.mechanisms.{k}") for k, v in mechanisms.items()})


@dataclass(frozen=True)
class Fairness:
    """The fairness verdict: ``flagged`` when a lower-ε member (``dominated_by``) scored higher ``on``
    the public data; ``compared_with`` every lower-ε member read (what the verdict was charged for)."""

    flagged: bool
    dominated_by: tuple[str, ...] = ()
    compared_with: tuple[str, ...] = ()
    on: str = "public validation"

    def to_dict(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "dominated_by": list(self.dominated_by),
                "compared_with": list(self.compared_with), "on": self.on}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "Fairness":
        data = _object(data, path)
        return cls(_boolean(data.get("flagged"), f"{path}.flagged"),
                   _strings(data.get("dominated_by", []), f"{path}.dominated_by"),
                   _strings(data.get("compared_with", []), f"{path}.compared_with"),
                   _string(data.get("on", "public validation"), f"{path}.on"))


@dataclass(frozen=True)
class BlocksRecord:
    """Block counts: the member's ``total`` blocks, how many came from the base and from itself."""

    total: int
    from_base: int = 0
    from_self: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def own(self) -> int:
        return self.total - self.from_base - self.from_self

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "from_base": self.from_base, "from_self": self.from_self, **self.extra}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "BlocksRecord":
        data = _object(data, path)
        return cls(_integer(data.get("total"), f"{path}.total"),
                   _integer(data.get("from_base", 0), f"{path}.from_base"),
                   _integer(data.get("from_self", 0), f"{path}.from_self"),
                   extra={k: v for k, v in data.items() if k not in ("total", "from_base", "from_self")})


@dataclass(frozen=True)
class BeforeAfter:
    """A public utility before and after deduplication (either may be unknown), the standard error of
    the one before (sample std of the per-example scores / √n) and the *paired* standard error of
    the drop (of after − before on the same examples: what the measured change is worth); each SE
    absent when unknown."""

    before: float | None = None
    after: float | None = None
    se: float | None = None
    drop_se: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after,
                **{k: v for k, v in (("se", self.se), ("drop_se", self.drop_se)) if v is not None}}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "BeforeAfter":
        data = _object(data, path)
        return cls(_number(data.get("before"), f"{path}.before", optional=True),
                   _number(data.get("after"), f"{path}.after", optional=True),
                   _number(data.get("se"), f"{path}.se", optional=True),
                   _number(data.get("drop_se"), f"{path}.drop_se", optional=True))


@dataclass(frozen=True)
class PublicTest:
    """A result on a *public* test set with a Hub id (the only figures that reach ``model-index``)."""

    dataset: str
    after: float
    before: float | None = None
    split: str = "test"
    metric: str = "accuracy"
    dataset_name: str | None = None
    config: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "metric": self.metric, "before": self.before,
                "after": self.after, **({"dataset_name": self.dataset_name} if self.dataset_name else {}),
                **({"config": self.config} if self.config else {})}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "PublicTest":
        data = _object(data, path)
        return cls(dataset=_string(data.get("dataset"), f"{path}.dataset"),
                   after=_number(data.get("after"), f"{path}.after"),
                   before=_number(data.get("before"), f"{path}.before", optional=True),
                   split=_string(data.get("split") or "test", f"{path}.split"),
                   metric=_string(data.get("metric") or "accuracy", f"{path}.metric"),
                   dataset_name=_string(data.get("dataset_name"), f"{path}.dataset_name", optional=True),
                   config=_string(data.get("config"), f"{path}.config", optional=True))


# --- the dedup record -------------------------------------------------------------------------------
_DEDUP_KEYS = ("version", "role", "base", "original_privacy", "ledger", "epsilon_after", "delta_after",
               "tight_at_training_delta", "svt_epsilon", "private_validation", "fairness", "seeded", "noise",
               "blocks", "validations", "public_test_accuracy", "compression", "public_test",
               "public_validation_accuracy", "confirmations", "rejected_by_confirmation")


def _maybe(data: dict[str, Any], key: str, parse: Any, path: str, **kwargs: Any) -> Any:
    value = data.get(key)
    return None if value is None else parse(value, f"{path}.{key}", **kwargs)


@dataclass(frozen=True)
class DedupRecord:
    """What deduplication did to a member (``Constitution.dedup``); every field may be unknown.

    ``original_privacy`` is the budget it was trained with (the constitution's ``privacy`` is its
    cost after deduplication); ``ledger`` the ``LedgerReport.to_dict()`` of that cost;
    ``compression`` its own stored bytes ÷ its original bytes; ``public_test`` its result on a
    public test set with a Hub id, ``public_test_accuracy`` the same figures without one;
    ``public_validation_accuracy`` the utility on the public split the search decided on, and
    ``confirmations`` / ``rejected_by_confirmation`` the checks of the accepted replacements on a
    second public split the search never saw, and how many of them that check reverted (a target's
    only; 0 confirmations: none was made)."""

    role: str | None = None  # "base" | "target" | "dropped"
    base: str | None = None
    original_privacy: PrivacyMetadata | None = None
    ledger: dict[str, Any] | None = None
    epsilon_after: LooseTight | None = None
    delta_after: LooseTight | None = None
    tight_at_training_delta: AtDelta | None = None
    svt_epsilon: float | None = None
    private_validation: Mapping[str, PrivateValidation] = field(default_factory=dict)
    fairness: Fairness | None = None
    seeded: bool = False
    noise: str = "secure"
    blocks: BlocksRecord | None = None
    validations: int | None = None
    public_test_accuracy: BeforeAfter | None = None
    compression: float | None = None
    public_test: PublicTest | None = None
    public_validation_accuracy: BeforeAfter | None = None
    confirmations: int | None = None
    rejected_by_confirmation: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        def out(x: Any) -> Any:
            return None if x is None else x.to_dict()

        return {
            "version": RECORD_VERSION,
            "role": self.role,
            "base": self.base,
            "original_privacy": None if self.original_privacy is None
            else privacy_to_dict(self.original_privacy, versioned=False),
            "ledger": self.ledger,
            "epsilon_after": out(self.epsilon_after),
            "delta_after": out(self.delta_after),
            "tight_at_training_delta": out(self.tight_at_training_delta),
            "svt_epsilon": _float_out(self.svt_epsilon),
            "private_validation": {k: v.to_dict() for k, v in self.private_validation.items()},
            "fairness": out(self.fairness),
            "seeded": self.seeded,
            "noise": self.noise,
            "blocks": out(self.blocks),
            "validations": self.validations,
            "public_test_accuracy": out(self.public_test_accuracy),
            # known only once the member's rows are stored; absent rather than null when unknown
            **({"compression": self.compression} if self.compression is not None else {}),
            **({"public_test": self.public_test.to_dict()} if self.public_test is not None else {}),
            # absent rather than null when unknown (records written before them have none)
            **({"public_validation_accuracy": self.public_validation_accuracy.to_dict()}
               if self.public_validation_accuracy is not None else {}),
            **{k: v for k, v in (("confirmations", self.confirmations),
                                 ("rejected_by_confirmation", self.rejected_by_confirmation)) if v is not None},
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, path: str = "dedup") -> "DedupRecord":
        data = _object(data, path)
        _version(data, path)
        validation = _object(data.get("private_validation") or {}, f"{path}.private_validation")
        ledger = data.get("ledger")
        if ledger is not None:
            _object(ledger, f"{path}.ledger")
        return cls(
            role=_string(data.get("role"), f"{path}.role", optional=True),
            base=_string(data.get("base"), f"{path}.base", optional=True),
            original_privacy=_maybe(data, "original_privacy", privacy_from_dict, path),
            ledger=ledger,
            epsilon_after=_maybe(data, "epsilon_after", LooseTight.from_dict, path),
            delta_after=_maybe(data, "delta_after", LooseTight.from_dict, path, scalar_is_both=True),
            tight_at_training_delta=_maybe(data, "tight_at_training_delta", AtDelta.from_dict, path),
            svt_epsilon=_number(data.get("svt_epsilon"), f"{path}.svt_epsilon", optional=True),
            private_validation={k: PrivateValidation.from_dict(v, f"{path}.private_validation.{k}")
                                for k, v in validation.items()},
            fairness=_maybe(data, "fairness", Fairness.from_dict, path),
            seeded=_boolean(data.get("seeded", False), f"{path}.seeded"),
            noise=_string(data.get("noise") or "secure", f"{path}.noise"),
            blocks=_maybe(data, "blocks", BlocksRecord.from_dict, path),
            validations=_integer(data.get("validations"), f"{path}.validations", optional=True),
            public_test_accuracy=_maybe(data, "public_test_accuracy", BeforeAfter.from_dict, path),
            compression=_number(data.get("compression"), f"{path}.compression", optional=True),
            public_test=_maybe(data, "public_test", PublicTest.from_dict, path),
            public_validation_accuracy=_maybe(data, "public_validation_accuracy", BeforeAfter.from_dict, path),
            confirmations=_integer(data.get("confirmations"), f"{path}.confirmations", optional=True),
            rejected_by_confirmation=_integer(data.get("rejected_by_confirmation"), f"{path}.rejected_by_confirmation",
                                              optional=True),
            extra={k: v for k, v in data.items() if k not in _DEDUP_KEYS},
        )
