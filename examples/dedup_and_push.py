"""Build (deduplicate) a family and push it to the Hub: block store repo first, then one repo per member.

    python examples/dedup_and_push.py                      # offline: a local Hub on 127.0.0.1
    python examples/dedup_and_push.py --endpoint https://huggingface.co --token hf_... --namespace my-org

The family is the demo's: three MiniLM members that share most blocks (exact deduplication; the dedup
engine, ``hf_dpdedup.dedup.storing.deduplicate_family``, writes the same kind of family folder).
Pushing twice shows idempotence: the second push makes no commit.
"""

import argparse
import contextlib
import tempfile
from pathlib import Path

from hf_dpdedup import push_family_to_hub
from hf_dpdedup.demo import build_family
from hf_dpdedup.testing import local_hub

parser = argparse.ArgumentParser()
parser.add_argument("--endpoint", help="a Hub URL (default: start a local Hub-compatible server)")
parser.add_argument("--token", help="write token for --endpoint")
parser.add_argument("--namespace", default="demo")
args = parser.parse_args()

with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
    family, members, _ = build_family(Path(tmp), block_size=65536, epsilons=(1.0, 4.0, 8.0))
    endpoint, token = args.endpoint, args.token
    if endpoint is None:
        endpoint, token = stack.enter_context(local_hub(args.namespace))
    options = dict(family_name="minilm-example", token=token, endpoint=endpoint,
                   base_model="sentence-transformers/all-MiniLM-L6-v2")
    result = push_family_to_hub(family, args.namespace, **options)
    print(f"block store {result.store.repo_id} @ {result.store.commit}")
    for name, repo in result.members.items():
        print(f"  {name:<20} -> {repo.repo_id} @ {repo.commit[:12]} (pinned to the store commit above)")
    again = push_family_to_hub(family, args.namespace, **options)
    print(f"second push of the unchanged family: {again.commits_made} new commits")
