"""Typed errors of hf_dpdedup.

Every error says what is wrong *and* what to do next. All of them derive from
:class:`HfDpDedupError`, so ``except HfDpDedupError`` catches everything this package raises on
purpose. Modules add their own subclasses here so that one import shows the whole vocabulary.
"""

from __future__ import annotations


class HfDpDedupError(Exception):
    """Base class of every error raised on purpose by hf_dpdedup."""


# --- layout and store -----------------------------------------------------------------------------
class BlockLayoutError(HfDpDedupError, ValueError):
    """A block size, a tensor layout or a dtype mix that cannot be cut into blocks or rebuilt."""


class DtypeMismatchError(BlockLayoutError):
    """Tensors of one family do not share the family's block dtype."""


class StoreFormatError(HfDpDedupError, ValueError):
    """A store or member folder whose files do not follow the ``hf_dpdedup/1`` format."""


class UnsupportedFormatVersionError(StoreFormatError):
    """A ``format`` field this version of hf_dpdedup does not know."""


class ChecksumMismatchError(StoreFormatError):
    """A file whose bytes do not match the sha256 recorded for it (truncated, corrupted, tampered)."""


class ConstitutionError(StoreFormatError):
    """A ``dedup_constitution.json`` that names rows, tensors or shapes the store cannot provide."""


class StoreMismatchError(StoreFormatError):
    """A member that points at another block store than the one it is being loaded from."""


# --- privacy ---------------------------------------------------------------------------------------
class PrivacyError(HfDpDedupError):
    """A request that would break a privacy rule (an uncharged access, an invalid budget, ...)."""


class PrivacyBudgetError(PrivacyError, ValueError):
    """ε, δ or a mechanism parameter outside its valid range."""


class PrivateDataAccessError(PrivacyError):
    """An attempt to read private data outside a charged mechanism, or after its budget is spent."""


class PrivacyAccountingError(PrivacyError, ValueError):
    """Charges the ledger cannot compose: malformed, or two different charges under one source id."""


class SVTHaltedError(PrivateDataAccessError):
    """A query to a Sparse Vector session that has already given its c "too big a drop" answers."""


# --- training --------------------------------------------------------------------------------------
class TrainingConfigError(HfDpDedupError, ValueError):
    """A training request that cannot run (bad ε/δ, empty or unlabeled data, unsuitable base model)."""
