"""`m2f serve` on Ray Serve, loopback only: concurrent clients against the shipped default model on the CPU, zero
failed requests, batches larger than one seen, bad requests answered 4xx with one line while serving goes on."""
from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

pytest.importorskip("ray.serve")

CLIENTS, REQUESTS = 6, 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import ray
    from ray import serve

    from m2f.assets import default_checkpoint_path
    from m2f.serve.app import ModelSpec, build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # a long batch wait: with CLIENTS requests in flight, batches > 1 form on any machine load
        serve.run(build_app(ModelSpec(checkpoint=str(default_checkpoint_path()), threads=1), max_batch=4,
                            batch_wait_ms=200.0), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _request(url: str, body: bytes | None = None, content_type: str = "image/png") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": content_type} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _png(rng: torch.Generator, height: int = 64, width: int = 80) -> bytes:
    pixels = torch.randint(0, 256, (height, width, 3), generator=rng, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_concurrent_clients_all_succeed_and_are_batched(server, rng):
    bodies = [_png(rng) for _ in range(REQUESTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda body: _request(server + "/predict", body), bodies))
    failed = [(status, body) for status, body in answers if status != 200]
    assert not failed, f"{len(failed)} failed requests, first {failed[0]} (seed {rng.seed_value})"
    for _, body in answers:
        assert body["task"] == "panoptic" and (body["height"], body["width"]) == (64, 80)
        for segment in body["segments"]:
            assert {"label", "name", "score", "mask", "category_id"} <= segment.keys()
            assert segment["mask"]["size"] == [64, 80] and isinstance(segment["mask"]["counts"], str)
    status, meta = _request(server + "/metadata")
    sizes = {int(k): v for k, v in meta["batch_sizes"].items()}
    assert status == 200 and sum(k * v for k, v in sizes.items()) >= REQUESTS
    assert max(sizes) > 1, f"no batching: batch sizes {sizes} (seed {rng.seed_value})"
    assert _request(server + "/health") == (200, {"status": "ok"})


def test_overlay_and_multipart(server, rng):
    import base64

    body = _png(rng, 40, 56)
    status, answer = _request(server + "/predict?overlay=1", body)
    assert status == 200, answer
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
    assert overlay.size == (56, 40)
    boundary = "m2fboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    status, multipart = _request(server + "/predict", form, f"multipart/form-data; boundary={boundary}")
    assert status == 200, multipart
    assert len(multipart["segments"]) == len(answer["segments"])


@pytest.mark.parametrize("case, status, needle", [
    ("empty", 400, "empty body"),
    ("not-an-image", 415, "not an image"),
    ("truncated", 400, "truncated or corrupt"),
    ("wrong-type", 415, "content type 'text/plain'"),
    ("multipart-no-image", 400, "no file field 'image'"),
])
def test_bad_requests_get_one_line_4xx_and_serving_goes_on(server, rng, case, status, needle):
    from m2f.serve.request import MAX_UPLOAD_BYTES

    png = _png(rng)
    body, content_type = {
        "empty": (b"", "image/png"),
        "not-an-image": (b"this is text, not pixels" * 4, "image/png"),
        "truncated": (png[: len(png) // 2], "image/png"),
        "wrong-type": (png, "text/plain"),
        "multipart-no-image": (b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
                               "multipart/form-data; boundary=b"),
        "too-large": (png + bytes(MAX_UPLOAD_BYTES), "image/png"),
    }[case]
    got, answer = _request(server + "/predict", body, content_type)
    assert got == status and needle in answer["error"] and "\n" not in answer["error"], (got, answer)
    assert _request(server + "/predict", png)[0] == 200  # the replica still serves


def test_too_large_upload_is_refused_before_its_body(server, rng):
    """The declared length alone gets a 413: the server does not read a body it would refuse."""
    import http.client
    from urllib.parse import urlparse

    from m2f.serve.request import MAX_UPLOAD_BYTES

    address = urlparse(server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.putrequest("POST", "/predict")
        connection.putheader("Content-Type", "image/png")
        connection.putheader("Content-Length", str(MAX_UPLOAD_BYTES + 1))
        connection.endheaders()
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 413 and "over the limit" in answer["error"], answer
    assert _request(server + "/predict", _png(rng))[0] == 200, f"seed {rng.seed_value}"
