"""Lossless coding of block shards: byte-grouped entropy coding with ZipNN.

A block store has one codec, fixed when it is created and recorded in ``block_store.json``:

- ``Codec.NONE``: a shard holds the raw ``[rows, block_size]`` tensor (memory-mapped on load).
- ``Codec.ZIPNN``: a shard holds the ZipNN stream of those rows as a 1-D ``uint8`` tensor named
  ``blocks``. ZipNN (https://github.com/zipnn/zipnn) splits each float into its bytes, groups the
  exponent bytes (which carry little entropy in trained weights) apart from the mantissa bytes and
  Huffman-codes each group per 256 KiB chunk, with its own threads; chunks that do not shrink are
  kept raw, so coding never grows a shard by more than its small headers.

The file is still a safetensors file, so its sha256 in the index covers exactly the stored bytes and
integrity checks, content addressing and append-only growth work as for raw shards. Decoding gives
the exact bytes back (lossless); it runs only after the shard's sha256 has been checked, unless the
caller disabled verification.
"""

from __future__ import annotations

import os
from enum import Enum

import torch
import zipnn

from ..blocks import dtype_name
from ..errors import StoreFormatError, UnknownCodecError

#: ZipNN's header: 32 bytes, the decoded length is the little-endian uint64 at bytes 16..24.
_ZIPNN_HEADER = 32
_ZIPNN_LENGTH = slice(16, 24)
#: ZipNN's measured sweet spot (it caps its own default there too)
_MAX_THREADS = 16


class Codec(str, Enum):
    """How a block store codes its shards (``block_store.json`` field ``codec``)."""

    NONE = "none"
    ZIPNN = "zipnn"

    @classmethod
    def parse(cls, value: "Codec | str") -> "Codec":
        """The codec named ``value``; an unknown name raises :class:`UnknownCodecError`."""
        try:
            return cls(value)
        except ValueError:
            raise UnknownCodecError(
                f"Block store codec {value!r} is unknown to this hf_dpdedup, which reads "
                f"{[c.value for c in cls]}. Upgrade hf_dpdedup (pip install -U hf_dpdedup) to read "
                "the store, or ask its author for a copy re-coded with a known codec "
                "(FamilyStore.recode(dest, codec='zipnn') or codec='none')."
            ) from None


def coding_threads() -> int:
    """Threads ZipNN may use: the CPUs this process may run on, at most 16."""
    return max(1, min(len(os.sched_getaffinity(0)), _MAX_THREADS))


def _zipnn(dtype: torch.dtype) -> zipnn.ZipNN:
    return zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype_name(dtype), threads=coding_threads())


def encode_rows(rows: torch.Tensor, codec: Codec) -> torch.Tensor:
    """The bytes a shard stores for ``rows``: the rows themselves, or their coded stream (``uint8``)."""
    if codec is Codec.NONE:
        return rows.contiguous()
    # a copy: ZipNN reorders the bits of the buffer it is given in place
    raw = rows.detach().contiguous().view(torch.uint8).numpy().tobytes()
    stream = _zipnn(rows.dtype).compress(raw)
    return torch.frombuffer(bytearray(stream), dtype=torch.uint8)


def decode_rows(
    stored: torch.Tensor, codec: Codec, *, num_rows: int, block_size: int, dtype: torch.dtype, what: str
) -> torch.Tensor:
    """Undo :func:`encode_rows`: the ``[num_rows, block_size]`` rows a shard stores."""
    if codec is Codec.NONE:
        return stored
    expected = num_rows * block_size * dtype.itemsize
    if stored.dtype != torch.uint8 or stored.dim() != 1 or stored.numel() < _ZIPNN_HEADER:
        raise StoreFormatError(
            f"{what} should hold a 1-D uint8 ZipNN stream, but holds a {dtype_name(stored.dtype)} "
            f"tensor of shape {list(stored.shape)}; the store is damaged: copy or download it again."
        )
    stream = stored.numpy()
    declared = int.from_bytes(stream[_ZIPNN_LENGTH].tobytes(), "little")
    if bytes(stream[:2]) != b"ZN" or declared != expected:
        raise StoreFormatError(
            f"{what} is not the ZipNN stream of {num_rows} rows of {block_size} {dtype_name(dtype)} "
            f"values ({expected} bytes; its header says {declared}); the store is damaged: copy or "
            "download it again."
        )
    decoded = _zipnn(dtype).decompress(memoryview(stream))
    if len(decoded) != expected:
        raise StoreFormatError(f"{what} decoded to {len(decoded)} bytes, not {expected}; the store is damaged.")
    # ZipNN allocates its output itself (no decode-into-buffer API), with no alignment guarantee:
    # one copy into torch's 64-byte-aligned memory, so rows are views that compute like fresh
    # tensors (and gathers from them take torch's fast path).
    rows = torch.empty(num_rows, block_size, dtype=dtype)
    rows.view(-1).view(torch.uint8).copy_(torch.frombuffer(decoded, dtype=torch.uint8))
    return rows
