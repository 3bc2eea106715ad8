"""Run as a script by test_hub_transformers.py: load a member the way a Hub user with only
transformers installed does, in a fresh process whose ``HF_ENDPOINT`` is the local Hub.

    python transformers_user.py REPO_ID OUT_FILE [--without-hf-dpdedup]

Writes ``torch.save``-d results to OUT_FILE: the AutoModel's state dict, class and ``dedup_info``,
and the scores of ``pipeline(model=REPO_ID, trust_remote_code=True)`` (task inferred from the Hub).
"""

from __future__ import annotations

import sys

if "--without-hf-dpdedup" in sys.argv:
    sys.modules["hf_dpdedup"] = None  # `import hf_dpdedup` raises ImportError, as if not installed

import torch  # noqa: E402
import transformers  # noqa: E402


def main(repo_id: str, out: str) -> None:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(repo_id, trust_remote_code=True)
    classify = transformers.pipeline(model=repo_id, trust_remote_code=True, top_k=None)
    scores = classify(["a very good film", "the plot is dull"])
    info = model.dedup_info
    torch.save({
        "class": type(model).__name__,
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "pipeline_class": type(classify.model).__name__,
        "pipeline_task": classify.task,
        "pipeline_equal": all(torch.equal(v, model.state_dict()[k]) for k, v in classify.model.state_dict().items()),
        "scores": scores,
        "dedup_info": {k: getattr(info, k) for k in ("name", "repo_id", "store_repo_id", "store_revision", "epsilon")},
        "hf_dpdedup_loaded": sys.modules.get("hf_dpdedup") is not None,
    }, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
