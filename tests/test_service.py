"""The example search service (examples/search_service/app.py) on 127.0.0.1 against the tiny models: every
route, a battery of hostile requests, slow clients, the concurrency and time limits, bounded memory, and a
short load run with bench/load.py. Also the library limits it relies on (image sizes, batched reranking)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from modelbake.runtime import clip as clip_runtime
from modelbake.runtime.models import open_models

_spec = importlib.util.spec_from_file_location("search_load", REPO / "bench" / "load.py")
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)

PROXY = "127.0.0.3"  # a proxy in front of proxied_service, on a loopback address of its own
READ_TIMEOUT = 2  # SEARCH_READ_TIMEOUT in the test service: slow clients are cut off after 2 s
COUNTS: Counter[int] = Counter()  # every status the hostile battery received


class Service:
    def __init__(self, proc: Any, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def peak_rss_mb(self) -> float:
        return load.peak_rss_mb(self.proc.pid)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+)", status, re.M)[1]) / 1024


@pytest.fixture(scope="module")
def service(built_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    log = tmp_path_factory.mktemp("search-service") / "service.log"
    proc, port = load.start_service(built_tree, log, env={"SEARCH_READ_TIMEOUT": str(READ_TIMEOUT)})
    yield Service(proc, port, log)
    load.stop_service(proc)
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-4000:]


def request(
    port: int, head: bytes, body: bytes = b"", timeout: float = 60, source: str = "127.0.0.1"
) -> tuple[int, dict[str, str], Any]:
    """Raw bytes to the service from ``source``, the reply parsed: (status, headers, decoded JSON). The body is
    not sent when the reply comes first (a 413 on the declared length), as a client honouring it would."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(head)
        for i in range(0, len(body), 65536):
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(body[i : i + 65536])
            except (BrokenPipeError, ConnectionResetError):
                break
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
    assert response.getheader("content-type") == "application/json", (response.status, data[:300])
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data)


def post(path: str, body: bytes, *, headers: str = "", length: int | None = None) -> tuple[bytes, bytes]:
    length = len(body) if length is None else length
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
    return (head + headers + "Connection: close\r\n\r\n").encode(), body


def doc(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def png(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode in ("L", "1") else (height, width, 3)
    image = Image.new(mode, (width, height)) if mode == "1" else Image.fromarray(rng.integers(0, 256, shape, np.uint8))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def many_scans(scans: int, width: int = 2000, height: int = 2000) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has ``scans``: each repeat is a few bytes, and a
    decoder would run every one over the whole image (the 'progressive JPEG bomb')."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data[data.rindex(b"\xff\xda") : -2]  # from the last start-of-scan to the end-of-image marker
    return data[:-2] + last * (scans - data.count(b"\xff\xda")) + data[-2:]


def _chunked_over_the_limit() -> tuple[bytes, bytes]:
    head = b"POST /embed/text HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head, (b"10000\r\n" + b"x" * 65536 + b"\r\n") * 80  # 5 MiB, no Content-Length to refuse it by


def _get(path: str, headers: str = "", method: str = "GET") -> tuple[bytes, bytes]:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode(), b""


def _image(data: bytes | str) -> tuple[bytes, bytes]:
    return post("/embed/image", doc({"images": [data if isinstance(data, str) else b64(data)]}))


# (name, the request (head, body), expected status, a piece of the error message). Built when a case runs,
# so collecting the tests costs nothing.
HOSTILE: list[tuple[str, Callable[[], tuple[bytes, bytes]], int, str]] = [
    # Not JSON.
    ("malformed JSON", lambda: post("/embed/text", b'{"texts": ["a dog"'), 400, "Invalid JSON"),
    ("empty body", lambda: post("/rank", b""), 400, "Invalid JSON"),
    ("not UTF-8", lambda: post("/embed/text", b'{"texts": ["\xff\xfe"]}'), 400, "Invalid JSON"),
    ("deep arrays", lambda: post("/embed/text", b'{"texts":' + b"[" * 10**5 + b"]" * 10**5 + b"}"), 400, "recursion"),
    ("deep objects", lambda: post("/boundaries", b'{"a":' * 50_000 + b"1" + b"}" * 50_000), 400, "recursion"),
    # Valid JSON, wrong shape or type.
    ("texts a string", lambda: post("/embed/text", doc({"texts": "a dog"})), 422, "valid array"),
    ("texts of numbers", lambda: post("/embed/text", doc({"texts": [1, 2]})), 422, "valid string"),
    ("top-level array", lambda: post("/embed/text", doc(["a dog"])), 422, "body: Input should be an object"),
    ("missing field", lambda: post("/rank", doc({"passages": ["a"]})), 422, "query: Field required"),
    ("unknown field", lambda: post("/rank", doc({"query": "q", "passages": [], "passage": []})), 422, "Extra input"),
    ("query a number", lambda: post("/rank", doc({"query": 5, "passages": ["a"]})), 422, "valid string"),
    ("top_k a string", lambda: post("/rank", doc({"query": "q", "passages": ["a"], "top_k": "2"})), 422, "top_k"),
    ("top_k true", lambda: post("/rank", doc({"query": "q", "passages": ["a"], "top_k": True})), 422, "top_k"),
    ("top_k 0", lambda: post("/rank", doc({"query": "q", "passages": ["a"], "top_k": 0})), 422, "greater than"),
    ("features a string", lambda: post("/boundaries", doc({"features": "x"})), 422, "valid array"),
    ("features of strings", lambda: post("/boundaries", doc({"features": [["0.1"] * 32]})), 422, "valid number"),
    ("features NaN", lambda: post("/boundaries", b'{"features": [[NaN]]}'), 422, "finite number"),
    ("features ragged", lambda: post("/boundaries", doc({"features": [[0.1] * 32, [0.1] * 31]})), 422, "same length"),
    ("features wrong size", lambda: post("/boundaries", doc({"features": [[0.1] * 5]})), 422, "shape (n, 32)"),
    ("features empty", lambda: post("/boundaries", doc({"features": []})), 422, "shape (n, 32)"),
    ("features 1e308", lambda: post("/boundaries", doc({"features": [[1e308] * 32]})), 422, "NaN or inf"),
    # Finite as float32, and the model's output is not: never a reply of nulls.
    ("features near float32's max", lambda: post("/boundaries", doc({"features": [[3e38] * 32]})), 422, "NaN or inf"),
    # Counts and lengths.
    ("1M one-char texts", lambda: post("/embed/text", doc({"texts": ["a"] * 10**6})), 422, "at most 256 items"),
    ("257 texts", lambda: post("/embed/text", doc({"texts": ["a"] * 257})), 422, "at most 256 items"),
    ("257 passages", lambda: post("/rank", doc({"query": "q", "passages": ["a"] * 257})), 422, "at most 256"),
    ("257 feature rows", lambda: post("/boundaries", doc({"features": [[0.1] * 32] * 257})), 422, "at most 256"),
    ("a feature row of 4097", lambda: post("/boundaries", doc({"features": [[0.1] * 4097]})), 422, "at most 4096"),
    ("a text of 4097 chars", lambda: post("/embed/text", doc({"texts": ["x" * 4097]})), 422, "at most 4096 char"),
    ("a query of 1M chars", lambda: post("/rank", doc({"query": "x" * 10**6, "passages": []})), 422, "at most 4096"),
    ("a passage of 4097", lambda: post("/rank", doc({"query": "q", "passages": ["x" * 4097]})), 422, "at most 4096"),
    # Body sizes and HTTP framing.
    ("body over 4 MiB", lambda: post("/embed/text", doc({"texts": ["ab" * 2000] * 1100})), 413, "MAX_BODY_BYTES"),
    ("Content-Length 10**15", lambda: post("/embed/text", b"{}", length=10**15), 413, "SEARCH_MAX_BODY_BYTES"),
    ("Content-Length -1", lambda: post("/embed/text", b"{}", length=-1), 400, "not a valid HTTP"),
    ("Content-Length abc", lambda: _get("/rank", "Content-Length: abc\r\n", "POST"), 400, "not a valid HTTP"),
    ("two Content-Lengths", lambda: post("/rank", b"{}", headers="Content-Length: 7\r\n"), 400, "not a valid HTTP"),
    ("chunked over 4 MiB", _chunked_over_the_limit, 413, "SEARCH_MAX_BODY_BYTES"),
    ("headers over 16 KiB", lambda: _get("/models", f"X-Big: {'a' * 20000}\r\n"), 431, "headers over 16384"),
    ("many headers", lambda: _get("/models", "X-A: b\r\n" * 5000), 431, "headers over 16384"),
    ("a URL of 20 kB", lambda: _get("/" + "a" * 20000), 414, "URL over 8192"),
    ("a query string of 20 kB", lambda: _get("/models?" + "a" * 20000), 414, "URL over 8192"),
    ("garbage request line", lambda: (b"HELLO THERE\r\n\r\n", b""), 400, "not a valid HTTP"),
    ("binary junk", lambda: (bytes(range(256)) * 4, b""), 400, "not a valid HTTP"),
    # Images.
    ("a bomb image", lambda: _image(png(20000, 20000, "1")), 422, "over the limit of 25000000 pixels"),
    ("a 100000x1 image", lambda: _image(png(100000, 1, "L")), 422, "aspect ratio of 100000:1"),
    ("a JPEG of 6000 scans", lambda: _image(many_scans(6000)), 422, "a JPEG of 6000 scans is over the limit of 100"),
    ("a truncated PNG", lambda: _image(png(64, 48)[:1500]), 422, "images[0]: cannot decode"),
    ("a truncated JPEG", lambda: _image(jpeg(64, 48)[:400]), 422, "images[0]"),
    ("a PNG header alone", lambda: _image(png(64, 48)[:40]), 422, "images[0]"),
    ("not base64", lambda: _image("not base64!"), 422, "images[0]: not base64"),
    ("base64 of text", lambda: _image(b"hello world"), 422, "images[0]: not a PNG"),
    ("a TIFF", lambda: _image(tiff()), 422, "images[0]: not a PNG"),
    ("images a string", lambda: post("/embed/image", doc({"images": b64(png(8, 8))})), 422, "valid array"),
    ("17 images", lambda: post("/embed/image", doc({"images": [b64(png(8, 8))] * 17})), 422, "at most 16 items"),
    ("4M tiny values", lambda: post("/embed/image", b'{"images":[' + b"1," * 4 * 10**6 + b"1]}"), 422, "MAX_IMAGES"),
    ("image body over 16 MiB", lambda: _image("A" * 17 * 2**20), 413, "SEARCH_MAX_IMAGE_BODY_BYTES"),
    # Routes and methods.
    ("unknown route", lambda: _get("/nope"), 404, "no route /nope"),
    ("POST to an unknown route", lambda: post("/embed", doc({"texts": []})), 404, "no route /embed"),
    ("dot segments", lambda: _get("/embed/../models/.."), 404, "no route"),
    ("GET a POST route", lambda: _get("/embed/text"), 405, "Method Not Allowed"),
    ("DELETE /models", lambda: _get("/models", method="DELETE"), 405, "Method Not Allowed"),
    ("an unknown method", lambda: _get("/models", method="BREW"), 405, "Method Not Allowed"),
]


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    return buf.getvalue()


def test_every_route_answers(service: Service) -> None:
    port = service.port
    status, _, body = request(port, b"GET /models HTTP/1.1\r\nHost: t\r\n\r\n")
    variants, engines, why = body.pop("variants"), body.pop("engines"), body.pop("why")
    assert status == 200 and body == {"clip": {"tiny-vit": 32, "tiny-rn": 32}, "reranker": True, "regressor": True}
    assert set(variants["clip"]["tiny-vit"]) == {"text_encoder", "image_encoder"}
    assert variants["regressor"] == {"boundary_regressor": {"regressor": "fp32"}}
    assert {v for roles in variants["clip"].values() for v in roles.values()} <= {"fp32", "int8"}
    assert engines["clip"]["tiny-vit"] == {role: f"onnxruntime/{v}" for role, v in variants["clip"]["tiny-vit"].items()}
    # why each runs what it runs, starting with its name (built here, so the build's table decides)
    assert all(w.startswith(f"{variants['clip']['tiny-vit'][r]}: ") for r, w in why["clip"]["tiny-vit"].items())
    status, _, body = request(port, *post("/embed/text", doc({"texts": ["a dog", "x" * 4096, ""]})))
    assert status == 200 and np.asarray(body["embeddings"]).shape == (3, 32)
    status, _, body = request(port, *post("/embed/text", doc({"texts": []})))
    assert status == 200 and body == {"embeddings": []}
    images = [b64(png(64, 48)), b64(jpeg(33, 71)), b64(png(1, 256, "L"))]  # the last at the aspect limit
    status, _, body = request(port, *post("/embed/image", doc({"images": images})))
    assert status == 200 and np.asarray(body["embeddings"]).shape == (3, 32)
    passages = ["a dog runs", "a car", *(f"passage {i}" for i in range(40))]  # several batches of 16
    status, _, body = request(port, *post("/rank", doc({"query": "a dog", "passages": passages, "top_k": 3})))
    assert status == 200 and len(body["ranking"]) == 3
    status, _, full = request(port, *post("/rank", doc({"query": "a dog", "passages": passages})))
    assert status == 200 and sorted(i for i, _ in full["ranking"]) == list(range(len(passages)))
    assert full["ranking"][:3] == body["ranking"]
    status, _, body = request(port, *post("/boundaries", doc({"features": [[0.1] * 32, [0.2] * 32]})))
    assert status == 200 and np.asarray(body["deltas"]).shape == (2, 2)


def test_the_embeddings_are_the_librarys(service: Service, built_tree: Path) -> None:
    clip = open_models(built_tree).default_clip  # the variant the service runs (auto)
    texts = [f"text {i}" for i in range(20)]
    _, _, body = request(service.port, *post("/embed/text", doc({"texts": texts})))
    # In the service's batches of 16: a dynamic-int8 graph quantises activations per call, so its output
    # for a text moves (cosine > 0.99) with the other texts of the batch; fp32 would not care.
    library = np.concatenate([clip.encode_text(texts[:16]), clip.encode_text(texts[16:])])
    np.testing.assert_allclose(body["embeddings"], library, atol=1e-6)
    data = png(90, 40, seed=3)
    _, _, body = request(service.port, *post("/embed/image", doc({"images": [b64(data)]})))
    np.testing.assert_allclose(body["embeddings"], clip.encode_image([Image.open(io.BytesIO(data))]), atol=1e-6)


@pytest.mark.parametrize(("name", "make", "expected", "message"), HOSTILE, ids=[case[0] for case in HOSTILE])
def test_a_hostile_request_gets_its_status(
    service: Service, name: str, make: Callable[[], tuple[bytes, bytes]], expected: int, message: str
) -> None:
    status, _, reply = request(service.port, *make())
    COUNTS[status] += 1
    assert status == expected, reply
    assert isinstance(reply.get("error"), str) and message in reply["error"], reply


def _stalled(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``data`` and then nothing; (status, reply) once the service answered and closed. A service that
    waited for the client would never answer: the client's own 60 s timeout then fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        if data:
            sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        reply = json.loads(response.read())
        closed = sock.recv(1) == b""  # the service closed the connection after its reply
    assert closed
    return response.status, reply


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"".join(post("/rank", b'{"q', length=100)), id="headers, then a stalled body"),
        pytest.param(b"POST /embed/te", id="half a request line"),
        pytest.param(b"POST /rank HTTP/1.1\r\nHost: t\r\nContent-Le", id="headers without their end"),
        pytest.param(b"", id="nothing at all"),
    ],
)
def test_a_slow_client_is_cut_off(service: Service, data: bytes) -> None:
    status, reply = _stalled(service.port, data)
    COUNTS[status] += 1
    assert status == 408 and "not received within 2 s" in reply["error"], reply


def test_a_trickling_client_is_cut_off_all_the_same(service: Service) -> None:
    """One header byte every 0.3 s: the deadline counts from the first byte, so trickling does not extend it."""
    line = b"GET /models HTTP/1.1\r\nX-Slow: " + b"a" * 200
    sent = 0
    with socket.create_connection(("127.0.0.1", service.port), timeout=60) as sock:
        for byte in line:
            if select.select([sock], [], [], 0.3)[0]:
                break  # the service answered while the client was still sending
            sock.sendall(bytes([byte]))
            sent += 1
        response = http.client.HTTPResponse(sock)
        response.begin()
        reply = json.loads(response.read())
    COUNTS[response.status] += 1
    assert response.status == 408, reply
    assert sent < len(line), "the trickle was let through to its end"


def test_the_service_stays_healthy_and_its_memory_bounded(service: Service) -> None:
    """After the battery above: /models answers, a real request works, nothing leaked into the log, and the
    server's peak RSS stayed under 1 GB. The bound: the process with the tiny models is about 200 MB; the
    largest transient the limits allow is parsing one 4 MiB body of one-character values (about 130 MB,
    bodies are parsed one at a time) or 16 MiB of base64 (its text, bytes and one decoded image under
    25 M pixels, under 200 MB); the bomb (400 M pixels, 1.2 GB as RGB) is refused from its header."""
    status, _, body = request(service.port, b"GET /models HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 200 and body["reranker"] is True
    status, _, body = request(service.port, *post("/rank", doc({"query": "a dog", "passages": ["a dog", "a car"]})))
    assert status == 200 and len(body["ranking"]) == 2
    peak, now = service.peak_rss_mb(), service.rss_mb()
    total = sum(COUNTS.values())
    statuses = dict(sorted(COUNTS.items()))
    print(f"\nhostile battery: {total} requests, statuses {statuses}; server RSS {now:.0f} MB, peak {peak:.0f} MB")
    assert peak < 1024, peak
    log = service.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_a_load_run_has_no_errors(service: Service) -> None:
    result = load.run_load(service.port, requests=200, concurrency=16, max_seconds=300)
    rate, p50, p99 = result["throughput_rps"], result["p50_ms"], result["p99_ms"]
    print(f"\nload: {result['done']} requests, {rate:.1f} req/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    assert result["errors"] == 0 and result["not_run"] == 0, result["first_errors"]


@pytest.fixture(scope="module")
def tight_service(built_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    """A second instance with tight limits: 2 requests in progress, 8 s to read, 5 ms of model work."""
    log = tmp_path_factory.mktemp("search-service-tight") / "service.log"
    env = {"SEARCH_MAX_CONCURRENCY": "2", "SEARCH_READ_TIMEOUT": "8", "SEARCH_REQUEST_TIMEOUT": "0.005"}
    proc, port = load.start_service(built_tree, log, env=env)
    yield Service(proc, port, log)
    load.stop_service(proc)


def test_requests_beyond_the_concurrency_limit_get_503(tight_service: Service) -> None:
    port = tight_service.port
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(2)]
    try:
        for sock in stalled:  # two requests in progress: their bodies never come
            sock.sendall(b"".join(post("/rank", b"{", length=50)))
        end = time.monotonic() + 6
        while True:  # until both have reached the service (a loaded machine may take a moment)
            status, headers, reply = request(port, b"GET /models HTTP/1.1\r\nHost: t\r\n\r\n")
            if status == 503 or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert status == 503 and reply["error"].startswith("busy") and headers["retry-after"] == "1", reply
        for sock in stalled:  # cut off after SEARCH_READ_TIMEOUT
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 408
    finally:
        for sock in stalled:
            sock.close()
    assert request(port, b"GET /models HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200


def test_model_work_over_the_request_timeout_gets_503(tight_service: Service) -> None:
    passages = [f"passage {i} " * 50 for i in range(256)]
    status, headers, reply = request(tight_service.port, *post("/rank", doc({"query": "q", "passages": passages})))
    assert status == 503 and "SEARCH_REQUEST_TIMEOUT" in reply["error"] and headers["retry-after"] == "1", reply
    time.sleep(0.5)  # the abandoned job stops at its next batch and frees its slot
    assert request(tight_service.port, b"GET /models HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200


def test_the_image_pins_match_the_wheelhouse_set() -> None:
    """The image installs examples/search_service/requirements.txt (its build context cannot reach build/);
    the wheelhouse and the dev venv get build/requirements-example.txt: the same pins, and pip, which the
    image's build stage runs from its wheel."""

    def pins(path: Path) -> list[str]:
        lines = (line.strip() for line in path.read_text().splitlines())
        return sorted(line for line in lines if line and not line.startswith("#"))

    example = pins(REPO / "build" / "requirements-example.txt")
    image = pins(REPO / "examples" / "search_service" / "requirements.txt")
    assert [line for line in example if not line.startswith("pip==")] == image
    assert any(line.startswith("pip==") for line in example) and not any(line.startswith("pip==") for line in image)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", line) for line in example), example
    assert "-r requirements-example.txt" in pins(REPO / "build" / "requirements-dev.txt")


# The library limits the service relies on.


@pytest.mark.parametrize(
    "image, limit",
    [
        (np.zeros((1, 100_000), np.uint8), "aspect ratio of 100000:1, over the limit of 256:1"),
        (np.zeros((0, 5, 3), np.uint8), "at least one pixel"),
        (Image.new("L", (300, 1)), "aspect ratio of 300:1"),
        (Image.new("1", (10_000, 8_000)), "80000000 pixels is over the limit of 64000000 pixels"),
    ],
    ids=["array-strip", "array-empty", "pil-strip", "pil-80M"],
)
def test_preprocess_image_refuses_extreme_shapes(built_tree: Path, image: Any, limit: str) -> None:
    cfg = open_models(built_tree).default_clip.preprocessing
    with pytest.raises(ValueError, match=re.escape(limit)):
        clip_runtime.preprocess_image(image, cfg)


def test_preprocess_image_refuses_a_bomb_from_its_header(built_tree: Path, tmp_path: Path) -> None:
    cfg = open_models(built_tree).default_clip.preprocessing
    bomb = png(20000, 20000, "1")  # 400 M pixels in a file of about 50 kB; PIL's own limit is 179 M
    assert len(bomb) < 200_000
    (tmp_path / "bomb.png").write_bytes(bomb)
    for source in (tmp_path / "bomb.png", str(tmp_path / "bomb.png"), bomb):
        with pytest.raises(ValueError, match="over the limit of 64000000 pixels"):
            clip_runtime.preprocess_image(source, cfg)
    small = png(9000, 8000, "1")  # 72 M pixels: under PIL's limit, over ours
    with pytest.raises(ValueError, match="72000000 pixels is over the limit of 64000000"):
        clip_runtime.preprocess_image(small, cfg)
    with pytest.raises(ValueError, match="over the limit of 1000 pixels"):
        clip_runtime.preprocess_image(png(40, 30), cfg, max_pixels=1000)
    with pytest.raises(ValueError, match=r"aspect ratio of 4:1, over the limit of 3:1"):
        clip_runtime.preprocess_image(png(40, 10), cfg, max_aspect_ratio=3)
    with pytest.raises(ValueError, match="cannot decode the image"):
        clip_runtime.preprocess_image(png(40, 30)[:60], cfg)


def test_encoded_bytes_preprocess_as_the_image_does(built_tree: Path) -> None:
    cfg = open_models(built_tree).default_clip.preprocessing
    for data in (png(64, 48), png(1, 256, "L"), jpeg(33, 71)):
        np.testing.assert_array_equal(
            clip_runtime.preprocess_image(data, cfg), clip_runtime.preprocess_image(Image.open(io.BytesIO(data)), cfg)
        )


def test_reranker_scores_are_the_same_in_any_batch_size(built_tree: Path) -> None:
    # fp32: dynamic int8 quantises activations per run, so its scores move a little with the batch's content
    reranker = open_models(built_tree, variant="fp32").reranker
    passages = [f"passage {i} " * (i % 9 + 1) for i in range(50)]
    whole = reranker.score("a query", passages, batch_size=len(passages))
    for size in (1, 7, 32):
        np.testing.assert_allclose(reranker.score("a query", passages, batch_size=size), whole, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        reranker.score("q", passages, batch_size=0)


def _import_app(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import app"],
        cwd=REPO / "examples" / "search_service",
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-2"])
def test_a_limit_that_is_not_a_finite_positive_number_is_refused_at_start(value: str) -> None:
    """SEARCH_MAX_ASPECT_RATIO=nan once passed the "<= 0" check (nan compares false) and let a 100000x1
    strip through; every limit must be finite and above 0, said at start with the variable's name."""
    proc = _import_app({"SEARCH_MAX_ASPECT_RATIO": value})
    assert proc.returncode == 1 and f"SEARCH_MAX_ASPECT_RATIO={value!r}: give a finite number above 0" in proc.stderr


def test_a_trusted_proxy_that_is_not_an_address_is_refused_at_start() -> None:
    # uvicorn takes any other word for a unix socket's name: "10.0.0.0/33" or "ingress" would trust nobody.
    proc = _import_app({"SEARCH_TRUSTED_PROXIES": "10.0.0.7, 10.0.0.0/33"})
    assert proc.returncode == 1, proc.stderr
    assert "SEARCH_TRUSTED_PROXIES='10.0.0.7, 10.0.0.0/33': '10.0.0.0/33' is not an address or a network" in proc.stderr
    assert _import_app({"SEARCH_TRUSTED_PROXIES": "*"}).returncode == 0
    assert _import_app({"SEARCH_TRUSTED_PROXIES": ""}).returncode == 0


def test_a_jpeg_of_many_scans_is_refused_before_it_is_decoded() -> None:
    """Through the library alone: 3,000 extra scans in a 2000x2000 file once took 6.7-8.2 s to decode; the
    scan count is read from the bytes first. A normal progressive JPEG (10 scans) still decodes."""
    cfg = {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    bomb = many_scans(3000)
    assert len(bomb) < 200_000
    with pytest.raises(ValueError, match=r"a JPEG of 3000 scans is over the limit of 100 "):
        clip_runtime.preprocess_image(bomb, cfg)
    assert clip_runtime.preprocess_image(many_scans(10, 64, 64), cfg).shape == (3, 32, 32)


@pytest.fixture(scope="module")
def send_bound_service(built_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    """An instance whose replies may wait 2 s for a client that does not read them; 4 requests in progress,
    2 of them from one client."""
    log = tmp_path_factory.mktemp("search-service-send") / "service.log"
    env = {"SEARCH_MAX_CONCURRENCY": "4", "SEARCH_MAX_PER_CLIENT": "2", "SEARCH_SEND_TIMEOUT": "2"}
    proc, port = load.start_service(built_tree, log, env=env)
    yield Service(proc, port, log)
    load.stop_service(proc)


def _never_reading(port: int) -> socket.socket:
    """A client that sends three pipelined requests with large replies and never reads (a small receive buffer,
    set before it connects, so the replies back up into the service)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    texts = doc({"texts": ["a dog runs on the beach " * 100] * 256})
    head = f"POST /embed/text HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(texts)}"
    with contextlib.suppress(OSError):  # refused at once (its client's limit) and closed while it still sends
        sock.sendall(((head + "\r\n\r\n").encode() + texts) * 3)
    return sock


def test_clients_that_never_read_lose_their_slots_and_probes_are_answered_meanwhile(
    send_bound_service: Service,
) -> None:
    """16 sockets of 3 pipelined requests each, never read, once held every slot for good: a fresh GET /models
    got 503 busy at 3 s and at 33 s, and Kubernetes probes on /models restarted the pod. Now /healthz answers
    outside the limit, and each reply waits at most SEARCH_SEND_TIMEOUT before its connection is dropped."""
    port = send_bound_service.port
    abusers = [_never_reading(port) for _ in range(16)]
    try:
        end = time.monotonic() + 30
        while True:  # until the abusers hold every slot
            status, _, reply = request(port, b"GET /models HTTP/1.1\r\nHost: t\r\n\r\n")
            if status == 503 or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert status == 503 and reply["error"].startswith("busy"), reply
        status, _, reply = request(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (status, reply) == (200, {"status": "ok"})
        end = time.monotonic() + 60
        while request(port, b"GET /models HTTP/1.1\r\nHost: t\r\n\r\n")[0] != 200 and time.monotonic() < end:
            time.sleep(0.2)
        # the abusers' connections were dropped (reset or closed), not kept waiting with their replies
        for sock in abusers:
            sock.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(1 << 20):
                    pass
    finally:
        for sock in abusers:
            sock.close()
    assert request(port, b"GET /models HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200
    log = send_bound_service.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_one_abusive_client_and_the_others_are_still_served(send_bound_service: Service) -> None:
    """A client (its own loopback address) keeps 16 connections of large pipelined requests that never read
    their replies; beside it a well-behaved client gets no error at all: the abuser holds at most
    SEARCH_MAX_PER_CLIENT slots (2 here), each for at most SEARCH_SEND_TIMEOUT. Its latency is printed, never
    asserted (bench/load.py --abuse gives the figures)."""
    result = load.run_beside_abuse(send_bound_service.port, requests=60, concurrency=2, max_seconds=300)
    print(f"\nbeside an abusive client: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, {result}")
    assert result["abusive_connections"] >= 16
    assert result["errors"] == 0 and result["not_run"] == 0, result["first_errors"]


@pytest.fixture(scope="module")
def proxied_service(built_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    """An instance behind PROXY, not loopback as by default: 2 requests in progress per client."""
    log = tmp_path_factory.mktemp("search-service-proxied") / "service.log"
    env = {"SEARCH_MAX_PER_CLIENT": "2", "SEARCH_TRUSTED_PROXIES": f"192.0.2.0/24, {PROXY}"}
    env["MODELBAKE_THREADS"] = "3"  # and threads asked for (test_the_model_workers_share_the_cpus_granted)
    proc, port = load.start_service(built_tree, log, env=env)
    yield Service(proc, port, log)
    load.stop_service(proc)


def test_the_model_workers_share_the_cpus_granted(service: Service, proxied_service: Service) -> None:
    """Each engine would size its pool to every core, and two model calls at once then served 1.2-1.5x fewer
    requests than with the CPUs shared out (bench/README). MODELBAKE_THREADS, when set, is the threads per
    call as asked."""
    pattern = r"model calls at once: (\d+); engine threads per call: (\d+); CPUs granted: (\d+)"
    workers, threads, cpus = map(int, re.search(pattern, service.log.read_text()).groups())
    assert workers == 2 and 1 <= cpus <= (os.cpu_count() or 1) and threads == max(1, cpus // workers)
    workers, threads, _ = map(int, re.search(pattern, proxied_service.log.read_text()).groups())
    assert (workers, threads) == (2, 3)


def test_a_trusted_proxys_clients_are_each_their_own_client(proxied_service: Service) -> None:
    """Behind a proxy every client has the proxy's address: SEARCH_MAX_PER_CLIENT and the turns took them all
    for one. The service now reads X-Forwarded-For from SEARCH_TRUSTED_PROXIES and from no one else. A
    client holds its 2 slots with requests whose bodies do not come; then others ask."""
    port = proxied_service.port

    def models(source: str, forwarded_for: str | None = None) -> tuple[int, str]:
        extra = "" if forwarded_for is None else f"X-Forwarded-For: {forwarded_for}\r\n"
        status, _, reply = request(port, f"GET /models HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode(), source=source)
        return status, reply.get("error", "")

    def first_but(status: int, source: str, forwarded_for: str) -> tuple[int, str]:
        """The first answer other than ``status`` (the service sees held requests come and go a little late)."""
        end = time.monotonic() + 30
        while (seen := models(source, forwarded_for))[0] == status and time.monotonic() < end:
            time.sleep(0.05)
        return seen

    @contextlib.contextmanager
    def two_held(source: str, forwarded_for: str) -> Iterator[None]:
        """Two requests in progress from ``source`` saying ``forwarded_for``, until the block ends."""
        head, _ = post("/rank", b"", length=100, headers=f"X-Forwarded-For: {forwarded_for}\r\n")
        with contextlib.ExitStack() as stack:
            for _ in range(2):
                sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), 60, (source, 0)))
                sock.sendall(head + b'{"q')
            yield
        first_but(503, source, forwarded_for)  # until the service has seen them go

    with two_held(PROXY, "10.1.1.1"):
        seen = first_but(200, PROXY, "10.1.1.1")  # once both are in progress
        assert seen[0] == 503 and "of this client" in seen[1], seen
        assert models(PROXY, "10.2.2.2")[0] == 200  # another client behind the same proxy
        assert models(PROXY, "10.1.1.1, 10.2.2.2")[0] == 200  # the peer the proxy saw, not what it was told
        assert models(PROXY)[0] == 200  # the proxy's own request
    # A peer that is not trusted (loopback, here) cannot pass for other clients: its header is not read.
    with two_held("127.0.0.1", "10.3.3.3"):
        seen = first_but(200, "127.0.0.1", "10.4.4.4")
        assert seen[0] == 503 and "of this client" in seen[1], seen
        assert models(PROXY, "10.3.3.3")[0] == 200


@pytest.fixture(scope="module")
def one_worker_service(built_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    """An instance with one model worker, so that the order in which model calls are granted is the order
    in which replies come."""
    log = tmp_path_factory.mktemp("search-service-one") / "service.log"
    proc, port = load.start_service(built_tree, log, env={"SEARCH_WORKERS": "1"})
    yield Service(proc, port, log)
    load.stop_service(proc)


def test_a_client_with_many_large_jobs_queued_does_not_hold_back_another(one_worker_service: Service) -> None:
    """One client (127.0.0.2) sends 8 large /embed/text jobs (16 model calls each); then another sends one
    text. Model calls were once granted first come, first served, so the small request waited for every large
    job before it (3.2 s at the median in bench/load.py --abuse); they are now granted to clients in turn, so
    it waits for about one call. Asserted by the order of the replies, never by time."""
    port, order, lock = one_worker_service.port, [], threading.Lock()
    heavy = doc({"texts": ["a dog runs on the beach " * 100] * 256})

    def send(name: str, source: str, body: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=300, source_address=(source, 0)) as sock:
            sock.sendall(b"".join(post("/embed/text", body)))
            response = http.client.HTTPResponse(sock)
            response.begin()
            response.read()
        with lock:
            order.append((name, response.status))

    large = [threading.Thread(target=send, args=(f"large{i}", load.ABUSER, heavy)) for i in range(8)]
    for thread in large:
        thread.start()
    time.sleep(0.3)  # the large jobs are in (were one still on its way, it would queue behind the small one)
    started = time.monotonic()
    send("small", "127.0.0.1", doc({"texts": ["a dog"]}))
    waited = time.monotonic() - started
    for thread in large:
        thread.join()
    print(f"\nreplies in order: {order}; the small request took {waited * 1e3:.0f} ms")
    assert all(status == 200 for _, status in order), order
    assert [name for name, _ in order].index("small") == 0, order


def _app_module() -> Any:
    """examples/search_service/app.py imported in this process (its limits at their defaults)."""
    spec = importlib.util.spec_from_file_location("search_app", load.APP)
    app = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = app  # its dataclasses look their module up
    spec.loader.exec_module(app)
    return app


def test_a_reply_holds_the_float32_values_of_any_array_and_never_a_nan() -> None:
    """orjson writes C-contiguous float32 arrays itself, as the shortest text of each float32; anything else
    (a transpose, a slice, a numpy scalar) goes through .tolist(); a NaN or an inf stops the reply."""
    app = _app_module()
    values = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    doc = {"a": values, "t": values.T, "s": values[:, 1:], "x": values[0, 0]}
    back = json.loads(app.json_bytes(doc, values))
    for name, want in (("a", values), ("t", values.T), ("s", values[:, 1:]), ("x", values[0, 0])):
        assert np.array_equal(np.asarray(back[name], np.float32), want), name
    assert len(app.json_bytes({"a": values}, values)) < len(json.dumps({"a": values.tolist()}))
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            app.json_bytes({"a": values}, np.array([1.0, bad], np.float32))


def test_turns_go_round_the_clients_and_a_call_out_of_time_leaves_the_queue() -> None:
    """The scheduler alone, in this process: one slot held; client a queues two calls, b one, c one with a
    short deadline. c gets OutOfTime without a turn and leaves the queue; the slot then goes a, b, a."""
    app = _app_module()
    turns, order, far = app.Turns(1), [], time.monotonic() + 60

    def call(client: str, name: str, deadline: float) -> None:
        try:
            with turns.turn(client, deadline):
                order.append(name)
        except app.OutOfTime:
            order.append(f"{name} out of time")

    held = turns.turn("a", far)
    held.__enter__()
    threads = []
    for client, name, seconds in [("a", "a1", 60), ("a", "a2", 60), ("b", "b1", 60), ("c", "c1", 0.2)]:
        threads.append(threading.Thread(target=call, args=(client, name, time.monotonic() + seconds)))
        threads[-1].start()
        while turns.waiting < len(threads) and not order:  # queued in this order
            time.sleep(0.001)
    threads[-1].join()
    assert order == ["c1 out of time"] and turns.waiting == 3
    held.__exit__(None, None, None)
    for thread in threads:
        thread.join()
    assert order == ["c1 out of time", "a1", "b1", "a2"] and turns.waiting == 0
    with turns.turn("d", far):  # the slot is free again: granted at once
        assert turns.waiting == 0
