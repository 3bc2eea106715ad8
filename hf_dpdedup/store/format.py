"""The ``hf_dpdedup/1`` on-disk format: names, versions and validated index records.

A *block store* folder holds ``block_store.json`` and shards ``blocks-NNNNN.safetensors``; each
shard is one 2-D tensor ``blocks`` of shape ``[num_rows, block_size]``. Rows are numbered globally
in append order and never move, so a row id stays valid for the life of the store. Shard names do
not encode the shard count (unlike transformers' ``-of-N`` names) because a store only ever grows:
appending a model adds shards and never renames one that members already point at.

Index formats:

- ``hf_dpdedup/1``: raw shards; the index lists every row's sha256 (``row_hashes``).
- ``hf_dpdedup/2``: the same with entropy-coded shards (``codec`` other than ``"none"``, see
  :mod:`.codec`), so a reader that predates codecs refuses it with its "upgrade" error instead of
  misreading coded bytes as weights.
- ``hf_dpdedup/3`` (what new stores are created with): shards only, and always a ``codec``. Row
  hashes are derived from the shards by writers (:mod:`.row_digests`): 64 hex digits per row were
  most of a small family's metadata, and a loader downloads and parses the index on every load.
  A reader that predates it refuses it with its "upgrade" error.

A store keeps the format it was created with: appending to a ``/1`` or ``/2`` store extends its
``row_hashes``, byte for byte what earlier versions wrote and read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..blocks import BLOCK_DTYPES, check_block_size
from ..errors import BlockLayoutError, StoreFormatError, UnsupportedFormatVersionError
from .codec import Codec

FORMAT = "hf_dpdedup/1"
#: the format of a block store whose shards are coded (``codec`` other than ``"none"``)
CODED_FORMAT = "hf_dpdedup/2"
#: the format of a block store index that lists shards only (row hashes derived, see :mod:`.row_digests`)
SHARD_INDEX_FORMAT = "hf_dpdedup/3"
#: the format of the constitution of a peft adapter member (an older reader, which would rebuild it as
#: the bare base class, refuses it with its "upgrade hf_dpdedup" error instead)
ADAPTER_MEMBER_FORMAT = "hf_dpdedup/2"
#: the format of a compact constitution — row lists with runs (``[first, count]`` for consecutive row
#: ids) or small extras packed into block rows (``packed_extras``), see :mod:`.constitution` —, adapter
#: member or not: a reader that predates them refuses it with its "upgrade hf_dpdedup" error instead
#: of calling the member damaged or rebuilding it without its packed tensors
COMPACT_MEMBER_FORMAT = "hf_dpdedup/3"
#: the format compact constitutions are written in now: format 3 without what the rest of the file
#: implies — each tensor entry's ``dtype`` (the constitution's) and ``numel`` (its shape's product),
#: each packed extra's ``offset`` (they tile their rows in order) — and with the names' common
#: ``name_prefix`` (a peft member's ``base_model.model.``) written once; a reader that predates it
#: refuses it with its "upgrade hf_dpdedup" error instead of calling the member damaged
LEAN_MEMBER_FORMAT = "hf_dpdedup/4"
#: peft's name for an adapter's config file, written into adapter member folders
ADAPTER_CONFIG_FILE = "adapter_config.json"
INDEX_FILE = "block_store.json"
CONSTITUTION_FILE = "dedup_constitution.json"
#: the config a family was deduplicated with (``DedupConfig.to_dict()``), at the family root
DEDUP_CONFIG_FILE = "dedup_config.json"
EXTRAS_FILE = "extras.safetensors"
SHARD_TENSOR = "blocks"
LOCK_FILE = ".lock"


#: what to do about a damaged constitution
RESAVE = (
    "the member is damaged: download it again from the Hub, or re-run add_model for it "
    "(FamilyStore.add_model) from the original model"
)
#: what to do about a damaged index (block_store.json)
RESTORE_INDEX = (
    "the index is damaged: restore block_store.json from the Hub or a backup of the family "
    "(or re-create the store and re-run add_model for every member)"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_XXH3 = re.compile(r"^[0-9a-f]{32}$")


def shard_file_name(number: int) -> str:
    return f"blocks-{number:05d}.safetensors"


def check_format(
    data: dict[str, Any], what: str, accepted: tuple[str, ...] = (FORMAT,), *, fix: str = RESTORE_INDEX
) -> None:
    """The ``format`` field must be ours; a missing one means a damaged file, not a newer one."""
    found = data.get("format")
    if "format" not in data or not isinstance(found, str):
        raise StoreFormatError(f"{what} has no valid 'format' field ({found!r}): {fix}.")
    if found not in accepted:
        raise UnsupportedFormatVersionError(
            f"{what} has format {found!r}, but this hf_dpdedup reads {' or '.join(map(repr, accepted))}. "
            "Upgrade hf_dpdedup (pip install -U hf_dpdedup) or re-create the store with this version."
        )


def _require(
    data: dict[str, Any], key: str, types: type | tuple[type, ...], what: str, fix: str = RESTORE_INDEX
) -> Any:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, types):  # bool is an int: never accept it
        raise StoreFormatError(f"{what}: field {key!r} is missing or has the wrong type ({value!r}); {fix}.")
    return value


def unknown_keys(data: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """Fields a newer writer may have added: kept as they are and written back unchanged."""
    return {k: v for k, v in data.items() if k not in known}


_SHARD_KEYS = ("file", "first_row", "num_rows", "bytes", "sha256", "raw_sha256", "xxh3_128", "row_hashes_sha256")


@dataclass(frozen=True)
class ShardInfo:
    file: str
    first_row: int
    num_rows: int
    bytes: int
    sha256: str  # of the file as stored
    raw_sha256: str | None = None  # of the decoded rows, for coded shards
    #: fast digest of the file as stored, checked at load (absent in stores written before it existed)
    xxh3_128: str | None = None
    #: sha256 of the shard's row hashes (32 bytes per row, in row order): what a writer checks the row
    #: hashes it derives or reads from its cache against (``hf_dpdedup/3``, see :mod:`.row_digests`)
    row_hashes_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def end_row(self) -> int:
        return self.first_row + self.num_rows

    def to_dict(self) -> dict[str, Any]:
        out = {
            "file": self.file,
            "first_row": self.first_row,
            "num_rows": self.num_rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
            **({"raw_sha256": self.raw_sha256} if self.raw_sha256 is not None else {}),
        }
        if self.xxh3_128 is not None:
            out["xxh3_128"] = self.xxh3_128
        if self.row_hashes_sha256 is not None:
            out["row_hashes_sha256"] = self.row_hashes_sha256
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Any) -> "ShardInfo":
        what = "block_store.json shard entry"
        if not isinstance(data, dict):
            raise StoreFormatError(f"{what} {data!r} is not a JSON object; {RESTORE_INDEX}.")
        file = _require(data, "file", str, what)
        if "/" in file or "\\" in file or file.startswith(".") or not file:
            raise StoreFormatError(f"{what}: shard file name {file!r} must be a plain file name; {RESTORE_INDEX}.")
        sha256 = _require(data, "sha256", str, what)
        xxh3 = data.get("xxh3_128")
        listing = data.get("row_hashes_sha256")
        if (
            not _SHA256.match(sha256)
            or (xxh3 is not None and not (isinstance(xxh3, str) and _XXH3.match(xxh3)))
            or (listing is not None and not (isinstance(listing, str) and _SHA256.match(listing)))
        ):
            raise StoreFormatError(f"{what} {file}: its digests are not hex digests; {RESTORE_INDEX}.")
        return cls(
            file=file,
            first_row=_require(data, "first_row", int, what),
            num_rows=_require(data, "num_rows", int, what),
            bytes=_require(data, "bytes", int, what),
            sha256=sha256,
            raw_sha256=_require(data, "raw_sha256", str, what) if "raw_sha256" in data else None,
            xxh3_128=xxh3,
            row_hashes_sha256=listing,
            extra=unknown_keys(data, _SHARD_KEYS),
        )


_INDEX_KEYS = ("format", "kind", "store_id", "block_size", "dtype", "codec", "total_rows", "shards", "row_hashes")


@dataclass(frozen=True)
class StoreIndex:
    """Contents of ``block_store.json``. ``row_hashes[i]``, in a ``/1`` or ``/2`` index, is the sha256
    of row ``i``'s bytes (of the raw row, whatever the codec: content addressing does not depend on
    how shards are coded); ``None`` in a ``/3`` index, whose writers derive them from the shards."""

    store_id: str
    block_size: int
    dtype: str
    shards: tuple[ShardInfo, ...] = ()
    row_hashes: tuple[str, ...] | None = field(default=None, repr=False)
    codec: Codec = Codec.NONE
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total_rows(self) -> int:
        return self.shards[-1].end_row if self.shards else 0

    @property
    def format(self) -> str:
        if self.row_hashes is None:
            return SHARD_INDEX_FORMAT
        return FORMAT if self.codec is Codec.NONE else CODED_FORMAT

    def to_dict(self) -> dict[str, Any]:
        listed = self.row_hashes is not None
        codec = {"codec": self.codec.value} if self.codec is not Codec.NONE or not listed else {}
        return {
            "format": self.format,
            "kind": "block_store",
            "store_id": self.store_id,
            "block_size": self.block_size,
            "dtype": self.dtype,
            **codec,
            "total_rows": self.total_rows,
            "shards": [s.to_dict() for s in self.shards],
            **({"row_hashes": list(self.row_hashes)} if listed else {}),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StoreIndex":
        what = "block_store.json"
        check_format(data, what, accepted=(FORMAT, CODED_FORMAT, SHARD_INDEX_FORMAT))
        if data["format"] != FORMAT:
            codec = Codec.parse(_require(data, "codec", str, what))
        elif "codec" in data:
            raise StoreFormatError(f"{what}: a {FORMAT!r} store has no codec, but it names {data['codec']!r}.")
        else:
            codec = Codec.NONE
        if data["format"] == SHARD_INDEX_FORMAT and "row_hashes" in data:
            raise StoreFormatError(
                f"{what}: a {SHARD_INDEX_FORMAT!r} index lists no row hashes, but this one has 'row_hashes'; "
                f"{RESTORE_INDEX}."
            )
        try:
            block_size = check_block_size(data.get("block_size"))
        except BlockLayoutError as exc:
            raise StoreFormatError(f"{what}: {exc} {RESTORE_INDEX[0].upper()}{RESTORE_INDEX[1:]}.") from None
        dtype = _require(data, "dtype", str, what)
        if dtype not in BLOCK_DTYPES:
            raise StoreFormatError(f"{what}: dtype {dtype!r} is not one of {sorted(BLOCK_DTYPES)}; {RESTORE_INDEX}.")
        shards = tuple(ShardInfo.from_dict(s) for s in _require(data, "shards", list, what))
        listed = data["format"] != SHARD_INDEX_FORMAT
        row_hashes = tuple(_require(data, "row_hashes", list, what)) if listed else None
        index = cls(
            _require(data, "store_id", str, what), block_size, dtype, shards, row_hashes, codec,
            extra=unknown_keys(data, _INDEX_KEYS),
        )
        index.validate(declared_total=_require(data, "total_rows", int, what))
        return index

    def validate(self, declared_total: int | None = None) -> None:
        """Shards must tile rows ``0..total_rows`` in order, each file named once; a listed
        ``row_hashes`` must have one distinct sha256 per row (rows are content-addressed: two equal
        hashes would map a block to the wrong row)."""
        expected = 0
        files: set[str] = set()
        for shard in self.shards:
            if shard.first_row != expected or shard.num_rows <= 0:
                raise StoreFormatError(
                    f"block_store.json: shard {shard.file} covers rows [{shard.first_row}, "
                    f"{shard.end_row}) but rows must continue at {expected}; {RESTORE_INDEX}."
                )
            if shard.file in files:
                raise StoreFormatError(f"block_store.json names shard file {shard.file} twice; {RESTORE_INDEX}.")
            files.add(shard.file)
            expected = shard.end_row
        listed = len(self.row_hashes) if self.row_hashes is not None else expected
        if expected != listed or (declared_total is not None and declared_total != expected):
            raise StoreFormatError(
                f"block_store.json: shards cover {expected} rows"
                + (f", row_hashes has {listed}" if self.row_hashes is not None else "")
                + (f", total_rows says {declared_total}" if declared_total is not None else "")
                + f"; {RESTORE_INDEX}."
            )
        if self.row_hashes is None:
            unchecked = next((s.file for s in self.shards if s.row_hashes_sha256 is None), None)
            if unchecked is not None:
                raise StoreFormatError(
                    f"block_store.json: shard {unchecked} has no 'row_hashes_sha256', which a "
                    f"{SHARD_INDEX_FORMAT!r} index records for every shard; {RESTORE_INDEX}."
                )
            return
        bad = next((h for h in self.row_hashes if not isinstance(h, str) or not _SHA256.match(h)), None)
        if bad is not None:
            raise StoreFormatError(f"block_store.json: row hash {bad!r} is not a sha256 hex digest; {RESTORE_INDEX}.")
        if len(set(self.row_hashes)) != len(self.row_hashes):
            raise StoreFormatError(
                f"block_store.json lists the same row hash for two rows (each stored block is unique); "
                f"{RESTORE_INDEX}."
            )
