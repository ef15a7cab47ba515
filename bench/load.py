#!/usr/bin/env python3
"""A bounded load run against the example search service on loopback: throughput, latency, errors.

Mixed requests (GET /models, POST /embed/text, /embed/image, /rank and /boundaries, each with a random
small batch from a fixed seed) from ``--concurrency`` threads, each with its own keep-alive connection
(http.client), until ``--requests`` are done or ``--max-seconds`` have passed. Any status but 200, and any
connection error, counts as an error. Only 127.0.0.1 is ever contacted.

    python bench/load.py --models DIR [--requests 2000] [--concurrency 16]   # starts the service on a free port
    python bench/load.py --port 8080 [...]                                   # a service already on 127.0.0.1
    python bench/load.py --models DIR --abuse [...]   # the same run alone, then beside an abusive client

--abuse: a second client, from its own loopback address (127.0.0.2), keeps 16 connections open that send three
large pipelined requests each and never read a reply; the well-behaved run's figures are printed without and
with it side by side.

With --models it starts examples/search_service/app.py with this Python (which needs the run-time set and
build/requirements-example.txt), SEARCH_* variables from the environment, and stops it at the end.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
APP = Path(__file__).resolve().parents[1] / "examples" / "search_service" / "app.py"
WORDS = "a dog runs on the beach red car in rain man opens door cat sleeps under table".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24)))


def _png(rng: random.Random, width: int, height: int) -> str:
    from PIL import Image

    pixels = bytes(rng.getrandbits(8) for _ in range(width * height * 3))
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_requests(n: int, feature_dim: int, seed: int = 0) -> list[tuple[str, str, bytes | None]]:
    """``n`` mixed requests (method, path, body), the same for the same seed."""
    rng = random.Random(seed)
    images = [_png(rng, w, h) for w, h in ((64, 48), (32, 96), (120, 120))]
    out: list[tuple[str, str, bytes | None]] = []
    for _ in range(n):
        kind = rng.choices(["models", "text", "image", "rank", "boundaries"], weights=[1, 3, 2, 3, 1])[0]
        if kind == "models":
            out.append(("GET", "/models", None))
            continue
        if kind == "text":
            path, doc = "/embed/text", {"texts": [_sentence(rng) for _ in range(rng.randint(1, 8))]}
        elif kind == "image":
            path, doc = "/embed/image", {"images": [rng.choice(images) for _ in range(rng.randint(1, 4))]}
        elif kind == "rank":
            passages = [_sentence(rng) for _ in range(rng.randint(2, 32))]
            path, doc = "/rank", {"query": _sentence(rng), "passages": passages, "top_k": rng.randint(1, 5)}
        else:
            rows = [[rng.uniform(-1, 1) for _ in range(feature_dim)] for _ in range(rng.randint(1, 8))]
            path, doc = "/boundaries", {"features": rows}
        out.append(("POST", path, json.dumps(doc).encode()))
    return out


def _get_json(port: int, path: str, timeout: float = 10) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def run_load(
    port: int, requests: int = 2000, concurrency: int = 16, max_seconds: float = 600, seed: int = 0
) -> dict[str, Any]:
    """The load run; returns the figures (throughput, latency percentiles, statuses, errors)."""
    status, models = _get_json(port, "/models")
    if status != 200:
        raise RuntimeError(f"GET /models answered {status}: {models}")
    feature_dim = next(iter(models["clip"].values()))  # the regressor's default input size (auto)
    work = make_requests(requests, feature_dim, seed)
    lock = threading.Lock()
    next_index = 0
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        nonlocal next_index
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        try:
            while time.monotonic() < deadline:
                with lock:
                    if next_index >= len(work):
                        return
                    method, path, body = work[next_index]
                    next_index += 1
                headers = {"Content-Type": "application/json"} if body is not None else {}
                start = time.perf_counter()
                try:
                    conn.request(method, path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    code = response.status
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()  # a fresh connection for the next request
                    with lock:
                        statuses["connection error"] += 1
                        errors.append(f"{method} {path}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    statuses[str(code)] += 1
                    if code != 200:
                        errors.append(f"{method} {path}: {code} {data[:200]!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, name=f"load-{i}") for i in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done = sum(statuses.values())
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000 if ordered else 0.0

    return {
        "requests": requests,
        "done": done,
        "not_run": requests - done,
        "concurrency": concurrency,
        "seconds": wall,
        "throughput_rps": done / wall if wall else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "mean_ms": statistics.fmean(ordered) * 1000 if ordered else 0.0,
        "max_ms": ordered[-1] * 1000 if ordered else 0.0,
        "statuses": dict(statuses),
        "errors": len(errors),
        "first_errors": errors[:10],
    }


ABUSER = "127.0.0.2"  # a loopback address of its own, so the service sees another client


def abuse_slow_readers(
    port: int, stop: threading.Event, connections: int = 16, hold: float = 3.0, source: str = ABUSER
) -> dict[str, int]:
    """Until ``stop``: ``connections`` sockets (a small receive buffer) that each send three pipelined
    /embed/text requests with large replies and never read; every ``hold`` seconds they are replaced by new
    ones. Returns how many were opened (one whose requests the service stopped reading stays open, half-sent:
    how much the kernel buffers before that varies with the machine's memory)."""
    body = json.dumps({"texts": ["a dog runs on the beach " * 100] * 256}).encode()
    head = f"POST /embed/text HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
    request = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    opened = 0
    while not stop.is_set():
        sockets = []
        for _ in range(connections):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(5)
            try:
                sock.bind((source, 0))
                sock.connect((HOST, port))
            except OSError:  # refused by the service: it is allowed to
                sock.close()
                continue
            opened += 1
            sockets.append(sock)
            # The service may stop reading it: it then stays open half-sent, as a slow sender's would.
            with contextlib.suppress(OSError):
                sock.sendall(request * 3)
        stop.wait(hold)
        for sock in sockets:
            sock.close()
    return {"abusive_connections": opened}


def run_beside_abuse(port: int, **load: Any) -> dict[str, Any]:
    """:func:`run_load` while :func:`abuse_slow_readers` runs from another address; the load's figures."""
    stop = threading.Event()
    opened: dict[str, int] = {}
    abuser = threading.Thread(target=lambda: opened.update(abuse_slow_readers(port, stop)), name="abuser")
    abuser.start()
    try:
        time.sleep(1)  # its connections are in before the well-behaved client starts
        result = run_load(port, **load)
    finally:
        stop.set()
        abuser.join()
    return {**result, **opened}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_service(models: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 120) -> tuple:
    """examples/search_service/app.py on 127.0.0.1 and a free port; returns (process, port) once it answers."""
    port = free_port()
    full_env = {**os.environ, "MODELBAKE_MODELS": str(models), "SEARCH_HOST": HOST, **(env or {})}
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, str(APP), str(port)], env=full_env, stdout=sink, stderr=sink)
    end = time.monotonic() + timeout
    while True:
        try:
            if _get_json(port, "/models", timeout=2)[0] == 200:
                return proc, port
        except (OSError, http.client.HTTPException, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > end:
            stop_service(proc)
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the service did not answer on 127.0.0.1:{port} (exit {proc.returncode}):\n{tail}")
        time.sleep(0.2)


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process (Linux), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--models", type=Path, help="a model tree: start the service on a free loopback port")
    where.add_argument("--port", type=int, help="a service already listening on 127.0.0.1:PORT")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=600, help="stop issuing requests after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path("search-service.log"), help="the started service's log")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--abuse", action="store_true", help="also run beside a client that never reads (see above)")
    args = parser.parse_args(argv)

    proc = None
    port = args.port
    if args.models is not None:
        proc, port = start_service(args.models, args.log)
    load = {"requests": args.requests, "concurrency": args.concurrency, "max_seconds": args.max_seconds}
    runs: dict[str, dict[str, Any]] = {}
    try:
        runs["alone"] = run_load(port, **load, seed=args.seed)
        if args.abuse:
            runs["beside a client that never reads"] = run_beside_abuse(port, **load, seed=args.seed)
        if proc is not None:
            runs["alone"]["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
    finally:
        if proc is not None:
            stop_service(proc)
    if args.json:
        print(json.dumps(runs if args.abuse else runs["alone"], indent=2))
    for name, result in [] if args.json else runs.items():
        print(
            f"{name}: {result['done']} of {result['requests']} requests at concurrency {result['concurrency']} in "
            f"{result['seconds']:.1f} s: {result['throughput_rps']:.1f} req/s, p50 {result['p50_ms']:.1f} ms, "
            f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms, errors {result['errors']}"
        )
        peak = f", server peak RSS {result['server_peak_rss_mb']:.0f} MB" if "server_peak_rss_mb" in result else ""
        abusive = f", abusive connections {result['abusive_connections']}" if "abusive_connections" in result else ""
        print(f"  statuses {result['statuses']}{peak}{abusive}")
        for line in result["first_errors"]:
            print(f"  {line}")
    return 0 if all(r["errors"] == 0 and r["not_run"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
