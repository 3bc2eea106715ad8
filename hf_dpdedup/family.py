"""A deduplicated family as one object, with the verbs of peft and huggingface_hub.

::

    from hf_dpdedup import DedupConfig, DedupData, DedupedFamily, Member, PrivacyMetadata

    family = DedupedFamily.deduplicate(members, data, DedupConfig(threshold=0.015))  # computes
    family.save_pretrained("family")                     # block store + one folder per member
    family.push_to_hub("my-org", family_name="minilm-sst2")
    family = DedupedFamily.from_pretrained("family")     # or "my-org/minilm-sst2" from the Hub
    model = family.model("eps4")                         # = DedupedModel.from_pretrained(member)

:meth:`DedupedFamily.deduplicate` runs the family loop (:func:`~hf_dpdedup.dedup.planner.search_family`)
and keeps what it decided — every member's report, ledger and kept replacements — in memory; a lazy
member (:meth:`Member.from_folder`) is let go once searched and rebuilt from its decisions when
saved. :meth:`save_pretrained` writes the family folder (staged, renamed when complete) and its
report; :meth:`push_to_hub` publishes it (a block-store repo plus one repo per member, whose store
repo lists the members); :meth:`from_pretrained` opens a family folder or the Hub repos, and
:meth:`model` loads one member (only the shards it needs) as :class:`~hf_dpdedup.DedupedModel` does.
:func:`~hf_dpdedup.dedup.storing.deduplicate_family` is the one-pass form (each member stored as
soon as it is searched).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download

from .dedup.planner import DedupConfig, DedupData, Member, Outcome, search_family
from .dedup.storing import new_family_report, save_outcomes
from .dedup.report import FamilyReport
from .errors import StoreFormatError
from .hub.download import hub_errors, is_repo_id
from .hub.push import FAMILY_INDEX_FILE, PushResult, push_family_to_hub, store_repo_id
from .modeling import DedupedModel
from .store.family import FamilyStore

REPORT_DIR = "report"


@dataclass
class DedupedFamily:
    """A family of DP fine-tuned models deduplicated into shared blocks (see the module docstring).

    ``members`` maps each member's name to where it loads from (a member folder, or a Hub repo id);
    it is empty until the family is saved or opened. ``report`` is the family report (its byte
    figures are filled in once the family is saved).
    """

    config: DedupConfig | None
    report: FamilyReport | dict[str, Any] | None
    members: dict[str, str] = field(default_factory=dict)
    store: FamilyStore | None = None
    hub: dict[str, Any] = field(default_factory=dict)  # token / endpoint / revision a Hub family was opened with
    _outcomes: list[Outcome] = field(default_factory=list, repr=False)

    # --- computing ---------------------------------------------------------------------------------
    @classmethod
    def deduplicate(cls, members: list[Member], data: DedupData, config: DedupConfig | None = None) -> "DedupedFamily":
        """Deduplicate ``members`` (same private data, several ε) on ``data``; nothing is written.

        Lazy members are loaded one at a time and let go once searched (at most the base and the
        model under validation in memory); members given as models keep their edited models.
        """
        config = config if config is not None else DedupConfig()
        outcomes = []
        for outcome in search_family(members, data, config):
            outcome.release()  # a lazy member's model goes; its decisions stay
            outcomes.append(outcome)
        report = new_family_report(config, [o.report for o in outcomes])
        return cls(config=config, report=report, _outcomes=outcomes)

    # --- writing -----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the family folder: ``block_store/``, ``members/<name>/`` and ``report/``.

        ``save_directory`` must be new or empty (the folder is built aside and renamed when complete).
        """
        if not self._outcomes:
            raise StoreFormatError(
                "This family was opened, not computed: it is already saved at "
                f"{self.store.root if self.store is not None else 'the Hub'}; copy that folder instead."
            )
        save_directory = Path(save_directory)
        self.report = save_outcomes(self._outcomes, save_directory, self.config)
        self.report.save(save_directory / REPORT_DIR)
        self.store = FamilyStore.open(save_directory)
        self.members = {name: str(self.store.member_path(name)) for name in self.store.members()}

    def push_to_hub(self, namespace: str, *, family_name: str | None = None, **kwargs: Any) -> PushResult:
        """Publish the family: ``<namespace>/<family_name>-blocks`` plus ``<namespace>/<family_name>-<member>``
        (see :func:`~hf_dpdedup.hub.push_family_to_hub` for ``kwargs``: ``token``, ``endpoint``,
        ``private``, ``base_model``, ``license``, ``allow_seeded``, ...). An unsaved family is saved
        to a temporary folder first (then ``family_name`` is required)."""
        if self.store is not None:
            return push_family_to_hub(self.store, namespace, family_name=family_name, **kwargs)
        if family_name is None:
            raise StoreFormatError("An unsaved family has no folder name to publish under: pass family_name=..., "
                                   "or save_pretrained(folder) first.")
        with tempfile.TemporaryDirectory(prefix="hf_dpdedup-push-") as tmp:
            outcomes, config = self._outcomes, self.config
            unsaved = DedupedFamily(config, self.report, _outcomes=outcomes)
            unsaved.save_pretrained(Path(tmp) / family_name)
            self.report = unsaved.report
            return push_family_to_hub(unsaved.store, namespace, family_name=family_name, **kwargs)

    # --- reading -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None, endpoint: str | None = None) -> "DedupedFamily":
        """Open a family folder, or a family on the Hub by ``<namespace>/<family_name>`` (or its
        ``...-blocks`` store repo id): only the store repo's member list is downloaded here; each
        member's files and shards come when :meth:`model` loads it."""
        path = Path(path_or_repo_id)
        if FamilyStore.is_family(path):
            store = FamilyStore.open(path)
            report_file = path / REPORT_DIR / "dedup_report.json"
            report = json.loads(report_file.read_text()) if report_file.is_file() else None
            members = {name: str(store.member_path(name)) for name in store.members()}
            return cls(config=None, report=report, members=members, store=store)
        repo_id = str(path_or_repo_id)
        if path.exists() or not is_repo_id(repo_id):
            raise StoreFormatError(
                f"{path_or_repo_id} is neither a family folder (block_store/ + members/) nor a Hub id "
                "<namespace>/<family_name>; pass the folder save_pretrained wrote or the name push_to_hub used."
            )
        store_repo = repo_id if repo_id.endswith("-blocks") else store_repo_id(*repo_id.split("/", 1))
        with hub_errors("opening the family", store_repo, pinned=revision):
            index = hf_hub_download(store_repo, FAMILY_INDEX_FILE, revision=revision, token=token, endpoint=endpoint)
        listed = json.loads(Path(index).read_text())
        hub = {k: v for k, v in (("token", token), ("endpoint", endpoint)) if v is not None}
        return cls(config=None, report=None, members=dict(listed["members"]), hub=hub)

    def model(self, name: str, **kwargs: Any) -> Any:
        """Member ``name`` as a transformers model (``kwargs`` as for :meth:`DedupedModel.from_pretrained`)."""
        if name not in self.members:
            raise KeyError(f"No member {name!r} in this family; its members are {sorted(self.members)}. "
                           "(A computed family has members once saved.)")
        return DedupedModel.from_pretrained(self.members[name], **{**self.hub, **kwargs})
