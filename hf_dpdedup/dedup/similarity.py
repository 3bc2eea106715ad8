"""Nearest-block matching: for each target block, its most similar candidate blocks.

Candidates are the base model's blocks followed by the target's own blocks (one matrix, or several
numbered one after the other);
a target block never matches itself (``exclude_self``; ``-1`` means "nothing to exclude", never
"the last block", a bug of the paper's prototype). Metrics: ``"l2"`` (default), ``"l1"`` and
``"cosine"`` as the distance ``1 - cos`` (smallest distance = MOST similar; a zero block has
cosine 0 with everything, so distance 1, never NaN).

Two methods, one answer format (:class:`Match`, distances ascending, ties broken by the smaller
candidate index):

* ``"exact"`` screens all pairs in chunks — L2 and cosine through ``‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b`` and
  dot products in float64, L1 with ``torch.cdist(p=1)`` on bounded float32 chunks — then *refines*
  the best ``k + 4`` per target by computing their distance directly from ``a − b``. Refining
  removes the cancellation of the matrix trick for near-identical blocks (the error is then
  relative to the distance itself, ~1e-7 in float32) and gives equal blocks bit-equal distances,
  so ties always go to the smaller index.
* ``"sketch"`` projects every block to ``sketch_dim`` dimensions with a seeded Gaussian matrix
  (Johnson–Lindenstrauss), keeps the ``rerank`` nearest candidates by sketch distance (cosine in
  sketch space for ``"cosine"``; L2 in sketch space also pre-filters ``"l1"``) and refines those with
  the true metric. Deterministic for a given ``seed``; recall is measured in
  ``benchmarks/match_benchmark.py``.

Memory: inputs may be float32/bfloat16/float16 (float64 too) and are never copied whole. Rows are
converted ``chunk_rows`` at a time into reused buffers (fresh multi-GiB allocations cost more than
the arithmetic). Peak extra memory is about ``2 · chunk_rows · block_size · 8`` bytes (one target
and one candidate chunk in float64; the refinement's gathered pairs fit the same bound unless
``k + 4`` or ``rerank`` exceeds ``chunk_rows``), plus a 256 MiB float32 buffer for sketching and
``O(n · (k + rerank) + (n + m) · sketch_dim)``. The default ``chunk_rows`` keeps one chunk near
256 MiB (32 rows at block size 2^20): about 0.6 GiB in all, whatever the family size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import SimilarityError

METRICS = ("l2", "l1", "cosine")
METHODS = ("exact", "sketch")
_TIE_SLACK = 4  # extra screened candidates refined by the exact method (near-ties across chunks)
_CHUNK_BYTES = 256 * 2**20
_RAW = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer views for numpy.take
_SKETCH_COLS = 2**16  # columns of the projection generated at a time (fixed: keeps results seed-only)


@dataclass(frozen=True)
class Match:
    """``indices[i, j]``: the j-th nearest candidate of target i; ``distances[i, j]``: its distance."""

    indices: torch.Tensor  # int64 [n, k]
    distances: torch.Tensor  # float64 [n, k], ascending per row


def nearest_blocks(
    targets: torch.Tensor,
    candidates: torch.Tensor | Sequence[torch.Tensor],
    *,
    metric: str = "l2",
    k: int = 1,
    exclude_self: torch.Tensor | None = None,
    method: str = "exact",
    chunk_rows: int | None = None,
    sketch_dim: int = 128,
    rerank: int = 8,
    seed: int = 0,
) -> Match:
    """The ``k`` nearest candidates of every target block.

    ``candidates`` is one ``[m, bs]`` matrix or several whose rows are numbered one after the other
    (e.g. ``(base, target)``). ``exclude_self[i]`` is the candidate index that *is* target i,
    or -1 for none. ``rerank`` is how many sketch neighbours are refined with the true metric.

    >>> base = torch.eye(3); target = base + 0.01
    >>> nearest_blocks(target, (base, target), exclude_self=torch.arange(3) + 3).indices.tolist()
    [[0], [1], [2]]
    """
    parts = (candidates,) if isinstance(candidates, torch.Tensor) else tuple(candidates)
    m = _check_inputs(targets, parts, metric, method, k)
    n, bs = targets.shape
    exclude = _check_exclude(exclude_self, n, m)
    if k > m - int(bool((exclude >= 0).any())):
        raise SimilarityError(f"k={k} but only {m} candidates (minus the target itself); lower k.")
    if n == 0:
        return Match(torch.empty(0, k, dtype=torch.long), torch.empty(0, k, dtype=torch.float64))
    work = torch.float64 if any(t.dtype == torch.float64 for t in (targets, *parts)) else torch.float32
    rows = max(1, _CHUNK_BYTES // (bs * 8)) if chunk_rows is None else _positive(chunk_rows, "chunk_rows")
    if method == "exact":
        screened = _screen_exact(targets, parts, metric, exclude, min(k + _TIE_SLACK, m), rows, work)
    else:
        screened = _screen_sketch(targets, parts, metric, exclude, min(max(_positive(rerank, "rerank"), k), m), sketch_dim, seed)
    return _refine(targets, parts, screened, exclude, metric, k, work, rows)


# --- checks ------------------------------------------------------------------------------------
def _check_inputs(targets: torch.Tensor, parts: tuple[torch.Tensor, ...], metric: str, method: str, k: int) -> int:
    if metric not in METRICS:
        raise SimilarityError(f"Unknown metric {metric!r}; use one of {METRICS}.")
    if method not in METHODS:
        raise SimilarityError(f"Unknown method {method!r}; use one of {METHODS}.")
    _positive(k, "k")
    for t in (targets, *parts):
        if t.dim() != 2 or not t.is_floating_point() or t.shape[1] != targets.shape[1]:
            raise SimilarityError(
                f"Blocks must be floating [rows, block_size] matrices of one block size; got "
                f"{t.dtype} {list(t.shape)} against targets {list(targets.shape)}."
            )
    return sum(p.shape[0] for p in parts)


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SimilarityError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _check_exclude(exclude_self: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    if exclude_self is None:
        return torch.full((n,), -1, dtype=torch.long)
    ex = torch.as_tensor(exclude_self)
    if ex.shape != (n,) or ex.is_floating_point() or ex.dtype == torch.bool or bool(((ex < -1) | (ex >= m)).any()):
        raise SimilarityError(
            f"exclude_self must be {n} integers in [-1, {m}) (-1: nothing to exclude), got {ex.dtype} {list(ex.shape)}."
        )
    return ex.long()


# --- chunked access to rows -------------------------------------------------------------------
def _row_chunks(parts: tuple[torch.Tensor, ...], rows: int):
    """``(offset, view)`` pieces of at most ``rows`` rows over the concatenation of ``parts``."""
    offset = 0
    for part in parts:
        for start in range(0, part.shape[0], rows):
            yield offset + start, part[start : start + rows]
        offset += part.shape[0]


def _load(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = buffer[: rows.shape[0]]
    out.copy_(rows)  # into a reused buffer: converts dtype without a fresh allocation
    return out


def _best(dist: torch.Tensor, first_col: int, exclude: torch.Tensor, keep: int, best):
    """Merge a distance tile into the running (distances, indices), ties to the smaller index."""
    if not bool(torch.isfinite(dist).all()):
        raise SimilarityError("Non-finite distance: a block contains NaN or inf; check the model's weights.")
    cols = torch.arange(first_col, first_col + dist.shape[1])
    dist = dist.masked_fill(exclude[:, None] == cols[None, :], float("inf"))
    idx = cols.expand_as(dist)
    if best is not None:  # earlier tiles hold smaller indices, so a stable sort keeps ties in index order
        dist, idx = torch.cat([best[0], dist], 1), torch.cat([best[1], idx], 1)
    d, order = torch.sort(dist, dim=1, stable=True)
    return d[:, :keep], idx.gather(1, order[:, :keep])


def _pair_scores(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances between all rows of ``a`` and ``b`` (already in the work dtype)."""
    if metric == "l1":
        return torch.cdist(a, b, p=1)
    dots = a @ b.T
    na, nb = torch.linalg.vector_norm(a, dim=1).square(), torch.linalg.vector_norm(b, dim=1).square()
    if metric == "l2":
        return (na[:, None] + nb[None, :] - 2 * dots).clamp_min_(0).sqrt_()
    return 1 - _cosine(dots, na.sqrt()[:, None] * nb.sqrt()[None, :])


def _cosine(dots: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    # A zero block is equally (un)like everything: cosine 0, distance 1, instead of 0/0 = NaN.
    return torch.where(norms > 0, dots / norms.clamp_min(1e-300), 0.0).clamp(-1, 1)


# --- screening -----------------------------------------------------------------------------------
def _screen_exact(targets, parts, metric, exclude, keep, rows, work) -> torch.Tensor:
    dtype = work if metric == "l1" else torch.float64  # L1 has no cancellation: float32 cdist is enough
    tbuf = torch.empty(min(rows, targets.shape[0]), targets.shape[1], dtype=dtype)
    cbuf = torch.empty(min(rows, sum(p.shape[0] for p in parts)), targets.shape[1], dtype=dtype)
    out = []
    for t0, tchunk in _row_chunks((targets,), rows):
        a, best = _load(tbuf, tchunk), None
        for c0, cchunk in _row_chunks(parts, rows):
            dist = _pair_scores(a, _load(cbuf, cchunk), metric).double()
            best = _best(dist, c0, exclude[t0 : t0 + a.shape[0]], keep, best)
        out.append(best[1])
    return torch.cat(out)


def _screen_sketch(targets, parts, metric, exclude, keep, dim, seed) -> torch.Tensor:
    unique = list({id(t): t for t in (targets, *parts)}.values())  # targets are usually a part: sketch once
    sketches = dict(zip(map(id, unique), _sketch(unique, dim, seed)))
    t_sk = sketches[id(targets)]
    c_sk = torch.cat([sketches[id(p)] for p in parts])
    sketch_metric = "cosine" if metric == "cosine" else "l2"  # Gaussian sketches keep L2 and angles
    out, tile = [], max(1, _CHUNK_BYTES // (c_sk.shape[0] * 8 * 4))  # a few float64 [tile, m] temporaries
    for t0 in range(0, t_sk.shape[0], tile):
        a = t_sk[t0 : t0 + tile]
        out.append(_best(_pair_scores(a, c_sk, sketch_metric), 0, exclude[t0 : t0 + a.shape[0]], keep, None)[1])
    return torch.cat(out)


def _sketch(mats: list[torch.Tensor], dim: int, seed: int) -> list[torch.Tensor]:
    """``X @ G / √dim`` for each matrix, with ``G`` Gaussian, generated ``_SKETCH_COLS`` rows at a time."""
    _positive(dim, "sketch_dim")
    bs = mats[0].shape[1]
    gen = torch.Generator().manual_seed(seed)
    out = [torch.zeros(x.shape[0], dim, dtype=torch.float64) for x in mats]
    rows = max(1, _CHUNK_BYTES // (4 * min(bs, _SKETCH_COLS)))  # float32 buffer of ≤ 256 MiB
    buf = torch.empty(min(rows, max(x.shape[0] for x in mats)), min(bs, _SKETCH_COLS), dtype=torch.float32)
    for c0 in range(0, bs, _SKETCH_COLS):
        proj = torch.randn(min(_SKETCH_COLS, bs - c0), dim, generator=gen) / dim**0.5
        for x, s in zip(mats, out):
            for r0, chunk in _row_chunks((x[:, c0 : c0 + proj.shape[0]],), rows):
                s[r0 : r0 + chunk.shape[0]] += (_load(buf[:, : proj.shape[0]], chunk) @ proj).double()
    return out


# --- refinement: the true distance of a few pairs, computed directly -----------------------------
def _refine(targets, parts, screened, exclude, metric, k, work, rows) -> Match:
    n, bs = targets.shape
    per = screened.shape[1]
    r = max(1, rows // per)  # targets per chunk; their r·per pairs are gathered in a few big ops
    tbuf = torch.empty(min(r, n), bs, dtype=work)
    abuf = torch.empty(min(r, n) * per, bs, dtype=work)
    cbuf = torch.empty_like(abuf)
    starts = torch.tensor([0] + [p.shape[0] for p in parts]).cumsum(0)
    staging: dict[torch.dtype, torch.Tensor] = {}
    dists = torch.empty(n * per, dtype=torch.float64)
    for t0, tchunk in _row_chunks((targets,), r):
        cand = screened[t0 : t0 + tchunk.shape[0]].reshape(-1)
        cand, pos = cand.sort(stable=True)  # sorted: each part's pairs are one contiguous run
        a = _take_rows(_load(tbuf, tchunk), pos // per, abuf[: cand.numel()], staging)
        c = cbuf[: cand.numel()]
        bounds = torch.searchsorted(cand, starts).tolist()
        for p, part in enumerate(parts):
            lo, hi = bounds[p], bounds[p + 1]
            if hi > lo:
                _take_rows(part, cand[lo:hi] - starts[p], c[lo:hi], staging)
        dists[t0 * per + pos] = _direct(a, c, metric)
    dists = dists.view(n, per)
    if not bool(torch.isfinite(dists).all()):
        raise SimilarityError("Non-finite distance: a block contains NaN or inf; check the model's weights.")
    # ``keep`` may exceed the candidates other than the target itself: re-exclude it here.
    dists.masked_fill_(screened == exclude[:, None], float("inf"))
    # Ties: order by index first, then a stable sort by distance keeps the smaller index first.
    idx, pos = screened.sort(dim=1)
    d, order = dists.gather(1, pos).sort(dim=1, stable=True)
    return Match(idx.gather(1, order[:, :k]), d[:, :k])


def _take_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor, staging: dict) -> torch.Tensor:
    """``out[:] = src[index]``, converted to ``out``'s dtype.

    The gather is one single-threaded ``numpy.take`` on the raw bytes, then one bulk ``copy_``
    converts: on a busy machine every parallel torch op waits for all its threads to be
    scheduled, and per-row copies or ``index_select`` measured 10-20x slower than this."""
    buf = out
    if src.dtype != out.dtype:
        buf = staging.get(src.dtype)
        if buf is None or buf.shape[0] < out.shape[0]:
            buf = staging[src.dtype] = torch.empty(out.shape[0], out.shape[1], dtype=src.dtype)
        buf = buf[: out.shape[0]]
    if not src.is_contiguous() or src.device.type != "cpu":
        buf.copy_(torch.index_select(src, 0, index.to(src.device)))  # rare: a view or a GPU tensor
    else:
        raw = _RAW[src.element_size()]
        np.take(src.view(raw).numpy(), index.numpy(), axis=0, out=buf.view(raw).numpy(), mode="clip")
    if buf is not out:
        out.copy_(buf)
    return out


def pair_distances(a: torch.Tensor, b: torch.Tensor, *, metric: str = "l2") -> torch.Tensor:
    """Distance (float64) of each row pair ``(a[i], b[i])``, computed the way ``nearest_blocks``
    refines its matches (so the two agree exactly); the inputs are not modified."""
    if metric not in METRICS:
        raise SimilarityError(f"Unknown metric {metric!r}; use one of {METRICS}.")
    if a.shape != b.shape or a.dim() != 2:
        raise SimilarityError(f"pair_distances needs two [n, block_size] matrices of one shape, got "
                              f"{list(a.shape)} and {list(b.shape)}.")
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    return _direct(a.to(work, copy=True), b.to(work, copy=True), metric)


def _direct(a: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance of each row pair ``(a[i], c[i])`` from the difference itself (no cancellation);
    overwrites both. Every pair goes through the same ops, so equal blocks get bit-equal distances."""
    if metric == "cosine":  # 1 − cos(a, b) = ‖a/‖a‖ − b/‖b‖‖² / 2, exact even when cos ≈ 1
        na, nc = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(c, dim=1)
        a.div_(na.clamp_min(1e-30)[:, None])
        c.div_(nc.clamp_min(1e-30)[:, None]).sub_(a)
        dist = torch.linalg.vector_norm(c, dim=1).double().square() / 2
        return torch.where((na > 0) & (nc > 0), dist, 1.0)  # a zero block: cosine 0, distance 1
    c.sub_(a)
    return torch.linalg.vector_norm(c, ord=2 if metric == "l2" else 1, dim=1).double()
