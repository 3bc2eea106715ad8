"""What a family deduplication is asked to do: typed, frozen, nested and serialisable.

::

    from hf_dpdedup import DedupConfig, SVT, Greedy

    config = DedupConfig(threshold=0.02, validation=SVT(epsilon=1.0, cutoff=3), strategy=Greedy(n=10))
    data = config.to_dict()                 # {"version": 1, ..., "validation": {"kind": "svt", ...}}
    assert DedupConfig.from_dict(data) == config

* **validation** — how "is the edited model still good enough?" is answered: :class:`Public`
  (public validation data, free), :class:`SVT` (private data through the Sparse Vector Technique)
  or :class:`NaiveLaplace` (private data, one Laplace release per query). ``floor_epsilon`` (the
  charged release of the previous model's utility that the interactive floor needs on private
  data) belongs to the two private kinds: on public data the floor is free.
* **strategy** — which replacements to keep (:mod:`.search`): :class:`Gallop` (default),
  :class:`Greedy`, :class:`Binary`, :class:`Halving`, :class:`MCTS`, each with its own options.
* **plan** — :class:`~.plan.PlanConfig`: candidates and their order.
* ``threshold`` — the allowed utility drop (0.015 = 1.5 points); one name from here to the validators.
* ``interactive`` — the floor ``max(U'_{i-1}, U_i − threshold)``. Its default (``None``) resolves
  to ``not agreement``: agreement validation compares each model with *itself*, so a floor taken
  from the previous model's utility means nothing there; ``agreement=True, interactive=True`` is a
  :class:`~hf_dpdedup.errors.ConfigError` that says to pass ``interactive=False``. On public
  validation the comparison with U'_{i-1} allows ``floor_margin_se`` (default 1) paired standard
  errors of the two models' per-example difference; 0 is the paper's exact comparison.

Every field is checked at construction (:class:`~hf_dpdedup.errors.ConfigError` names the field
and the values it takes). ``to_dict`` / ``from_dict`` round-trip exactly and carry a ``version``;
:func:`~.storing.deduplicate_family` writes the dict to the family as ``dedup_config.json``
(:meth:`DedupConfig.from_family` reads it back).

**Deprecated keywords (kept for one release).** ``DedupConfig(validation="svt", svt_epsilon=..,
svt_cutoff=.., naive_epsilon=.., floor_epsilon=..)`` and ``DedupConfig(strategy="greedy",
strategy_options={"n": 10})`` still build the same config (a ``DeprecationWarning`` says what to
write instead); keywords for a kind that is not chosen are ignored, as they always were.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import InitVar, dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, Mapping, Union

from ..errors import ConfigError, UnsupportedConfigVersionError
from ..privacy import LaplaceSampler
from ..store.family import FamilyStore
from .plan import PlanConfig
from .typed import check_types, choice_kinds, decode, encode, require

#: the version of :meth:`DedupConfig.to_dict`'s layout
CONFIG_VERSION = 1


def _positive(cls: str, name: str, value: float) -> None:
    require(value > 0, f"{cls}.{name} must be > 0, got {value!r}.")


# --- validation --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Public:
    """Validate on public data (``DedupData.public_val``): free, exact."""

    kind: ClassVar[str] = "public"

    def __post_init__(self) -> None:
        check_types(self)


@dataclass(frozen=True)
class SVT:
    """Validate on private data through the Sparse Vector Technique: ``epsilon`` per target, at most
    ``cutoff`` "too big a drop" answers; ``floor_epsilon``: the interactive floor's Laplace release."""

    kind: ClassVar[str] = "svt"
    epsilon: float = 1.0
    cutoff: int = 3
    floor_epsilon: float = 0.1

    def __post_init__(self) -> None:
        check_types(self)
        _positive("SVT", "epsilon", self.epsilon)
        require(self.cutoff >= 1, f"SVT.cutoff must be ≥ 1 (answers before the session halts), got {self.cutoff}.")
        _positive("SVT", "floor_epsilon", self.floor_epsilon)


@dataclass(frozen=True)
class NaiveLaplace:
    """Validate on private data with one charged Laplace release per query (the baseline);
    ``floor_epsilon``: the interactive floor's Laplace release."""

    kind: ClassVar[str] = "naive"
    epsilon_per_query: float = 0.1
    floor_epsilon: float = 0.1

    def __post_init__(self) -> None:
        check_types(self)
        _positive("NaiveLaplace", "epsilon_per_query", self.epsilon_per_query)
        _positive("NaiveLaplace", "floor_epsilon", self.floor_epsilon)


Validation = Union[Public, SVT, NaiveLaplace]


# --- strategy ----------------------------------------------------------------------------------------
class _Strategy:
    """Options of a search strategy of :mod:`.search` (the keywords its function takes)."""

    kind: ClassVar[str]

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __post_init__(self) -> None:
        check_types(self)
        for name, value in self.options().items():
            if name != "seed":
                require(value >= 1, f"{type(self).__name__}.{name} must be ≥ 1, got {value}.")


@dataclass(frozen=True)
class Gallop(_Strategy):
    """Groups that double after an accepted group and halve after a rejected one (default)."""

    kind: ClassVar[str] = "gallop"
    min_group: int = 4
    max_validations: int = 25


@dataclass(frozen=True)
class Greedy(_Strategy):
    """Fixed groups of ``n`` (the paper's GreedyN)."""

    kind: ClassVar[str] = "greedy"
    n: int = 10


@dataclass(frozen=True)
class Binary(_Strategy):
    """Binary search over the remaining sequence, down to groups of ``min_group``."""

    kind: ClassVar[str] = "binary"
    min_group: int = 4


@dataclass(frozen=True)
class Halving(_Strategy):
    """Successive halving of the current group, down to ``min_group``."""

    kind: ClassVar[str] = "halving"
    min_group: int = 4


@dataclass(frozen=True)
class MCTS(_Strategy):
    """The paper's Monte-Carlo tree search over include/skip per ``group``, ``episodes`` validations."""

    kind: ClassVar[str] = "mcts"
    group: int = 20
    episodes: int = 20
    seed: int = 0


Strategy = Union[Gallop, Greedy, Binary, Halving, MCTS]


# --- the whole run -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    """A family deduplication's parameters (see the module docstring)."""

    block_size: int = 65536
    threshold: float = 0.015  # allowed utility drop (0.015 = 1.5 points)
    strategy: Strategy = Gallop()
    plan: PlanConfig = field(default_factory=PlanConfig)
    validation: Validation = Public()
    # None: ``not agreement`` (agreement compares a model with itself; no floor from the previous one)
    interactive: bool | None = None
    # Validate on agreement with the target's own predictions instead of on labels: the "drop" is the
    # share of public validation examples whose prediction changed, which bounds the accuracy change
    # on any data set and is a far less noisy signal than the accuracy on a small validation set.
    agreement: bool = False
    # The interactive floor on public validation: a target may end below the previous model by at
    # most this many paired standard errors of their per-example score difference ("not measurably
    # worse"; 0: the paper's exact U'_i ≥ U'_{i-1}, which on a small validation set forbids a target
    # any change once a lower-ε model scores a few examples higher by chance). Private validation
    # (SVT, naive) keeps the exact comparison with the released floor: a paired SE on private data
    # would be one more release to pay for.
    floor_margin_se: float = 1.0
    # Public validation (search and confirmation): accept a candidate only when its measured drop plus
    # this many paired standard errors of its per-example difference from the unedited target is within
    # the threshold — an upper confidence bound on the drop, against taking replacements that pass only
    # by the luck of a small validation set (0: the measured drop alone, the paper's rule).
    drop_bound_se: float = 0.0
    # The confirmation split accepts a drop of threshold + confirm_margin_se standard errors of the
    # target's utility on it (0: the same threshold as the search).
    confirm_margin_se: float = 0.0
    # what the confirmation keeps when it rejects the accepted set: "prefix" (the longest cheapest-
    # first prefix that passes) or "gallop" (walk the accepted replacements, skipping rejected ones)
    confirmation: Literal["prefix", "gallop"] = "prefix"
    base: str | None = None  # default: the smallest-ε member of each group
    noise_seed: int | None = None  # seeded noise: tests only, marked in every report
    # Pairs of data set ids that share examples (the ledger joins their components: sequential composition).
    overlaps: tuple[tuple[str, str], ...] = ()
    fairness: Literal["flag", "drop", "off"] = "flag"  # see hf_dpdedup.dedup.planner
    # Deprecated keywords (one release): converted into ``strategy`` / ``validation``, not stored (as
    # attributes they only read None, which dataclasses.replace needs: read config.validation instead).
    strategy_options: InitVar[Mapping[str, Any] | None] = None
    svt_epsilon: InitVar[float | None] = None
    svt_cutoff: InitVar[int | None] = None
    naive_epsilon: InitVar[float | None] = None
    floor_epsilon: InitVar[float | None] = None

    def sampler(self) -> LaplaceSampler:
        """A new noise source; call it once per run (two seeded samplers would draw the same noise)."""
        if self.noise_seed is None:
            return LaplaceSampler.secure()
        return LaplaceSampler.seeded_for_tests(self.noise_seed)

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready data, choices tagged by ``kind``; :meth:`from_dict` inverts it."""
        return {"version": CONFIG_VERSION, **encode(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DedupConfig":
        """The config :meth:`to_dict` wrote (unknown fields, kinds or versions are errors)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"A DedupConfig dict is a mapping of its fields, got {type(data).__name__}.")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ConfigError(f"A DedupConfig dict needs an integer 'version' (this hf_dpdedup writes "
                              f"{CONFIG_VERSION}), got {version!r}: was it written by DedupConfig.to_dict?")
        if version > CONFIG_VERSION:
            raise UnsupportedConfigVersionError(
                f"This DedupConfig dict is version {version}; this hf_dpdedup reads up to {CONFIG_VERSION}: "
                "upgrade hf_dpdedup (pip install -U hf_dpdedup).")
        fields = {k: v for k, v in data.items() if k != "version"}
        # written before the paired floor existed: those runs compared exactly (the rule then)
        fields.setdefault("floor_margin_se", 0.0)
        return decode(cls, fields)

    @classmethod
    def from_family(cls, root: str | os.PathLike) -> "DedupConfig":
        """The config a family store was deduplicated with (its ``dedup_config.json``)."""
        data = FamilyStore.open(root).read_config()
        if data is None:
            raise ConfigError(f"The family at {root} has no dedup_config.json: it was not written by "
                              "deduplicate_family (or by a version before configs were stored).")
        return cls.from_dict(data)

    def __post_init__(self, strategy_options: Mapping[str, Any] | None, svt_epsilon: float | None,
                      svt_cutoff: int | None, naive_epsilon: float | None, floor_epsilon: float | None) -> None:
        object.__setattr__(self, "strategy", _legacy_strategy(self.strategy, strategy_options))
        object.__setattr__(self, "validation", _legacy_validation(
            self.validation, {"epsilon": svt_epsilon, "cutoff": svt_cutoff, "floor_epsilon": floor_epsilon},
            {"epsilon_per_query": naive_epsilon, "floor_epsilon": floor_epsilon}))
        if isinstance(self.overlaps, list):
            object.__setattr__(self, "overlaps", tuple(tuple(pair) for pair in self.overlaps))
        if self.interactive is None:
            object.__setattr__(self, "interactive", not self.agreement)
        check_types(self)
        require(self.block_size >= 1, f"DedupConfig.block_size must be ≥ 1 (values per block), got {self.block_size}.")
        require(0 <= self.threshold <= 1, f"DedupConfig.threshold is an allowed utility drop in [0, 1] "
                                          f"(0.015 = 1.5 points), got {self.threshold!r}.")
        require(self.floor_margin_se >= 0,
                f"DedupConfig.floor_margin_se must be ≥ 0 (paired standard errors; 0: the paper's exact floor), "
                f"got {self.floor_margin_se!r}.")
        require(self.drop_bound_se >= 0,
                f"DedupConfig.drop_bound_se must be ≥ 0 (paired standard errors), got {self.drop_bound_se!r}.")
        require(not (self.drop_bound_se and self.confirm_margin_se),
                "DedupConfig: confirm_margin_se widens the confirmation's threshold and drop_bound_se narrows it; "
                "set one of them to 0.")
        require(self.confirm_margin_se >= 0,
                f"DedupConfig.confirm_margin_se must be ≥ 0 (standard errors), got {self.confirm_margin_se!r}.")
        if self.agreement and self.interactive:
            raise ConfigError("agreement validation compares each model with itself, so the interactive floor "
                              "(the previous model's utility) does not apply: use interactive=False (or leave "
                              "interactive unset: it defaults to False under agreement).")


VALIDATIONS: dict[str, type] = choice_kinds(DedupConfig, "validation")
STRATEGIES: dict[str, type] = choice_kinds(DedupConfig, "strategy")


def _deprecated(message: str) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=5)


def _legacy_strategy(strategy: Any, options: Mapping[str, Any] | None) -> Any:
    """``strategy="greedy", strategy_options={"n": 10}`` → ``Greedy(n=10)`` (deprecated)."""
    old = []
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ConfigError(f"Unknown strategy {strategy!r}; use one of {sorted(STRATEGIES)} "
                              "(e.g. DedupConfig(strategy=Greedy(n=10))).")
        old.append(f"strategy={strategy!r}")
        strategy = STRATEGIES[strategy]()
    elif options is None or not isinstance(strategy, _Strategy):
        return strategy  # the type check names what it takes
    if options is not None:
        old.append("strategy_options=...")
    options = dict(options or {})
    _deprecated(f"DedupConfig({', '.join(old)}) is deprecated: pass strategy="
                f"{type(strategy).__name__}({', '.join(f'{k}={v!r}' for k, v in options.items())}).")
    unknown = sorted(set(options) - set(strategy.options()))
    if unknown:
        raise ConfigError(f"Strategy {strategy.kind!r} takes the options {sorted(strategy.options())}, "
                          f"not {unknown}.")
    return replace(strategy, **options)


def _legacy_validation(validation: Any, svt: dict[str, Any], naive: dict[str, Any]) -> Any:
    """``validation="svt", svt_epsilon=.., svt_cutoff=..`` → ``SVT(...)`` (deprecated)."""
    given = {"svt": {k: v for k, v in svt.items() if v is not None},
             "naive": {k: v for k, v in naive.items() if v is not None}}
    if isinstance(validation, str):
        if validation not in VALIDATIONS:
            raise ConfigError(f"Unknown validation {validation!r}; use one of {sorted(VALIDATIONS)} "
                              "(e.g. DedupConfig(validation=SVT(epsilon=1.0, cutoff=3))).")
        _deprecated(f"DedupConfig(validation={validation!r}, ...) is deprecated: pass "
                    f"validation={VALIDATIONS[validation].__name__}(...) with its parameters.")
        validation = VALIDATIONS[validation]()
    elif any(given.values()):
        _deprecated("DedupConfig(svt_epsilon=..., svt_cutoff=..., naive_epsilon=..., floor_epsilon=...) is "
                    "deprecated: give them to the validation, e.g. validation=SVT(epsilon=1.0, cutoff=3).")
    kind = getattr(validation, "kind", None)
    return replace(validation, **given[kind]) if kind in given and given[kind] else validation


__all__ = [
    "CONFIG_VERSION", "DedupConfig", "PlanConfig", "Validation", "Public", "SVT", "NaiveLaplace",
    "Strategy", "Gallop", "Greedy", "Binary", "Halving", "MCTS", "VALIDATIONS", "STRATEGIES",
]
