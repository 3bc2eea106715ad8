"""Hub benchmark: load time from a warm cache, and bytes downloaded for a family vs. plain repos.

    python benchmarks/hub_benchmark.py [--repeats 7]

Everything goes through huggingface_hub against the local Hub-compatible server (127.0.0.1), so it
runs offline. transformers has no ``endpoint=`` argument, so ``HF_ENDPOINT`` is set to the server's
address *before* huggingface_hub is imported (it reads it once, at import), and ``HF_HUB_DISABLE_XET=1``
so that large files are uploaded through git LFS, which the server implements.

Figures (``benchmarks/results/hub.json``):
- ``dedup_warm_load_s`` / ``hf_warm_load_s``: median time to load one member with
  ``DedupedModel.from_pretrained(repo_id)`` vs. ``AutoModelForSequenceClassification.from_pretrained``
  of the same model pushed as a plain repo, both from a warm cache (online: the branch is resolved),
  for ``eps4`` (scattered rows) and, under ``*_contiguous*`` keys, ``eps1`` (contiguous), and the
  ``_offline`` variants (``local_files_only=True``: no request at all); ``*_ratio``: the median of
  per-pair ratios dedup / hf, each pair timed back to back.
  ``remote_code_warm_load_s``: the member loaded with plain transformers,
  ``AutoModelForSequenceClassification.from_pretrained(member, trust_remote_code=True)`` (the repo's
  ``modeling_hf_dpdedup.py``, which uses hf_dpdedup when installed), ``remote_code_ratio`` = that / hf;
  ``*_fresh_process_s`` clears the in-process verification cache before each load, as a newly
  started process sees it: shards are then trusted through the markers ``hf_dpdedup.hub.download.
  verify_cached`` keeps beside the huggingface_hub cache (hashed once per downloaded blob);
- ``new_process*_ratio``: a whole new Python process (imports included) loading the member offline
  from the warm cache ÷ one loading the plain repo with transformers (``*_contiguous``: ``eps1``);
- ``family_download_bytes`` vs. ``plain_download_bytes``: what loading all 5 members costs in a fresh
  cache, as a family (shared shards once) and as 5 plain repos; ``download_ratio`` = family / plain.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{PORT}"
os.environ["HF_HUB_OFFLINE"] = "0"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf-modules-"))  # remote code, not ~/.cache
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)

from common import median_seconds, minilm_folder, new_process, paired, write_results  # noqa: E402
from hf_dpdedup import DedupedModel, FamilyStore, push_family_to_hub  # noqa: E402
from hf_dpdedup.testing import HubServer  # noqa: E402
from hf_dpdedup.privacy import PrivacyMetadata  # noqa: E402
from hf_dpdedup.store.io import forget_verified  # noqa: E402

EPSILONS = (1.0, 2.0, 4.0, 6.0, 8.0)
TOKEN = "bench-token"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def make_member(base: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """A stand-in for a DP fine-tune: base weights with the top layer nudged, a fresh head."""
    torch.manual_seed(seed)
    member = BertForSequenceClassification(base.config).eval()
    member.bert.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for p in member.bert.encoder.layer[-1].parameters():
            p.add_(scale * torch.randn_like(p) * p.std())
    return member


def build(tmp: Path, block_size: int):
    folder = minilm_folder()
    base = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base.config.num_labels = 2
    base.config.architectures = ["BertForSequenceClassification"]
    family = FamilyStore.create(tmp / "family", block_size=block_size)
    members = {}
    for i, eps in enumerate(EPSILONS):
        name = f"eps{eps:g}"
        members[name] = make_member(base, seed=i, scale=0.01 * (i + 1))
        family.add_model(name, members[name], tokenizer=tokenizer, privacy=PrivacyMetadata(eps, 1e-5, ("bench",)))
        members[name].save_pretrained(tmp / "plain" / name)
        tokenizer.save_pretrained(tmp / "plain" / name)
    return family, members


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block-size", type=int, default=65536)
    parser.add_argument("--process-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp, HubServer(tokens={TOKEN: ("bench", "write")}, port=PORT) as server:
        tmp = Path(tmp)
        family, members = build(tmp, args.block_size)
        api = HfApi(endpoint=server.url, token=TOKEN)
        push_family_to_hub(family, "bench", family_name="minilm", token=TOKEN, endpoint=server.url)
        for name in members:
            api.create_repo(f"bench/plain-{name}")
            api.upload_folder(folder_path=tmp / "plain" / name, repo_id=f"bench/plain-{name}")

        # bytes: all 5 members into one fresh cache, as a family and as plain repos
        family_cache, plain_cache = tmp / "family-cache", tmp / "plain-cache"
        for name in members:
            DedupedModel.from_pretrained(f"bench/minilm-{name}", cache_dir=family_cache, token=TOKEN)
            AutoModelForSequenceClassification.from_pretrained(f"bench/plain-{name}", cache_dir=plain_cache,
                                                               token=TOKEN)
        family_bytes, plain_bytes = folder_bytes(family_cache), folder_bytes(plain_cache)
        stored = family.stored_bytes()

        # load time from the warm caches, same run, interleaved repeats: eps1 is stored contiguously
        # (the first member: views of its shards), eps4 shares most rows with it (scattered rows,
        # mapped from two shard files); "" keys are eps4's, as in earlier runs
        figures = {}
        for label, name in (("_contiguous", "eps1"), ("", "eps4")):
            for mode, kwargs in (("", {}), ("_offline", {"local_files_only": True})):
                key = f"{mode}{label}"
                load = lambda n=name, kw=kwargs: DedupedModel.from_pretrained(  # noqa: E731
                    f"bench/minilm-{n}", cache_dir=family_cache, token=TOKEN, **kw)
                reference = lambda n=name, kw=kwargs: AutoModelForSequenceClassification.from_pretrained(  # noqa: E731
                    f"bench/plain-{n}", cache_dir=plain_cache, token=TOKEN, **kw)
                # each ratio: the median of per-pair ratios (ours and transformers' timed back to back)
                dedup_s, hf_s, ratio = paired(load, reference, args.repeats)
                fresh_s, _, fresh_ratio = paired(load, reference, args.repeats, setup=forget_verified)
                figures.update({f"dedup_warm_load{key}_s": dedup_s, f"hf_warm_load{key}_s": hf_s,
                                f"warm_load{key}_ratio": ratio,
                                f"dedup_warm_load{key}_fresh_process_s": fresh_s,
                                f"warm_load{key}_fresh_process_ratio": fresh_ratio})
        # a whole new process (imports included), offline from the warm caches, against transformers'
        for label, name in (("_contiguous", "eps1"), ("", "eps4")):
            t_dedup, t_hf, ratio = paired(
                new_process(f"from hf_dpdedup import DedupedModel; DedupedModel.from_pretrained("
                            f"'bench/minilm-{name}', cache_dir={str(family_cache)!r}, local_files_only=True)", HF_HUB_OFFLINE="1"),
                new_process(f"from transformers import AutoModelForSequenceClassification; "
                            f"AutoModelForSequenceClassification.from_pretrained('bench/plain-{name}', "
                            f"cache_dir={str(plain_cache)!r}, local_files_only=True)", HF_HUB_OFFLINE="1"),
                args.process_repeats)
            figures.update({f"dedup_new_process{label}_s": t_dedup, f"hf_new_process{label}_s": t_hf,
                            f"new_process{label}_ratio": ratio})
        remote_s = median_seconds(lambda: AutoModelForSequenceClassification.from_pretrained(
            "bench/minilm-eps4", cache_dir=family_cache, token=TOKEN, trust_remote_code=True), args.repeats)
        figures.update({"remote_code_warm_load_s": remote_s, "remote_code_ratio": remote_s / figures["hf_warm_load_s"]})
    figures.update({
        "family_members": len(members),
        "family_download_bytes": family_bytes,
        "plain_download_bytes": plain_bytes,
        "download_ratio": family_bytes / plain_bytes,
        "family_stored_bytes": stored,
    })
    write_results("hub", figures)


if __name__ == "__main__":
    main()
