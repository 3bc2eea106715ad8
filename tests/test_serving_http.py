"""The HTTP endpoint on 127.0.0.1, and the serve-bench command."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from hf_dpdedup.cli import main
from hf_dpdedup.serving import ServingPool
from hf_dpdedup.serving.http import make_server
from serving_support import build_family, inputs_for, reference_logits


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("serving-http"))


@pytest.fixture(scope="module")
def url(family):
    server = make_server(ServingPool(family[0].root, max_models=2), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


def request(url: str, body: object | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as resp:  # 127.0.0.1
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_infer_by_member_id_matches_the_reference(family, url):
    fam, _ = family
    assert request(f"{url}/members")[1] == {"members": fam.members()}
    x = inputs_for()
    for name in ("top1", "base", "part2", "top1"):
        status, payload = request(f"{url}/members/{name}/infer", {"inputs": {k: v.tolist() for k, v in x.items()}})
        assert status == 200 and payload["member"] == name
        assert torch.equal(torch.tensor(payload["outputs"]["logits"]), reference_logits(fam, name, x))


@pytest.mark.parametrize(
    "path, body, status, error",
    [
        ("/members/nope/infer", {"inputs": {"input_ids": [[1, 2]]}}, 404, "UnknownMemberError"),
        ("/members/base/infer", {"inputs": {"input_ids": [[1, 2], [3]]}}, 400, "ServingRequestError"),
        ("/members/base/infer", {"inputs": {"pixel": [[1]]}}, 400, "ServingRequestError"),
        ("/members/base/infer", {"text": "no tokenizer here"}, 400, "ServingRequestError"),
        ("/members/base/infer", {"inputs": {"input_ids": [[10**6]]}}, 400, "IndexError"),
        ("/members/base/infer", [1, 2], 400, "ServingRequestError"),
        ("/nowhere", {}, 404, "NotFound"),
    ],
)
def test_bad_requests_get_typed_errors(url, path, body, status, error):
    code, payload = request(url + path, body)
    assert code == status and payload["error"] == error, payload


def test_non_json_body(url):
    code, payload = request(f"{url}/members/base/infer", raw=b"{not json")
    assert code == 400 and payload["error"] == "ServingRequestError"


def test_serve_bench_command(family, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["serve-bench", str(family[0].root), "--queries", "12", "--pattern", "random",
                 "--budget-models", "4", "--plain-dir", str(tmp_path / "plain"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["baseline_loads"] >= 1 and figures["switch_ratio"] > 0
    assert figures["pool_used_bytes"] <= figures["pool_budget_bytes"]
    assert "switch_ratio" in capsys.readouterr().out
