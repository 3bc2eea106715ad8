"""Remote code of an hf_dpdedup member repo: load it with plain transformers.

    AutoModelForSequenceClassification.from_pretrained("<member repo>", trust_remote_code=True)
    pipeline(model="<member repo>", trust_remote_code=True)

The member's weights are rows of a shared block store repo; ``dedup_constitution.json`` names the
rows of every tensor and pins the store repo's commit sha. With ``hf_dpdedup`` installed this
delegates to ``hf_dpdedup.DedupedModel.from_pretrained``; without it, it downloads the store index
and the shards the member needs at the pinned commit, checks their sha256, and rebuilds the state
dict itself. Either way the result is the ordinary transformers model of ``config.architectures[0]``
with bit-identical weights and ``model.dedup_info`` set. Shipped by ``hf-dpdedup push``.

A member that is a peft adapter on a base (its constitution has an ``adapter`` record) comes back
merged into its base (``merge_and_unload()``: the base's transformers class) when hf_dpdedup is
installed; this file alone cannot rebuild adapters and says so.
"""

import hashlib
import inspect
import json
import math
import os
from types import SimpleNamespace

import torch
import transformers
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

try:  # optional: the same loader as hf_dpdedup.DedupedModel.from_pretrained
    from hf_dpdedup import DedupedModel
except ImportError:
    DedupedModel = None

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "token", "subfolder")
#: the block tensor small extras are packed into (hf_dpdedup.blocks.PACKED_EXTRAS)
PACKED_EXTRAS = "hf_dpdedup:packed_extras"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DedupedMember:
    """The ``auto_map`` target: ``from_pretrained`` returns the rebuilt transformers model."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        cls._auto_class = auto_class if isinstance(auto_class, str) else auto_class.__name__

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if DedupedModel is not None:
            # an adapter member comes back merged (auto classes return transformers models); an hf_dpdedup
            # from before adapters has no merge_adapter (and refuses adapter members by their format)
            if "merge_adapter" in inspect.signature(DedupedModel.from_pretrained).parameters:
                kwargs.setdefault("merge_adapter", True)
            return DedupedModel.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return load_member(str(pretrained_model_name_or_path), **kwargs)


def load_member(path, config=None, dtype=None, torch_dtype=None, device_map=None, **kwargs):
    hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
    subfolder = hub.pop("subfolder", "")
    member_revision = hub.pop("revision", None)

    def member_file(name):
        if os.path.isdir(path):
            return os.path.join(path, subfolder, name)
        return hf_hub_download(path, name, subfolder=subfolder or None, revision=member_revision, **hub)

    with open(member_file("dedup_constitution.json"), encoding="utf-8") as f:
        constitution = json.load(f)
    if constitution.get("adapter"):
        raise OSError(f"{path} is a peft adapter member ({constitution['adapter'].get('peft_class')} on "
                      f"{constitution['adapter'].get('base_model_class')}): `pip install hf_dpdedup` and load it with "
                      "hf_dpdedup.DedupedModel.from_pretrained(path) (a PeftModel) or with merge_adapter=True "
                      "(a transformers model); this remote code alone rebuilds full members only.")
    ref = constitution["block_store"]
    if ref.get("path") is not None and os.path.isdir(path):  # a local family folder
        store = os.path.normpath(os.path.join(path, subfolder, ref["path"]))

        def store_file(name):
            return os.path.join(store, name)
    else:
        if not (ref.get("repo_id") and len(ref.get("revision") or "") == 40):
            raise OSError(f"{path}: the member pins no block store commit; re-push it with `hf-dpdedup push`.")

        def store_file(name):
            return hf_hub_download(ref["repo_id"], name, revision=ref["revision"], **hub)

    with open(store_file("block_store.json"), encoding="utf-8") as f:
        index = json.load(f)
    if index.get("codec", "none") != "none":
        raise OSError(f"The block store of {path} is entropy-coded ({index['codec']}): `pip install hf_dpdedup` "
                      "to load it (this remote code reads uncoded stores on its own).")
    tensors, packed, aliases = entries(constitution)
    state_dict = rebuild(constitution, tensors, index, store_file)
    if packed:  # small tensors packed into rows (formats 3 and 4)
        flat = state_dict.pop(PACKED_EXTRAS)
        for p in packed:
            numel = math.prod(p["shape"])
            state_dict[p["name"]] = flat[p["offset"] : p["offset"] + numel].reshape(p["shape"]).clone()
    extras_path = member_file(constitution["extras"]["file"])
    check_sha256(extras_path, constitution["extras"]["sha256"])
    state_dict.update(load_file(extras_path))
    for alias, canonical in aliases.items():
        state_dict[alias] = state_dict[canonical]

    if config is None:
        config = transformers.AutoConfig.from_pretrained(path, subfolder=subfolder, revision=member_revision, **hub)
    klass = getattr(transformers, (config.architectures or [constitution.get("architecture")])[0])
    dtype = dtype if dtype is not None else torch_dtype
    dtype = DTYPES[constitution["dtype"]] if dtype in (None, "auto") else dtype
    model = klass.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype, device_map=device_map)
    model.eval()
    model.dedup_info = SimpleNamespace(
        name=constitution["name"], member_path=os.path.dirname(member_file("dedup_constitution.json")),
        store_id=ref["store_id"], privacy=constitution.get("privacy"), dedup=constitution.get("dedup"),
        repo_id=None if os.path.isdir(path) else path, store_repo_id=ref.get("repo_id"),
        store_revision=ref.get("revision"), epsilon=(constitution.get("privacy") or {}).get("epsilon"),
        delta=(constitution.get("privacy") or {}).get("delta"),
    )
    return model


def entries(constitution):
    """The block tensors, packed extras and aliases of a constitution with whole names and offsets:
    format 4 writes every name without the names' common ``name_prefix`` (the reserved PACKED_EXTRAS
    never has it) and leaves each packed extra's offset implied (they follow each other from 0)."""
    prefix = constitution.get("name_prefix", "")

    def whole(name):
        return name if name == PACKED_EXTRAS else prefix + name

    tensors = [dict(t, name=whole(t["name"])) for t in constitution["tensors"]]
    packed, offset = [], 0
    for p in constitution.get("packed_extras") or []:
        packed.append(dict(p, name=whole(p["name"]), offset=p.get("offset", offset)))
        offset = packed[-1]["offset"] + math.prod(p["shape"])
    aliases = {whole(a): whole(c) for a, c in (constitution.get("aliases") or {}).items()}
    return tensors, packed, aliases


def rebuild(constitution, tensors, index, store_file):
    """Gather each tensor's rows from the shards that hold them (each shard's sha256 checked)."""
    rows_of = {t["name"]: row_ids(t["rows"]) for t in tensors}
    needed = {r for rows in rows_of.values() for r in rows}
    shards = {}
    for shard in index["shards"]:
        if any(shard["first_row"] <= r < shard["first_row"] + shard["num_rows"] for r in needed):
            path = store_file(shard["file"])
            check_sha256(path, shard["sha256"])
            shards[shard["first_row"]] = load_file(path)["blocks"]
    starts = sorted(shards)
    out = {}
    for entry in tensors:
        rows = torch.tensor(rows_of[entry["name"]], dtype=torch.int64)
        first = torch.tensor(starts)[torch.searchsorted(torch.tensor(starts), rows, right=True) - 1]
        blocks = torch.empty(len(rows), constitution["block_size"], dtype=DTYPES[constitution["dtype"]])
        for start in first.unique().tolist():
            mask = first == start
            blocks[mask] = shards[start][rows[mask] - start]
        out[entry["name"]] = blocks.reshape(-1)[: math.prod(entry["shape"])].reshape(entry["shape"]).clone()
    return out


def row_ids(items):
    """A tensor's row ids: plain ids, and ``[first, count]`` for a run of consecutive ids (formats 3, 4)."""
    out = []
    for item in items:
        if isinstance(item, list):
            out.extend(range(item[0], item[0] + item[1]))
        else:
            out.append(item)
    return out


def check_sha256(path, expected):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise OSError(f"{path} does not match its recorded sha256 (damaged download): load again with "
                      "force_download=True.")
