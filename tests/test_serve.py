"""`raytl serve`: the model on Ray Serve over HTTP on loopback, against `raytl predict` on the same images."""

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest
from conftest import _free_port, assert_user_error

import raytl


def _post(url: str, data: bytes | None, method: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def served(predict_models, tmp_path_factory):
    """raytl predict on the corpus, then the same model served (after predict: both share two CPUs)."""
    from ray import serve

    model_dir = str(predict_models / "model")
    out = tmp_path_factory.mktemp("serve") / "pred"
    raytl.predict(model_dir, str(predict_models / "corpus"), str(out))
    summary = raytl.serve(model_dir, port=_free_port(), max_batch_size=8, max_upload_mb=0.05, name="test")
    yield {"url": summary["url"], "summary": summary, "predicted": pq.read_table(out).to_pylist()}
    serve.shutdown()


def test_concurrent_uploads_get_the_labels_and_scores_of_predict(served):
    rows = served["predicted"]
    assert len(rows) == 52 and served["summary"]["device"] == "cpu"
    uploads = [open(r["path"], "rb").read() for r in rows]  # JPEG, PNG, WebP, ... as the corpus has them
    with ThreadPoolExecutor(len(uploads)) as pool:  # all at once: the replica batches them
        answers = list(pool.map(lambda data: _post(served["url"], data), uploads))
    assert [status for status, _ in answers] == [200] * len(rows)
    assert [a["label"] for _, a in answers] == [r["predicted_label"] for r in rows]
    assert [a["score"] for _, a in answers] == pytest.approx([r["score"] for r in rows], abs=1e-4)
    for _, answer in answers:
        assert set(answer["scores"]) == {"cat", "dog"}
        assert answer["scores"][answer["label"]] == answer["score"]
        assert sum(answer["scores"].values()) == pytest.approx(1.0, abs=1e-5)  # logreg: probabilities


def test_bad_uploads_get_a_4xx_sentence_and_the_replica_keeps_serving(served, predict_models):
    url, cat = served["url"], predict_models / "corpus" / "cat"
    cases = [
        (b"", 400, "the upload is empty: POST the image's bytes as the request body."),
        ((cat / "notes-as-image.jpg").read_bytes(), 415, "the upload is not a usable image: "),
        ((cat / "truncated.jpg").read_bytes(), 415, "the upload is not a usable image: "),
        ((cat / "bomb.png").read_bytes(), 415, "the upload is not a usable image: "),
        (os.urandom(60_000), 413, "the upload is 60,000 bytes, more than --max-upload-mb 0.05 allows."),
    ]
    good = next(r for r in served["predicted"])
    for data, status, error in cases:
        got_status, answer = _post(url, data)
        assert got_status == status and answer["error"].startswith(error), (answer, error)
        assert answer["error"].endswith(".") and set(answer) == {"error"}
        ok_status, ok = _post(url, open(good["path"], "rb").read())  # the next good upload still works
        assert ok_status == 200 and ok["label"] == good["predicted_label"]
    assert _post(url, None, method="GET") == (
        405,
        {"error": "POST an image's bytes (JPEG, PNG, ...) as the request body."},
    )


def _post_as(url: str, data: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _multipart(field: str, data: bytes) -> tuple[bytes, str]:
    boundary = "raytl-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.jpg"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_multipart_base64_and_batches_answer_as_predict_and_top_k_keeps_the_best(served, predict_models):
    """The same images as a multipart `file` field (as curl -F and browsers send them), as base64 JSON one
    at a time and as one batch: predict's labels and scores; ?top_k=1 keeps the best class only; OpenAPI
    at /docs and /openapi.json; bad JSON, a form without `file` and top_k=0 are one 4xx sentence each."""
    import base64

    url, rows = served["url"], served["predicted"][:6]
    uploads = [open(r["path"], "rb").read() for r in rows]
    for data, row in zip(uploads, rows, strict=True):
        status, answer = _post_as(url, *_multipart("file", data))
        assert status == 200 and answer["label"] == row["predicted_label"], answer
        assert answer["score"] == pytest.approx(row["score"], abs=1e-4)
        status, one = _post_as(
            url, json.dumps({"image": base64.b64encode(data).decode()}).encode(), "application/json"
        )
        assert status == 200 and one == answer
    images = [base64.b64encode(d).decode() for d in uploads] + [base64.b64encode(b"not an image").decode()]
    status, batch = _post_as(url, json.dumps({"images": images}).encode(), "application/json")
    assert status == 200 and [a.get("label") for a in batch["predictions"]] == [
        *(r["predicted_label"] for r in rows),
        None,
    ]
    assert batch["predictions"][-1]["error"].startswith("the upload is not a usable image: ")
    status, top = _post(url + "?top_k=1", uploads[0])
    assert status == 200 and top["scores"] == {top["label"]: top["score"]}
    for data, content_type, status, error in [
        (b"{", "application/json", 400, "the upload is not JSON: "),
        (b'{"image": "***"}', "application/json", 400, "an image in the JSON upload is not valid base64."),
        (b'{"picture": "AA=="}', "application/json", 400, 'a JSON upload is {"image": BASE64}'),
        (*_multipart("photo", b"x")[:1], _multipart("photo", b"x")[1], 400, "a multipart upload needs"),
    ]:
        got_status, answer = _post_as(url, data, content_type)
        assert got_status == status and answer["error"].startswith(error) and answer["error"].endswith(".")
    assert _post(url + "?top_k=0", uploads[0]) == (
        422,
        {"error": "top_k must be a positive integer, not '0'."},
    )
    with urllib.request.urlopen(url.rstrip("/") + "/openapi.json", timeout=60) as response:
        spec = json.loads(response.read())
    assert "post" in spec["paths"]["/"] and spec["paths"]["/"]["post"]["parameters"][0]["name"] == "top_k"
    with urllib.request.urlopen(url.rstrip("/") + "/docs", timeout=60) as response:
        assert response.status == 200 and b"swagger" in response.read().lower()


def test_chunked_uploads_are_read_only_up_to_the_limit(served):
    """Without a Content-Length (Transfer-Encoding: chunked) an upload is read until it passes
    --max-upload-mb, then refused (413): over loopback, and chunk by chunk in the replica's reader."""
    import asyncio
    import http.client
    import urllib.parse

    from raytl.commands.serve import read_upload

    url = urllib.parse.urlsplit(served["url"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    connection.request("POST", url.path or "/", body=iter([b"\0" * 20_000] * 5), encode_chunked=True)
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    limit = int(0.05 * 1024**2)
    assert response.status == 413
    assert answer == {"error": f"the upload is over {limit:,} bytes, more than --max-upload-mb 0.05 allows."}

    class Request:  # starlette's Request.stream(), counting what was pulled
        pulled = 0

        async def stream(self):
            for _ in range(1024):  # 64 MB in 64 KB chunks
                Request.pulled += 1
                yield b"\0" * 65_536

    assert asyncio.run(read_upload(Request(), 1024**2)) is None
    assert Request.pulled == 17  # 1 MB and one chunk more, not 64 MB
    assert asyncio.run(read_upload(Request(), 64 * 1024**2)) == b"\0" * 64 * 1024**2


def test_serve_options_and_models_it_cannot_serve(predict_models, tmp_path, capsys):
    model = str(predict_models / "model")
    assert_user_error(
        capsys, ["serve", model, "--replicas", "0"], "--replicas must be a count (4) or a range"
    )
    assert_user_error(
        capsys, ["serve", model, "--port", "70000"], "--port must be an integer between 1 and 65535"
    )
    assert_user_error(capsys, ["serve", model, "--max-upload-mb", "0"], "--max-upload-mb must be positive")
    assert_user_error(capsys, ["serve", str(tmp_path / "none")], "holds no raytl model")


def test_serve_yaml_deploys_as_serve_deploy_builds_it(served, predict_models):
    """serve.yaml's application, built as `serve deploy` / `serve run serve.yaml` (and KubeRay's
    serveConfigV2) build it: its import_path's builder called with its args (here the test's MODEL_DIR,
    on CPU), deployed beside the first app under /config; an upload to /config (no slash: not redirected)
    gets predict's label and score."""
    import importlib

    import yaml
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "serve.yaml")) as f:
        (app,) = yaml.safe_load(f)["applications"]
    module, name = app["import_path"].split(":")
    args = {**app["args"], "model_dir": str(predict_models / "model"), "device": "cpu", "replicas": "1"}
    builder = getattr(importlib.import_module(module), name)
    application = call_user_app_builder_with_args_if_necessary(builder, args)
    serve.run(application, name="from-config", route_prefix="/config")
    good = served["predicted"][0]
    data = open(good["path"], "rb").read()
    status, answer = _post(served["url"].rstrip("/") + "/config", data)  # the prefix itself, no 307
    assert status == 200 and answer["label"] == good["predicted_label"]
    assert answer["score"] == pytest.approx(good["score"], abs=1e-4)
    serve.delete("from-config")
