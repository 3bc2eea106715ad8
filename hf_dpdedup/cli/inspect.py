"""``hf-dpdedup inspect PATH``: summary of a family folder, a block store or a member folder."""

from __future__ import annotations

import argparse
import json
import sys

from . import COMMANDS
from ..store.check import problems
from ..store.summary import summarize


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help=COMMANDS["inspect"][1])
    p.add_argument("path", help="family folder, block store folder or member folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--verify", action="store_true",
        help="also hash every shard and extras file (sha256) and read every shard header; exit 1 on damage",
    )
    p.set_defaults(func=run)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)  # pragma: no cover


def format_summary(summary: dict) -> str:
    lines: list[str] = []
    store = summary.get("store")
    if store:
        lines += [
            f"block store  {store['path']}",
            f"  format {store['format']}  id {store['store_id']}",
            f"  block size {store['block_size']}  dtype {store['dtype']}",
            f"  rows {store['rows']}  shards {store['shards']}  stored {_bytes(store['stored_bytes'])}"
            + (f"  shared rows {store['shared_rows']}" if "shared_rows" in store else ""),
        ]
    members = summary.get("members") or ([summary["member"]] if "member" in summary else [])
    if members:
        lines.append("")
        header = f"{'member':<24}{'arch':<34}{'tensors':>8}{'extras':>7}{'blocks':>8}{'unique':>8}{'shared':>8}{'weights':>12}{'ε':>8}"
        lines.append(header)
        for m in members:
            eps = m.get("epsilon")
            lines.append(
                f"{m['name']:<24}{str(m['architecture'] or '-'):<34}{m['block_tensors']:>8}{m['extras']:>7}"
                f"{m['blocks']:>8}{str(m.get('unique_rows', '-')):>8}{str(m.get('shared_rows', '-')):>8}"
                f"{_bytes(m['block_tensor_bytes']):>12}{(f'{eps:.3g}' if eps is not None else '-'):>8}"
            )
    if summary.get("kind") == "family":
        ratio = summary["exact_dedup_ratio"]
        lines += [
            "",
            f"block bytes of all members {_bytes(summary['logical_block_bytes'])}; "
            f"stored shards {_bytes(store['shard_bytes'])}"
            + (f" ({ratio:.1%})" if ratio is not None else "")
            + f"; everything stored {_bytes(summary['stored_bytes'])}",
        ]
    if summary.get("kind") == "member":
        lines.append(f"block store: {summary['block_store']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the summary; files that are missing or have the wrong size (and, with ``--verify``, the
    wrong bytes) are reported on stderr and make the exit status 1."""
    summary = summarize(args.path)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    found = problems(args.path, verify=args.verify)
    for problem in found:
        print(f"hf-dpdedup inspect: {problem}", file=sys.stderr)
    return 1 if found else 0
