"""The private-data firewall: a data set that can only be read by charged DP mechanisms.

:class:`PrivateDataset` has no method that returns an example, a score or an accuracy. The only
readers are the mechanisms of this package (:class:`~hf_dpdedup.privacy.svt.SVTSession`,
:class:`~hf_dpdedup.privacy.laplace.NaiveLaplaceValidator`, :func:`~hf_dpdedup.privacy.laplace.release_utility`):
each first commits its :class:`Charge` to the data set, receives a grant, and only then may pass
over the data. Any other attempt (``evaluate``, iteration, indexing, pickling, a read with a
missing or revoked grant) raises :class:`PrivateDataAccessError` and increments
:attr:`PrivateDataset.raw_accesses`; tests of the whole pipeline assert that it stays 0.

Trust boundary: Python cannot hide memory. The examples live in a module-level vault rather than
on the instance, so no attribute of the package's objects exposes them, but code that imports
private names can still reach them. The guarantee is "no code path of this package reads private
data without charging it", not protection against hostile code in the same process.

Agreement: a mechanism opened with ``predict_fn(model, batch)`` (one prediction per example)
instead of a score keeps the reference model's predictions in the vault when it opens, and scores a
candidate 1 where it predicts the same; the reference may be edited in place afterwards.

Scores: ``score_fn(model, batch)`` returns one score per example. Inside the mechanism the scores
are made safe — NaN → 0, clipped to [0, 1] — and quantised to integers ``floor(s · SCORE_GRID)``,
so every private sum is an exact integer with known sensitivity and the noise can be exact.

Neighbouring relation: **add or remove one example** (the relation of Opacus' DP-SGD accounting, so
validation and training charges compose). The true size |D| is therefore private: every mechanism
normalises its sums by ``public_size``, a number the caller fixes before looking at the data (the
planned size of the split), never by |D|, so neither a released value nor its grid reveals |D|.
Utilities inside the mechanisms are ``Σ scores / public_size`` (they may exceed 1 when |D| is larger;
releases are clamped to [0, 1]); ``len(D)`` is the operator's own figure and is published nowhere.

Distribution: inside :func:`collective_scope`, a mechanism's pass over the data
(:func:`quantized_total`) scores only this process' contiguous shard of batches and sums the
integer partial sums across processes; noise and decisions come from the main process only
(:meth:`Collective.from_main`). Without a scope the single-process :data:`SINGLE_PROCESS` is used.
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any, Iterator, NoReturn, TypeVar

import numpy as np

from ..collective import Collective, current_collective, shard_range
from ..errors import PrivacyAccountingError, PrivacyBudgetError, PrivacyError, PrivateDataAccessError
from ._checks import check_epsilon
from .charge import Charge, sum_rounded_up

SCORE_GRID = 2**16  # per-example scores become integers in [0, SCORE_GRID]

ScoreFn = Callable[[Any, Any], Any]
PredictFn = Callable[[Any, Any], Any]  # (model, batch) -> one prediction per example (agreement validation)
T = TypeVar("T")


# --- distribution seam: the team a mechanism runs on (hf_dpdedup.collective) -----------------------
class NoisedValue(float):
    """A float released by a noise mechanism (the only non-boolean a mechanism may send to other processes)."""

    __slots__ = ()


def release_from_main(collective: Collective, compute: Callable[[], T]) -> T:
    """``collective.from_main(compute)`` for outputs of private evaluation, checked at run time on both
    sides: only a boolean decision or a :class:`NoisedValue` may cross processes (the static guard
    matches names only; this catches an unnoised sum or score passed by mistake)."""

    def checked() -> T:
        return _check_release(compute())

    return _check_release(collective.from_main(checked))


def _check_release(value: T) -> T:
    if type(value) is bool or isinstance(value, NoisedValue):
        return value
    raise PrivacyError(
        f"A private mechanism tried to send a {type(value).__name__} to the other processes; only a boolean "
        "decision or a NoisedValue (the output of a noise mechanism) may leave the main process."
    )


class _Grant:
    """Capability handed to one charged mechanism; revoked when the mechanism is done."""

    __slots__ = ("charge", "revoked")

    def __init__(self, charge: Charge) -> None:
        self.charge = charge
        self.revoked = False


class _Vault:
    __slots__ = ("examples", "grants", "held", "predictions")

    def __init__(self, examples: Any) -> None:
        self.examples = examples
        self.grants: set[_Grant] = set()
        # Exact private figures a mechanism keeps between queries (its reference sum), by mechanism:
        # never an attribute of the mechanism, wiped when it closes (or is garbage-collected).
        self.held: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
        # An agreement mechanism's reference predictions, by mechanism and then by batch start (this
        # process' shard only): kept here for the same reasons, wiped with the reference sum.
        self.predictions: "weakref.WeakKeyDictionary[Any, dict[int, Any]]" = weakref.WeakKeyDictionary()


_VAULT: "weakref.WeakKeyDictionary[PrivateDataset, _Vault]" = weakref.WeakKeyDictionary()


class PrivateDataset:
    """Private validation data, reachable only through charged DP mechanisms.

    ``examples`` is either a sequence of examples (batches are lists passed through ``collate``)
    or a mapping of equal-length arrays/tensors (batches are dicts of row slices).
    ``epsilon_budget`` optionally caps the total ε that mechanisms may charge to this data set.
    ``public_size`` is the normaliser every mechanism divides by (see the module docstring): fix it in
    advance, from the plan of the split, not from the data.

    >>> ds = PrivateDataset([0, 1, 1], dataset_id="toy-val", public_size=3)
    >>> ds.public_size, ds.raw_accesses
    (3, 0)
    """

    __slots__ = ("_dataset_id", "_size", "_public_size", "_batch_size", "_collate", "_budget", "_charges",
                 "_raw_accesses", "_charged_reads", "__weakref__")

    def __init__(
        self,
        examples: Any,
        *,
        dataset_id: str,
        public_size: int,
        batch_size: int = 64,
        collate: Callable[[list[Any]], Any] | None = None,
        epsilon_budget: float | None = None,
    ) -> None:
        if not isinstance(dataset_id, str) or not dataset_id:
            raise PrivacyBudgetError(f"dataset_id must be a non-empty string, got {dataset_id!r}.")
        size = _size_of(examples)
        if size == 0:
            raise PrivacyBudgetError(
                f"Private data set {dataset_id!r} is empty; SVT's sensitivity 2/|D| needs |D| ≥ 1 "
                "(and a useful one needs thousands of examples)."
            )
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise PrivacyBudgetError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(public_size, bool) or not isinstance(public_size, int) or public_size < 1:
            raise PrivacyBudgetError(
                f"public_size must be a positive integer fixed before looking at the data (e.g. the planned "
                f"size of the validation split), got {public_size!r}; the true size is private."
            )
        self._dataset_id = dataset_id
        self._size = size
        self._public_size = public_size
        self._batch_size = batch_size
        self._collate = collate
        self._budget = None if epsilon_budget is None else check_epsilon(epsilon_budget, name="epsilon_budget")
        self._charges: list[Charge] = []
        self._raw_accesses = 0
        self._charged_reads = 0
        _VAULT[self] = _Vault(examples)

    # --- public, non-private facts ------------------------------------------------------------
    @property
    def dataset_id(self) -> str:
        return self._dataset_id

    def __len__(self) -> int:
        """The true size |D|: the operator's own figure (private under add/remove; never published)."""
        return self._size

    @property
    def public_size(self) -> int:
        """The public normaliser n of every mechanism on this data set (fixed in advance)."""
        return self._public_size

    @property
    def charges(self) -> tuple[Charge, ...]:
        """Every charge committed to this data set so far, in order."""
        return tuple(self._charges)

    @property
    def epsilon_spent(self) -> float:
        """Σ ε of the charges so far (the loose figure; the ledger may compose tighter)."""
        return sum_rounded_up(c.epsilon for c in self._charges)

    @property
    def epsilon_budget(self) -> float | None:
        return self._budget

    @property
    def raw_accesses(self) -> int:
        """Attempts to read the data outside a charged mechanism (all refused). Must stay 0."""
        return self._raw_accesses

    @property
    def open_mechanisms(self) -> int:
        """Mechanisms still holding an exact private figure (not closed yet). 0 after a finished run."""
        return len(_VAULT[self].held)

    @property
    def charged_reads(self) -> int:
        """Passes over the data made by charged mechanisms."""
        return self._charged_reads

    def __repr__(self) -> str:
        return (f"PrivateDataset(dataset_id={self._dataset_id!r}, public_size={self._public_size}, "
                f"epsilon_spent={self.epsilon_spent})")

    # --- everything that would leak is refused ----------------------------------------------------
    def evaluate(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Always refused: use ``SVTSession`` (decisions) or ``release_utility`` (a noisy, charged figure)."""
        self._refuse("evaluate()")

    def __iter__(self) -> Iterator[Any]:
        self._refuse("iteration")

    def __getitem__(self, index: Any) -> Any:
        self._refuse("indexing")

    def __reduce_ex__(self, protocol: Any) -> Any:
        self._refuse("pickling")

    def __copy__(self) -> Any:
        self._refuse("copying")

    def __deepcopy__(self, memo: Any) -> Any:
        self._refuse("copying")

    def _refuse(self, what: str) -> NoReturn:
        self._raw_accesses += 1
        raise PrivateDataAccessError(
            f"{what} of private data set {self._dataset_id!r} is not allowed: private data is readable "
            "only through charged mechanisms. Use SVTSession for accept/revert decisions, "
            "release_utility for a noisy utility figure, or evaluate on a public data set."
        )


# --- the mechanisms' side of the firewall (package-internal) -------------------------------------
def mechanism_id(kind: str, dataset: PrivateDataset, label: str | None) -> str:
    """``label``, or a fresh random id: ids must never repeat, or the ledger would count two mechanisms once."""
    return label if label is not None else f"{kind}:{dataset.dataset_id}:{secrets.token_hex(6)}"


def open_grant(dataset: PrivateDataset, charge: Charge) -> _Grant:
    """Commit ``charge`` to ``dataset`` (within its budget) and return the grant to read it."""
    if dataset.dataset_id not in charge.datasets:
        raise PrivacyError(f"Charge {charge.source_id!r} does not name data set {dataset.dataset_id!r}.")
    if any(c.source_id == charge.source_id for c in dataset._charges):
        raise PrivacyAccountingError(
            f"A mechanism with id {charge.source_id!r} was already charged to {dataset.dataset_id!r}; the "
            "ledger would count both as one. Give each mechanism a unique label (or none: ids are then random)."
        )
    if dataset._budget is not None:
        total = sum_rounded_up([dataset.epsilon_spent, charge.epsilon])
        if total > dataset._budget:
            raise PrivacyBudgetError(
                f"Charging ε = {charge.epsilon} to {dataset.dataset_id!r} would spend {total} of its "
                f"budget {dataset._budget}; lower the mechanism's ε or raise epsilon_budget."
            )
    grant = _Grant(charge)
    dataset._charges.append(charge)
    _VAULT[dataset].grants.add(grant)
    return grant


def revoke_grant(dataset: PrivateDataset, grant: _Grant) -> None:
    grant.revoked = True
    _VAULT[dataset].grants.discard(grant)


def hold_private(dataset: PrivateDataset, mechanism: Any, value: int) -> None:
    """Keep an exact private figure of ``mechanism`` (e.g. its reference sum) inside the firewall."""
    _VAULT[dataset].held[mechanism] = int(value)


def held_private(dataset: PrivateDataset, mechanism: Any) -> int:
    """The figure ``mechanism`` holds; refused once it was wiped (the mechanism is closed)."""
    try:
        return _VAULT[dataset].held[mechanism]
    except KeyError:
        raise PrivacyError(
            f"The mechanism on {dataset.dataset_id!r} is closed: its private reference was wiped. "
            "Open a new (charged) mechanism to ask further queries."
        ) from None


def wipe_private(dataset: PrivateDataset, mechanism: Any) -> None:
    _VAULT[dataset].held.pop(mechanism, None)
    _VAULT[dataset].predictions.pop(mechanism, None)


def holds_private(dataset: PrivateDataset, mechanism: Any) -> bool:
    """Whether the vault still keeps anything of ``mechanism`` (a reference sum or predictions)."""
    vault = _VAULT[dataset]
    return mechanism in vault.held or mechanism in vault.predictions


def quantized_scores(dataset: PrivateDataset, grant: _Grant | None, model: Any, score_fn: ScoreFn) -> np.ndarray:
    """Per-example scores of ``model`` on the data, as integers in [0, SCORE_GRID]. Grant required."""
    n_batches = -(-dataset._size // dataset._batch_size)
    return _scores(dataset, grant, model, _per_batch(score_fn), range(n_batches))


def quantized_total(dataset: PrivateDataset, grant: _Grant | None, model: Any, score_fn: ScoreFn) -> int:
    """Σ of the quantised scores over the whole data set, computed across the current collective.

    Each process scores its contiguous shard of batches (batches are cut exactly as in one
    process, so every score is computed on the same batch) and the integer partial sums are added.
    """
    return _total(dataset, grant, model, _per_batch(score_fn))


def hold_predictions(dataset: PrivateDataset, grant: _Grant | None, mechanism: Any, reference: Any,
                     predict_fn: PredictFn) -> int:
    """Keep ``reference``'s per-example predictions (this process' shard) in the vault for
    ``mechanism``'s agreement queries (:func:`agreement_total`), and return the reference's own
    agreement total (every example agrees with itself: ``SCORE_GRID`` each, over the collective).

    The reference may then be edited in place: agreement needs no frozen copy of the model (one
    model's memory at LLM scale) and no second forward pass per query."""
    held: dict[int, Any] = {}

    def record(model: Any, start: int, batch: Any) -> Any:
        held[start] = _as_predictions(predict_fn(model, batch))
        return np.ones(held[start].shape[0])

    total = _total(dataset, grant, reference, record)
    _VAULT[dataset].predictions[mechanism] = held
    return total


def agreement_total(dataset: PrivateDataset, grant: _Grant | None, mechanism: Any, model: Any,
                    predict_fn: PredictFn) -> int:
    """Σ over the data of 1 where ``model`` predicts what ``mechanism``'s held reference predicted,
    quantised like any score (a mean of per-example scores in [0, 1]: sensitivity as for utility)."""
    try:
        held = _VAULT[dataset].predictions[mechanism]
    except KeyError:
        raise PrivacyError(
            f"The mechanism on {dataset.dataset_id!r} holds no reference predictions (it is closed, or it "
            "was opened without a predict_fn). Open a new (charged) mechanism to ask further queries."
        ) from None

    def agree(candidate: Any, start: int, batch: Any) -> Any:
        same = _as_predictions(predict_fn(candidate, batch)) == held[start]
        return same.all(axis=1).astype(np.float64)  # an example agrees when all its predictions do

    return _total(dataset, grant, model, agree)


def _as_predictions(values: Any) -> np.ndarray:
    """One row per example (a label, or a sequence of them), owned by the vault (a copy)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    return values.reshape(values.shape[0] if values.ndim else 1, -1).copy()


def _per_batch(score_fn: ScoreFn) -> Callable[[Any, int, Any], Any]:
    return lambda model, start, batch: score_fn(model, batch)


def _total(dataset: PrivateDataset, grant: _Grant | None, model: Any, score: Callable[[Any, int, Any], Any]) -> int:
    collective = current_collective()
    n_batches = -(-dataset._size // dataset._batch_size)
    local = int(_scores(dataset, grant, model, score, shard_range(n_batches, collective.rank, collective.size)).sum())
    return int(collective.sum([local])[0])


def _scores(dataset: PrivateDataset, grant: _Grant | None, model: Any, score: Callable[[Any, int, Any], Any],
            batches: range) -> np.ndarray:
    vault = _VAULT[dataset]
    if grant is None or grant.revoked or grant not in vault.grants:
        dataset._refuse("a read without a valid grant")
    dataset._charged_reads += 1
    size, batch_size = dataset._size, dataset._batch_size
    first = batches.start * batch_size
    out = np.empty(max(0, min(batches.stop * batch_size, size) - first), dtype=np.int64)
    failure = None
    try:
        with _inference(model):
            for start, batch in _batches(vault.examples, size, batch_size, dataset._collate, batches):
                stop = min(start + batch_size, size)
                out[start - first : stop - first] = _quantize(score(model, start, batch), stop - start)
    except PrivacyError:
        raise
    except Exception as exc:  # noqa: BLE001 - the message may quote private data: keep only the type
        failure = type(exc).__name__
    if failure is not None:  # raised outside the handler, so the original is not even the __context__
        raise PrivacyError(
            f"{failure} raised while scoring inside a private mechanism (collate or score_fn); the message "
            "is withheld because it may contain private data. Debug score_fn on public data."
        )
    return out


def _quantize(scores: Any, expected: int) -> np.ndarray:
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().numpy()
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.shape[0] != expected:
        raise PrivacyError(f"score_fn must return one score per example ({expected}), got {values.shape[0]}.")
    # NaN → 0 and clipping enforce the [0, 1] range the sensitivity proof assumes.
    values = np.clip(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.floor(values * SCORE_GRID).astype(np.int64)


def _batches(examples: Any, size: int, batch_size: int, collate: Callable[[list[Any]], Any] | None,
             batches: range):
    for start in (b * batch_size for b in batches):
        stop = min(start + batch_size, size)
        if isinstance(examples, Mapping):
            yield start, {k: v[start:stop] for k, v in examples.items()}
        else:
            rows = [examples[i] for i in range(start, stop)]
            yield start, collate(rows) if collate is not None else rows


@contextmanager
def _inference(model: Any):
    """No gradients (they would store private information in ``.grad``) and eval mode (no BN updates)."""
    import torch

    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _size_of(examples: Any) -> int:
    if isinstance(examples, Mapping):
        if not examples:
            return 0
        sizes = {len(v) for v in examples.values()}
        if len(sizes) != 1:
            raise PrivacyBudgetError(f"All columns of a private data set must have one length, got {sorted(sizes)}.")
        return sizes.pop()
    try:
        return len(examples)
    except TypeError:
        raise PrivacyBudgetError("Private examples must be a sequence or a mapping of columns (with len()).") from None
