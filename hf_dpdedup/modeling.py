"""``DedupedModel.from_pretrained``: rebuild a member as an ordinary transformers model.

The member's config names its class (``config.architectures[0]``); the model is built without
weights under Accelerate's ``init_empty_weights`` and the rebuilt tensors are *assigned* (not
copied) into it, then tied weights are tied again (:mod:`hf_dpdedup.skeleton`, which the serving pool
shares). The result is a plain ``PreTrainedModel`` that
works with ``pipeline(...)``, ``generate`` and ``save_pretrained``.

An *adapter member* (a peft ``PeftModel`` stored with ``FamilyStore.add_model`` or deduplicated
from adapter folders) is rebuilt as a ``PeftModel``: its base class from ``config.json`` and the
adapter from its constitution's record are built without weights, and the stored tensors (base and
adapter) are assigned; ``merge_adapter=True`` returns ``merge_and_unload()`` of it, a plain
transformers model.

Members load from a local member folder or from a Hub repo id (``namespace/name``); Hub resolution
(member snapshot, pinned block store commit, only the needed shards) lives in ``hf_dpdedup.hub``.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import dispatch_model, infer_auto_device_map
from transformers import PretrainedConfig, PreTrainedModel

from .adapters import empty_peft_model, match_adapter_dtypes
from .blocks import parse_dtype
from .errors import LoadArgumentError, StoreFormatError
from .hub.download import HubOptions, download_member, fetch_store, is_repo_id
from .privacy.metadata import PrivacyMetadata
from .privacy.noise import SEEDED_LABEL
from .store.constitution import Constitution
from .store.records import DedupRecord
from .store.io import live_dir
from .store.member import load_member_state_dict, open_member_store, read_consistently
from .skeleton import architecture_class, build_model, empty_model, read_config
from .store.format import CONSTITUTION_FILE


@dataclass(frozen=True)
class DedupInfo:
    """What a loaded member is, attached to the model as ``model.dedup_info``."""

    name: str
    member_path: str
    store_id: str
    store_path: str
    privacy: PrivacyMetadata | None  # what the member as shipped costs (after deduplication)
    dedup: DedupRecord | None  # what deduplication did to it (base, ledger, original_privacy, ...)
    repo_id: str | None = None  # the member's Hub repo, when loaded from the Hub
    store_repo_id: str | None = None
    store_revision: str | None = None  # the pinned block store commit
    #: the adapter record (``AdapterRecord.to_dict()``) of an adapter member, else None
    adapter: dict[str, Any] | None = None
    merged: bool = False  # an adapter member returned merged into its base (merge_adapter=True)

    @property
    def base(self) -> str | None:
        """The member whose blocks this one borrows (the deduplication base), if recorded."""
        return None if self.dedup is None else self.dedup.base

    @property
    def store(self) -> str:
        """Where the blocks came from: ``repo@commit`` on the Hub, else the store folder."""
        return f"{self.store_repo_id}@{self.store_revision}" if self.store_repo_id else self.store_path

    @property
    def epsilon(self) -> float | None:
        return None if self.privacy is None else self.privacy.epsilon

    @property
    def delta(self) -> float | None:
        return None if self.privacy is None else self.privacy.delta

    @property
    def seeded(self) -> bool:
        """True when this member's training or deduplication noise came from a known seed: its ε is then
        **not a privacy guarantee** (tests and reproductions only); ``noise`` says so in words."""
        dedup = self.dedup
        original = dedup.original_privacy if dedup is not None else None
        return bool((self.privacy is not None and self.privacy.seeded) or (original is not None and original.seeded)
                    or (dedup is not None and dedup.seeded))

    @property
    def noise(self) -> str:
        """``"secure"``, or the test-only label of a seeded member."""
        return SEEDED_LABEL if self.seeded else "secure"


class DedupedModel:
    """Entry point for loading deduplicated members (like ``AutoModel``, it is never instantiated)."""

    def __init__(self) -> None:  # pragma: no cover - guard
        raise TypeError("Use DedupedModel.from_pretrained(path), which returns a transformers model.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: PretrainedConfig | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        subfolder: str = "",
        endpoint: str | None = None,
        store_dir: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        model_class: type[PreTrainedModel] | None = None,
        verify: bool = True,
        merge_adapter: bool = False,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load a member (local folder or Hub repo) as a transformers model with bit-identical weights.

        The keywords follow ``PreTrainedModel.from_pretrained`` in transformers 5: hub keywords
        (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``,
        ``subfolder``) locate the member; ``config`` replaces its ``config.json``; ``dtype``
        (alias ``torch_dtype``), ``device_map`` and ``attn_implementation`` shape the model; every
        other keyword updates the config (``num_labels=``, ``output_hidden_states=True``, ...), as
        transformers does. Keywords transformers' auto classes and pipelines pass along
        (``trust_remote_code``, ``proxies``, ``code_revision``, ...) are accepted and ignored.

        Args:
            pretrained_model_name_or_path: a member folder (``.../members/<name>``) or the Hub repo id
                of a member (``namespace/name``, as pushed by ``push_family_to_hub``).
            config: a config to use instead of the member's ``config.json``.
            revision: the member repo's branch, tag or commit (default ``main``). The block store is
                always read at the commit sha its constitution pins, never at a branch.
            cache_dir: huggingface_hub cache folder (default ``HF_HUB_CACHE``).
            token: Hub token for private or gated repos (default: the saved login).
            local_files_only: use the cache only (also implied by ``HF_HUB_OFFLINE=1``).
            force_download: download again even if cached (e.g. after a checksum error).
            subfolder: the member folder inside the repo or folder, if not at its root.
            endpoint: Hub URL (default ``HF_ENDPOINT`` or huggingface.co).
            store_dir: the block store folder, if not where the member's constitution says.
            dtype: cast the weights to this dtype after rebuilding (``"auto"`` or ``None``: the stored
                dtype). ``torch_dtype`` is the transformers 4 name of the same argument.
            device_map: ``"auto"``, a device string, or an Accelerate device map dict.
            device: move the model to this device (shorthand for a single-device ``device_map``).
            attn_implementation: ``"eager"``, ``"sdpa"``, ... as in transformers.
            model_class: the class to build; default ``config.architectures[0]``.
            verify: check the sha256 of every file read (on by default; each file version is
                hashed once per process).
            merge_adapter: for an adapter member (a peft adapter on a base), return the base
                model with the adapter merged in (``PeftModel.merge_and_unload()``: a plain
                transformers model) instead of the ``PeftModel``. No effect on other members.

        Returns:
            The transformers model; for an adapter member a ``peft.PeftModel`` (eval mode, adapter
            frozen, as ``PeftModel.from_pretrained`` loads it) unless ``merge_adapter=True``.
            ``model_class`` then names the base class.

        Raises:
            LoadArgumentError: a keyword that is neither a loading option nor a config attribute.

        Example:
            >>> model = DedupedModel.from_pretrained("family/members/eps4")
            >>> model = DedupedModel.from_pretrained("my-org/minilm-sst2-eps4", dtype="bfloat16")
            >>> model.dedup_info.epsilon
            4.0
        """
        if model_args:
            raise LoadArgumentError(
                f"DedupedModel.from_pretrained takes no positional model arguments (got {len(model_args)}); "
                "pass config overrides as keywords (e.g. num_labels=3)."
            )
        dtype = _one_dtype(dtype, torch_dtype)
        for name in _IGNORED_KWARGS:
            kwargs.pop(name, None)
        hub = HubOptions(revision, cache_dir, token, local_files_only, force_download, endpoint)
        member_dir, repo_id = _resolve_member(pretrained_model_name_or_path, hub, subfolder)
        _config(live_dir(member_dir), config, kwargs)  # a misspelt keyword or a bad config.json fails before any download

        def read(folder: Path, constitution: Constitution) -> tuple[PreTrainedModel, Constitution, Any]:
            ref = constitution.block_store
            where = Path(store_dir) if store_dir else None
            if where is None and (repo_id is not None or ref.path is None):
                # A downloaded member never resolves a local path: its blocks come from the pinned
                # store commit only (a path in a Hub constitution could name any local folder).
                where = fetch_store(constitution, hub, verify=verify)
            store = open_member_store(folder, constitution, where)
            # Checking and gathering the weights (GIL-free hashing and copies) runs beside building
            # the empty model (Python): a first load costs about the longer of the two, not the sum.
            with ThreadPoolExecutor(max_workers=1) as pool:
                weights = pool.submit(load_member_state_dict, folder, constitution, store, verify=verify)
                try:
                    member_config = _config(folder, config, kwargs)
                    klass = model_class or architecture_class(member_config, constitution.architecture)
                    skeleton = (empty_model(klass, member_config, parse_dtype(constitution.dtype),
                                            attn_implementation=attn_implementation)
                                if constitution.tensors or constitution.adapter else None)
                    if constitution.adapter is not None:
                        skeleton, added = empty_peft_model(constitution.adapter, skeleton)
                finally:
                    state_dict = weights.result()
            if constitution.adapter is not None:
                match_adapter_dtypes(skeleton, added, state_dict)
            model = build_model(klass, member_config, state_dict, aliases=constitution.aliases,
                                extras=constitution.extras, skeleton=skeleton, attn_implementation=attn_implementation)
            return model, constitution, store

        model, constitution, store = read_consistently(member_dir, read)
        ref = constitution.block_store
        merged = bool(merge_adapter and constitution.adapter is not None)
        if merged:
            model = model.merge_and_unload()
        model = _place(model, torch_dtype=dtype, device_map=device_map, device=device)
        model.dedup_info = DedupInfo(
            name=constitution.name,
            member_path=str(member_dir),
            store_id=store.store_id,
            store_path=str(store.path),
            privacy=constitution.privacy,
            dedup=constitution.dedup,
            repo_id=repo_id,
            store_repo_id=ref.repo_id if ref.path is None or repo_id is not None else None,
            store_revision=ref.revision if ref.path is None or repo_id is not None else None,
            adapter=constitution.adapter.to_dict() if constitution.adapter is not None else None,
            merged=merged,
        )
        return model


# keywords transformers' auto classes and pipelines pass to a remote class's from_pretrained, which
# mean nothing for a member (its code and weights come from this package and its block store)
_IGNORED_KWARGS = (
    "trust_remote_code", "code_revision", "proxies", "adapter_kwargs", "_from_auto", "_from_pipeline",
    "_commit_hash", "use_safetensors", "weights_only", "low_cpu_mem_usage", "tqdm_class",
)


def _one_dtype(dtype: Any, torch_dtype: Any) -> Any:
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise LoadArgumentError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass only dtype=.")
    return dtype if dtype is not None else torch_dtype


def _config(member_dir: Path, config: PretrainedConfig | None, overrides: dict[str, Any]) -> PretrainedConfig:
    """The member's config (or ``config``) with ``overrides`` applied, as transformers applies
    ``from_pretrained(..., num_labels=3)``; a keyword that is no config attribute is refused."""
    if config is None and overrides:
        config, unused = read_config(member_dir, **overrides)
    elif config is None:
        config, unused = read_config(member_dir), {}
    else:
        config = copy.deepcopy(config)
        unused = {}
        for key, value in overrides.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
    if unused:
        raise LoadArgumentError(
            f"DedupedModel.from_pretrained got unexpected keyword arguments {sorted(unused)}: they are neither "
            "loading options nor attributes of the member's config. Check the spelling (see "
            "help(DedupedModel.from_pretrained))."
        )
    return config


def _resolve_member(path_or_id: str | os.PathLike, hub: HubOptions, subfolder: str = "") -> tuple[Path, str | None]:
    """The member folder, and the Hub repo id it was downloaded from (None for a local folder)."""
    path = Path(path_or_id) / subfolder if subfolder else Path(path_or_id)
    if (live_dir(path) / CONSTITUTION_FILE).is_file():
        return path, None
    if not Path(path_or_id).exists() and isinstance(path_or_id, str) and is_repo_id(path_or_id):
        folder = download_member(path_or_id, hub, subfolder=subfolder)
        return (folder / subfolder if subfolder else folder), path_or_id
    if path.is_dir():
        raise StoreFormatError(
            f"{path} has no {CONSTITUTION_FILE}: it is not a deduplicated member folder. "
            "Pass a folder under <family>/members/, or load plain models with transformers."
        )
    raise StoreFormatError(
        f"No member folder at {str(path)!r}. Pass the path of a member folder "
        "(e.g. family/members/eps4) or a member's Hub repo id (namespace/name)."
    )


def _place(
    model: PreTrainedModel,
    *,
    torch_dtype: torch.dtype | str | None,
    device_map: str | dict[str, Any] | None,
    device: str | torch.device | None,
) -> PreTrainedModel:
    if torch_dtype is not None and torch_dtype != "auto":
        dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        model = model.to(dtype)
    if device is not None and device_map is not None:
        raise ValueError("Pass either device= or device_map=, not both.")
    if isinstance(device_map, dict) or device_map == "auto":
        if device_map == "auto":
            device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules or [])
        if set(device_map.values()) <= {"cpu"}:
            return model
        return dispatch_model(model, device_map=device_map)
    target = device if device is not None else device_map
    return model.to(target) if target is not None else model
