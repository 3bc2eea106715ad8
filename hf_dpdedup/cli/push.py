"""``hf-dpdedup push``: push a family folder to the Hub (block store repo, then one repo per member)."""

from __future__ import annotations

import argparse

from . import COMMANDS
from ..hub.push import push_family_to_hub


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help=COMMANDS["push"][1],
        description="Push the block store to NAMESPACE/<family-name>-blocks, then each member to "
        "NAMESPACE/<family-name>-<member>, pinned to the store's commit. Member repos load with "
        "hf_dpdedup and with plain transformers (trust_remote_code=True). Re-running an unchanged push "
        "makes no commit; re-running after a failure resumes.",
    )
    p.add_argument("family", help="family folder (block_store/ + members/)")
    p.add_argument("namespace", help="Hub user or organisation that owns the repos")
    p.add_argument("--family-name", help="block store repo is NAMESPACE/<family-name>-blocks (default: folder name)")
    p.add_argument("--member", action="append", dest="members", help="push only this member (repeatable)")
    p.add_argument("--private", action="store_true", help="create new repos as private")
    p.add_argument("--token", help="token with write access (default: HF_TOKEN or the saved login)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--base-model", help="Hub id of the pretrained model the family was fine-tuned from")
    p.add_argument("--license", help="license id for the model cards")
    p.add_argument("--force", action="store_true",
                   help="push even into repos that hold another block store (repoints them)")
    p.add_argument("--allow-seeded", action="store_true",
                   help="publish members built with seeded (test-only, not private) noise; refused otherwise")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = push_family_to_hub(
        args.family,
        args.namespace,
        family_name=args.family_name,
        members=args.members,
        private=args.private,
        token=args.token,
        endpoint=args.endpoint,
        base_model=args.base_model,
        license=args.license,
        force=args.force,
        allow_seeded=args.allow_seeded,
    )
    for label, repo in [("store", result.store), *result.members.items()]:
        state = f"new commit ({len(repo.files)} files)" if repo.changed else "up to date"
        print(f"{label:<24} {repo.repo_id:<40} {repo.commit[:12]}  {state}")
    print(f"{result.commits_made} commit(s); members pinned to store commit {result.store.commit}")
    return 0
