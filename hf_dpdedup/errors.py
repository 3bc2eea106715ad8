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


class UnknownCodecError(UnsupportedFormatVersionError):
    """A block store coded with a codec this version of hf_dpdedup cannot decode."""


class ChecksumMismatchError(StoreFormatError):
    """A file whose bytes do not match the sha256 recorded for it (truncated, corrupted, tampered)."""


class ConstitutionError(StoreFormatError):
    """A ``dedup_constitution.json`` that names rows, tensors or shapes the store cannot provide."""


class StoreMismatchError(StoreFormatError):
    """A member that points at another block store than the one it is being loaded from."""


class AdapterError(StoreFormatError):
    """A peft adapter folder or record that cannot be used (no adapter_config.json, an unknown task
    type, a base model that cannot be found)."""


class AdapterNotSupportedError(HfDpDedupError, TypeError):
    """A peft adapter (``PeftModel`` or adapter member) handed to a path that takes full models only;
    the message names the path that takes it (e.g. ``DedupedModel.from_pretrained(..., merge_adapter=True)``)."""


class MemberChangedError(HfDpDedupError, OSError):
    """A member that another process kept replacing while it was read: retryable, load it again."""


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


# --- dedup engine ----------------------------------------------------------------------------------
class ConfigError(HfDpDedupError, ValueError):
    """A ``DedupConfig`` / ``PlanConfig`` field with a wrong type or value, an unknown kind of
    validation or strategy, contradicting options, or a config dict / ``dedup_config.json`` that
    cannot be read; the message names the field and the values it takes."""


class UnsupportedConfigVersionError(ConfigError):
    """A serialised config written by a newer hf_dpdedup (a ``version`` this one does not know)."""


class SaliencyError(HfDpDedupError, ValueError):
    """A saliency request that cannot be computed (unknown measure, no loss, NaN gradients, ...)."""


class CalibrationRequiredError(SaliencyError):
    """A data-driven saliency measure was asked for without public calibration batches."""


class SimilarityError(HfDpDedupError, ValueError):
    """A nearest-block request that cannot be answered (bad shapes, metric, k larger than the pool)."""


# --- training --------------------------------------------------------------------------------------
class TrainingConfigError(HfDpDedupError, ValueError):
    """A training request that cannot run (bad ε/δ, empty or unlabeled data, unsuitable base model)."""


# --- data ------------------------------------------------------------------------------------------
class DataSourceError(TrainingConfigError):
    """A data source (file, folder, ``save_to_disk`` folder, Hub data set) that cannot be read as asked."""


class DataSplitError(DataSourceError):
    """A split the source does not have, or none named where it has several; names the splits it has."""


class DataColumnError(DataSourceError):
    """A text, label or image column the data lacks, or labels that are not class ids; names its columns."""


# --- hub -------------------------------------------------------------------------------------------
class HubError(HfDpDedupError, OSError):
    """A Hugging Face Hub operation (load or push) that failed; the message says what to do next."""


class HubRepoNotFoundError(HubError):
    """A repo id the Hub does not know, or a private repo the token cannot see."""


class HubFileNotFoundError(HubError, StoreFormatError):
    """A repo that lacks a file a member needs (e.g. no ``dedup_constitution.json``: not a member)."""


class PinnedRevisionError(HubError, ConstitutionError):
    """A constitution whose block store revision is a moving branch, or a commit the store repo lacks."""


class HubOfflineError(HubError):
    """Offline mode (``HF_HUB_OFFLINE=1`` / ``local_files_only=True``) and the files are not cached."""


class HubDownloadError(HubError):
    """A download that failed midway (network, server error); nothing partial is kept in the cache."""


class HubChecksumError(HubError, ChecksumMismatchError):
    """A downloaded file whose sha256 differs from the one the block store index records."""


class HubAuthError(HubError):
    """A missing token, or a token without the read / write access the operation needs."""


class PushError(HubError):
    """A push that failed midway; every repo still holds its previous (loadable) commit: re-run it."""


class RepoNameError(HubError, ValueError):
    """A repo id the Hub would refuse (``huggingface_hub.utils.validate_repo_id``)."""


class RepoCollisionError(PushError):
    """A push that would repoint an existing repo at another block store (pass ``force=True``)."""


class LoadArgumentError(HfDpDedupError, TypeError):
    """A ``from_pretrained`` / ``pipeline`` keyword that neither hf_dpdedup nor transformers knows."""
class SeededPushError(HubError, PrivacyError):
    """A member whose noise came from a known seed (not private) was about to be published."""


# --- serving ---------------------------------------------------------------------------------------
class ServingError(HfDpDedupError):
    """A serving pool request that cannot be answered."""


class UnknownMemberError(ServingError, LookupError):
    """A member id the pool does not serve (not in the family, or not in the pool's ``members=``)."""


class ServingBudgetError(ServingError, ValueError):
    """A memory budget too small for the family's shared blocks plus the largest member's own tensors."""


class ServingTimeoutError(ServingError, TimeoutError):
    """Memory for a member did not free up in time: every resident member stayed busy."""


class ServingRequestError(ServingError, ValueError):
    """A malformed inference request (e.g. an HTTP body without ``inputs`` or ``text``)."""


# --- distributed -----------------------------------------------------------------------------------
class DistributedDedupError(HfDpDedupError, RuntimeError):
    """A multi-process deduplication that cannot run or was aborted; no store was written."""


class PeerFailureError(DistributedDedupError):
    """Another process died or stopped answering (killed, crashed, timed out) during a distributed run."""


class DivergedProcessesError(DistributedDedupError):
    """Processes that must compute the same thing (plan, decisions) computed different things."""


# --- warnings -------------------------------------------------------------------------------------
class UnderpoweredValidationWarning(UserWarning):
    """The public validation data measures a target's drop only to a standard error above the
    threshold: the accepted replacements may cost more on new data than the search saw."""
