"""A search service FROM the modelbake runtime image: uvicorn + Starlette, pydantic request models, and a
limit on everything a client controls. The models come from $MODELBAKE_MODELS (/models), checked at start-up.

    GET  /healthz                                                   -> {"status": "ok"}: outside every limit, for probes
    GET  /models                                                    -> {"clip": {name: dim}, "reranker": bool,
                                                                        "regressor": bool, "variants":
                                                                        {kind: {name: {role: variant}}},
                                                                        "why": {kind: {name: {role: why}}}}
    POST /embed/text   {"texts": ["a dog on a beach", ...]}         -> {"embeddings": [[...], ...]}
    POST /embed/image  {"images": ["<base64 of an image file>", ...]} -> {"embeddings": [[...], ...]}
    POST /rank         {"query": "...", "passages": ["...", ...], "top_k": 2}  -> {"ranking": [[index, score], ...]}
    POST /boundaries   {"features": [[...], ...]}                   -> {"deltas": [[start, end], ...]}

/embed/image takes each image as the standard base64 of a whole PNG, JPEG, WebP, GIF or BMP file, without a
"data:" prefix: base64.b64encode(open("frame.jpg", "rb").read()).decode(). Embeddings come from the default
CLIP model (the first built), L2-normalised, as float32 (the shortest decimal that reads back the same
float32). top_k is optional (default: every passage, best first).

Every reply is JSON; an error is {"error": "..."} with its status, never a traceback:
    400  not JSON, or not HTTP (a bad request line, header or Content-Length)
    404  no such route, or a model the folder does not hold        405  wrong method
    408  the request's headers or body did not arrive in time      413  body over its limit
    414  URL over 8 KiB                                            431  headers over 16 KiB
    422  a field missing, unknown, of the wrong type or over a limit, or refused by the model
         (a feature row of the wrong size, an image that does not decode or is too large)
    503  busy or out of time (with Retry-After)                    500  anything else (in the log)

Limits, from the environment [default]:
    SEARCH_MAX_BODY_BYTES [4194304]         request body, every route but /embed/image
    SEARCH_MAX_IMAGE_BODY_BYTES [16777216]  request body of /embed/image
    SEARCH_MAX_ITEMS [256]                  texts, passages or feature rows in one request
    SEARCH_MAX_IMAGES [16]                  images in one request
    SEARCH_MAX_TEXT_CHARS [4096]            characters in one text, query or passage
    SEARCH_MAX_FEATURE_DIM [4096]           values in one feature row
    SEARCH_MAX_IMAGE_PIXELS [25000000]      pixels in one image, read from its header before it is decoded
    SEARCH_MAX_ASPECT_RATIO [256]           long side / short side of one image
    SEARCH_BATCH_SIZE [16]                  texts, pairs or images per model call
    SEARCH_WORKERS [2]                      model calls at once, taken by the waiting clients in turn, one
                                            call (batch) each; each with MODELBAKE_THREADS engine threads
                                            (unset: the CPUs granted, a docker or Kubernetes CPU limit
                                            included, shared out between the calls)
    SEARCH_MAX_CONCURRENCY [16]             requests in progress, and model jobs queued or running; beyond: 503
    SEARCH_MAX_PER_CLIENT [as CONCURRENCY]  requests in progress from one client address; beyond: 503. Set it
                                            below SEARCH_MAX_CONCURRENCY (half, say), so one client cannot hold
                                            every slot (behind a proxy, with SEARCH_TRUSTED_PROXIES set)
    SEARCH_TRUSTED_PROXIES [127.0.0.1,::1]  peers whose X-Forwarded-For names the client: addresses or networks,
                                            comma-separated (10.0.0.0/8), * for any, empty for none. A proxy
                                            in front gives every client its own address; list it here, or its
                                            clients are one for SEARCH_MAX_PER_CLIENT and the turns
    SEARCH_REQUEST_TIMEOUT [30]             seconds for a request's model work, queueing included; beyond: 503
    SEARCH_READ_TIMEOUT [10]                seconds for a request's headers to arrive, and again for its body: 408
    SEARCH_SEND_TIMEOUT [10]                seconds a reply may wait for a client that does not read it; beyond,
                                            the connection is dropped and its slot freed
    SEARCH_KEEP_ALIVE [5]                   seconds an idle keep-alive connection stays open
    SEARCH_HOST [0.0.0.0]                   the address to listen on; the port is the first argument [8080]

A JSON body is parsed into memory before its limits are checked (60 to 90 bytes per value: a 4 MiB body of
one-character values peaks near 130 MB); bodies are parsed one at a time, on the event loop, so that bounds
the parsing peak whatever the concurrency.

    python app.py [PORT]
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import logging
import math
import os
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Annotated, Any, TypeVar

import h11
import numpy as np
import orjson
import uvicorn
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from modelbake.runtime import clip as clip_runtime
from modelbake.runtime.models import Models, open_models
from modelbake.runtime.sessions import cpus_granted, threads_from_env

log = logging.getLogger("uvicorn.error")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_URL_BYTES, MAX_HEADER_BYTES = 8192, 16384


@dataclass(frozen=True)
class Settings:
    """The limits above; each field is read from SEARCH_<FIELD> when set."""

    max_body_bytes: int = 4 * 2**20
    max_image_body_bytes: int = 16 * 2**20
    max_items: int = 256
    max_images: int = 16
    max_text_chars: int = 4096
    max_feature_dim: int = 4096
    max_image_pixels: int = 25_000_000
    max_aspect_ratio: float = 256.0
    batch_size: int = 16
    workers: int = 2
    max_concurrency: int = 16
    max_per_client: int = 0  # 0: as max_concurrency
    trusted_proxies: str = "127.0.0.1,::1"  # uvicorn's default: a proxy beside the service (a sidecar)
    request_timeout: float = 30.0
    read_timeout: float = 10.0
    send_timeout: float = 10.0
    keep_alive: int = 5
    host: str = "0.0.0.0"

    @classmethod
    def from_env(cls) -> Settings:
        values: dict[str, Any] = {}
        for field in fields(cls):
            name, raw = f"SEARCH_{field.name.upper()}", os.environ.get(f"SEARCH_{field.name.upper()}")
            if raw is None:
                continue
            kind = type(field.default)
            try:
                values[field.name] = kind(raw)
            except ValueError:
                raise SystemExit(f"{name}={raw!r}: give a number ({kind.__name__})") from None
            # nan compares false both ways, so "<= 0" alone let SEARCH_MAX_ASPECT_RATIO=nan turn a limit off
            if kind is not str and not (math.isfinite(values[field.name]) and values[field.name] > 0):
                raise SystemExit(f"{name}={raw!r}: give a finite number above 0")
        settings = cls(**values)
        for proxy in settings.proxies():
            if proxy != "*":
                try:
                    ipaddress.ip_network(proxy, strict=False)
                except ValueError:
                    raise SystemExit(
                        f"SEARCH_TRUSTED_PROXIES={settings.trusted_proxies!r}: {proxy!r} is not an address or a "
                        "network; give them comma-separated (10.0.0.7,10.1.0.0/16), * for any, or empty for none"
                    ) from None
        return settings

    def proxies(self) -> list[str]:
        """SEARCH_TRUSTED_PROXIES as a list (uvicorn's forwarded_allow_ips)."""
        return [proxy.strip() for proxy in self.trusted_proxies.split(",") if proxy.strip()]


SETTINGS = Settings.from_env()

# Request models: strict types (no "5" for 5), unknown fields refused, every list and text bounded.
Text = Annotated[str, StringConstraints(max_length=SETTINGS.max_text_chars)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class EmbedText(Strict):
    texts: Annotated[list[Text], Field(max_length=SETTINGS.max_items)]


class EmbedImage(Strict):
    images: Annotated[list[str], Field(max_length=SETTINGS.max_images)]


class Rank(Strict):
    query: Text
    passages: Annotated[list[Text], Field(max_length=SETTINGS.max_items)]
    top_k: Annotated[int, Field(ge=1)] | None = None


class Boundaries(Strict):
    features: Annotated[
        list[Annotated[list[Finite], Field(max_length=SETTINGS.max_feature_dim)]], Field(max_length=SETTINGS.max_items)
    ]


M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error reply: status, message and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra

    def response(self) -> Response:
        return reply(self.status, {"error": self.message, **self.extra}, self.headers)


def reply(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(doc).encode(), status, headers=headers, media_type="application/json")


def parse(model: type[M], body: bytes) -> M:
    """The body as ``model``: 400 if it is not JSON (or nests deeper than 200), 422 if it does not fit."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if errors[0]["type"] == "json_invalid":
            raise ApiError(400, errors[0]["msg"]) from None
        where = [".".join(str(part) for part in e["loc"]) or "body" for e in errors]
        message = "; ".join(f"{w}: {e['msg']}" for w, e in zip(where[:3], errors, strict=False))
        details = [{"loc": w, "msg": e["msg"], "type": e["type"]} for w, e in zip(where[:10], errors, strict=False)]
        raise ApiError(422, message, details=details) from None


def json_bytes(doc: dict[str, Any], values: np.ndarray) -> bytes:
    """A reply of model output (``values``, checked finite), numpy arrays written by orjson as float32: the
    shortest text that reads back the same value. json.dumps of .tolist() took 115 ms for 256 x 512
    embeddings, holding the GIL (orjson 3 ms), and twice the bytes. orjson writes NaN as null: hence the check."""
    if not np.isfinite(values).all():
        raise ValueError("the model gave NaN or infinite values for this input")
    return orjson.dumps(doc, default=_as_list, option=orjson.OPT_SERIALIZE_NUMPY)


def _as_list(value: Any) -> Any:
    """What orjson does not write from numpy itself: an array that is not C-contiguous (a slice, a
    transpose) or of a type it does not know."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


class OutOfTime(Exception):
    pass


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Turns:
    """Model calls, at most ``slots`` at once, granted to the waiting clients in turn: one call each, round
    robin, and within a client to its jobs in turn. Jobs once took the model workers first come, first served:
    beside a client with 8 large jobs queued, another's one-text request waited for all of them (3.2 s at the
    median, bench/README). Now it waits for about one call per slot, whatever the others have queued."""

    def __init__(self, slots: int) -> None:
        self._lock = threading.Lock()
        self._free = slots  # above 0 only while nobody waits: a released slot goes straight to the next call
        self._waiting: OrderedDict[str, deque[threading.Event]] = OrderedDict()  # the next client first

    @property
    def waiting(self) -> int:
        """Model calls waiting for a turn."""
        with self._lock:
            return sum(len(queue) for queue in self._waiting.values())

    @contextlib.contextmanager
    def turn(self, client: str, deadline: float) -> Iterator[None]:
        """Hold a slot for one model call of ``client``; OutOfTime when ``deadline`` passes first."""
        with self._lock:
            granted = None if self._free else threading.Event()
            if granted is None:
                self._free -= 1
            else:
                self._waiting.setdefault(client, deque()).append(granted)
        if granted is not None and not granted.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                if not granted.is_set():  # still waiting: leave the queue (else the slot was just handed over)
                    queue = self._waiting[client]
                    queue.remove(granted)
                    if not queue:
                        del self._waiting[client]
                    raise OutOfTime
        try:
            if time.monotonic() > deadline:  # the request has had its 503: stop its job here
                raise OutOfTime
            yield
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        with self._lock:
            if not self._waiting:
                self._free += 1
                return
            client, queue = next(iter(self._waiting.items()))
            queue.popleft().set()
            if queue:
                self._waiting.move_to_end(client)  # its next call waits for every other client's
            else:
                del self._waiting[client]


@dataclass(frozen=True)
class Job:
    """One request's model work: whose it is and until when. Each model call takes its turn."""

    turns: Turns
    client: str
    deadline: float

    def turn(self) -> contextlib.AbstractContextManager[None]:
        return self.turns.turn(self.client, self.deadline)


class Runner:
    """Model work on threads, at most SEARCH_MAX_CONCURRENCY jobs queued or running (counting jobs whose
    request timed out until they stop, at their next model call, so abandoned work cannot pile up), their model
    calls SEARCH_WORKERS at once, taken in turns (:class:`Turns`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # a thread per job: jobs wait for turns, not for a thread
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="model")
        self.turns = Turns(settings.workers)
        self.jobs = 0

    def _finished(self, loop: asyncio.AbstractEventLoop, _: Future) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        self.jobs -= 1

    async def run(self, client: str, work: Callable[..., bytes], *args: Any) -> bytes:
        timeout = self.settings.request_timeout
        if self.jobs >= self.settings.max_concurrency:
            raise ApiError(503, f"busy: {self.jobs} model jobs queued or running", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        self.jobs += 1
        job = self.pool.submit(work, Job(self.turns, client, time.monotonic() + timeout), *args)
        job.add_done_callback(lambda done: self._finished(loop, done))
        try:  # on timeout a job waiting for its turn stops then; a running one stops at its next model call
            return await asyncio.wait_for(asyncio.wrap_future(job), timeout)
        except (TimeoutError, OutOfTime):
            raise ApiError(
                503, f"out of time: over {timeout:g} s (SEARCH_REQUEST_TIMEOUT)", {"Retry-After": "1"}
            ) from None


class Service:
    """The routes. Each POST parses its body on the event loop and runs the model work on the Runner."""

    def __init__(self, models: Models, settings: Settings) -> None:
        self.models, self.settings, self.runner = models, settings, Runner(settings)
        routes = [
            Route("/models", self.endpoint(self.list_models), methods=["GET"]),
            Route("/embed/text", self.endpoint(self.embed_text), methods=["POST"]),
            Route("/embed/image", self.endpoint(self.embed_image), methods=["POST"]),
            Route("/rank", self.endpoint(self.rank), methods=["POST"]),
            Route("/boundaries", self.endpoint(self.boundaries), methods=["POST"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self.http_error})

    @staticmethod
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # the router's 404 and 405
        message = f"no route {request.url.path}" if exc.status_code == 404 else f"{request.method}: {exc.detail}"
        return reply(exc.status_code, {"error": message}, exc.headers)

    @staticmethod
    def endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Every outcome of a route as a JSON reply."""

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return exc.response()
            except KeyError:  # a bug, not a missing model
                log.exception("%s %s failed", request.method, request.url.path)
            except LookupError as exc:  # a model this folder does not hold
                return reply(404, {"error": str(exc)})
            except ValueError as exc:  # the loaders' input checks name the problem (types are checked before)
                return reply(422, {"error": str(exc)})
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
            return reply(500, {"error": "internal error; the service log has the details"})

        return run

    async def list_models(self, request: Request) -> Response:
        clip = {name: enc.embed_dim for name, enc in self.models.clip.items()}
        held = {"reranker": self.models.reranker is not None, "regressor": self.models.regressor is not None}
        runs = {"variants": self.models.variants(), "engines": self.models.engines(), "why": self.models.reasons()}
        return reply(200, {"clip": clip, **held, **runs})

    async def embed_text(self, request: Request) -> Response:
        body = parse(EmbedText, await request.body())
        return self.ok(await self.runner.run(client_of(request.scope), self._embed_text, body.texts))

    async def embed_image(self, request: Request) -> Response:
        raw = await request.body()
        # A body of base64 strings holds no commas: count them before parsing, so a 16 MiB body cannot be
        # millions of tiny values (each costs 60 to 90 bytes parsed).
        if raw.count(b",") > self.settings.max_images + 8:
            raise ApiError(422, f"images: at most {self.settings.max_images} base64 strings (SEARCH_MAX_IMAGES)")
        body = parse(EmbedImage, raw)
        return self.ok(await self.runner.run(client_of(request.scope), self._embed_image, body.images))

    async def rank(self, request: Request) -> Response:
        body = parse(Rank, await request.body())
        return self.ok(
            await self.runner.run(client_of(request.scope), self._rank, body.query, body.passages, body.top_k)
        )

    async def boundaries(self, request: Request) -> Response:
        body = parse(Boundaries, await request.body())
        if len({len(row) for row in body.features}) > 1:
            raise ApiError(422, "features: every row must have the same length")
        return self.ok(await self.runner.run(client_of(request.scope), self._boundaries, body.features))

    @staticmethod
    def ok(data: bytes) -> Response:
        return Response(data, 200, media_type="application/json")

    # Model work, in the Runner's threads: batches of SEARCH_BATCH_SIZE, one turn each (the deadline checked
    # then), the reply encoded here too (not on the event loop).
    def _embed_text(self, job: Job, texts: list[str]) -> bytes:
        clip, size = self.models.default_clip, self.settings.batch_size
        out = []
        for batch in batches(texts, size):
            with job.turn():
                out.append(clip.encode_text(batch, batch_size=size))
        embeddings = np.concatenate(out) if out else np.zeros((0, clip.embed_dim), np.float32)
        return json_bytes({"embeddings": embeddings}, embeddings)

    def _embed_image(self, job: Job, images: list[str]) -> bytes:
        clip, size = self.models.default_clip, self.settings.batch_size
        files = [decode_image(i, text) for i, text in enumerate(images)]
        out = []
        for start in range(0, len(files), size):  # each decoded only while it is preprocessed
            batch = files[start : start + size]
            try:
                with job.turn():
                    out.append(clip.encode_image(batch, batch_size=size))
            except ValueError as exc:  # the header was fine, the data is not (truncated, corrupt)
                where = f"images[{start}]" if len(batch) == 1 else f"one of images[{start}:{start + len(batch)}]"
                raise ValueError(f"{where}: {exc}") from None
        embeddings = np.concatenate(out) if out else np.zeros((0, clip.embed_dim), np.float32)
        return json_bytes({"embeddings": embeddings}, embeddings)

    def _rank(self, job: Job, query: str, passages: list[str], top_k: int | None) -> bytes:
        reranker, size = self.models.reranker, self.settings.batch_size
        if reranker is None:
            raise LookupError("this model folder holds no reranker")
        parts = []
        for batch in batches(passages, size):
            with job.turn():
                parts.append(reranker.score(query, batch, batch_size=size))
        scores = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
        order = np.argsort(-scores, kind="stable")[:top_k]  # as Reranker.rank
        return json_bytes({"ranking": [[int(i), float(scores[i])] for i in order]}, scores)

    def _boundaries(self, job: Job, features: list[list[float]]) -> bytes:
        if self.models.regressor is None:
            raise LookupError("this model folder holds no boundary regressor")
        with job.turn():
            deltas = self.models.regressor.predict(features)
        return json_bytes({"deltas": deltas}, deltas)


def decode_image(index: int, text: str) -> bytes:
    """images[index] from base64 to the file's bytes, its format and size checked from the header."""
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError(f"images[{index}]: not base64 ({exc})") from None
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            clip_runtime.check_image_size(*img.size)
    except UnidentifiedImageError:
        raise ValueError(f"images[{index}]: not a {', '.join(IMAGE_FORMATS)} file") from None
    except Image.DecompressionBombError as exc:  # PIL's own limit, above ours
        limit = clip_runtime.MAX_IMAGE_PIXELS
        raise ValueError(f"images[{index}]: an image over the limit of {limit} pixels ({exc})") from None
    except ValueError as exc:  # over a limit
        raise ValueError(f"images[{index}]: {exc}") from None
    except OSError as exc:
        raise ValueError(f"images[{index}]: cannot read the image: {exc}") from None
    return data


HEALTH = json.dumps({"status": "ok"}).encode()


def client_of(scope: dict[str, Any]) -> str:
    """The client's address, as the limits and turns know it: uvicorn has put X-Forwarded-For's client there
    when the peer is one of SEARCH_TRUSTED_PROXIES (else a proxy's clients are all the proxy)."""
    return (scope.get("client") or ("?", 0))[0]


class Guard:
    """Around the whole app (pure ASGI): at most SEARCH_MAX_CONCURRENCY requests in progress, each body read
    whole before any route sees it, under its size limit and within SEARCH_READ_TIMEOUT, and each reply sent
    within SEARCH_SEND_TIMEOUT. ``GET /healthz`` is answered here, outside the limit: a probe must not get
    503 because clients hold every slot (on Kubernetes that restarted busy pods)."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: Settings) -> None:
        self.app, self.settings, self.active = app, settings, 0
        self.by_client: Counter[str] = Counter()  # requests in progress per client address

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self.bounded(send)
        if scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
            head = [(b"content-type", b"application/json"), (b"content-length", str(len(HEALTH)).encode())]
            with contextlib.suppress(ConnectionError):
                await send({"type": "http.response.start", "status": 200, "headers": head})
                await send({"type": "http.response.body", "body": HEALTH})
            return None
        if self.active >= self.settings.max_concurrency:
            return await self.refuse(send, 503, f"busy: {self.active} requests in progress", {"retry-after": "1"})
        # One client cannot hold every slot: the others are still served while it floods or stalls.
        client = client_of(scope)
        if self.by_client[client] >= (self.settings.max_per_client or self.settings.max_concurrency):
            mine = self.by_client[client]
            message = f"busy: {mine} requests of this client in progress (SEARCH_MAX_PER_CLIENT)"
            return await self.refuse(send, 503, message, {"retry-after": "1"})
        self.active += 1
        self.by_client[client] += 1
        try:
            await self.guarded(scope, receive, send)
        except ConnectionError:  # the reply was not taken in time: the connection is gone, the slot is free
            return None
        finally:
            self.active -= 1
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]

    def bounded(self, send: Callable) -> Callable:
        """``send`` that gives up after SEARCH_SEND_TIMEOUT: a client that never reads its replies (the socket
        buffers full) once held its slot for good. The connection is then dropped, not closed: closing waits
        for the unread bytes to leave, which they never do."""
        timeout = self.settings.send_timeout

        async def send_within(message: dict[str, Any]) -> None:
            try:
                await asyncio.wait_for(send(message), timeout)
            except TimeoutError:
                transport = getattr(getattr(send, "__self__", None), "transport", None)  # uvicorn's cycle
                if transport is not None:
                    transport.abort()
                raise ConnectionError(f"reply not taken within {timeout:g} s (SEARCH_SEND_TIMEOUT)") from None

        return send_within

    async def guarded(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        # h11 refuses headers over 16 KiB only while they are incomplete: the same headers in one read pass.
        if len(scope["raw_path"]) + len(scope["query_string"]) > MAX_URL_BYTES:
            return await self.refuse(send, 414, f"URL over {MAX_URL_BYTES} bytes")
        if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            return await self.refuse(send, 431, f"request headers over {MAX_HEADER_BYTES} bytes")
        image = scope["path"] == "/embed/image"
        limit = self.settings.max_image_body_bytes if image else self.settings.max_body_bytes
        limit_name = "SEARCH_MAX_IMAGE_BODY_BYTES" if image else "SEARCH_MAX_BODY_BYTES"
        too_large = f"request body over {limit} bytes ({limit_name})"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > limit:  # h11 has checked it is a number
            return await self.refuse(send, 413, too_large)
        try:
            body = await asyncio.wait_for(self.read_body(receive, limit), self.settings.read_timeout)
        except TimeoutError:
            timeout = self.settings.read_timeout
            return await self.refuse(send, 408, f"request body not received within {timeout:g} s")
        except OverflowError:
            return await self.refuse(send, 413, too_large)
        except ConnectionError:
            return  # the client went away
        done = False

        async def replay() -> dict[str, Any]:
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect, when it comes

        await self.app(scope, replay, send)

    @staticmethod
    async def read_body(receive: Callable, limit: int) -> bytes:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError
            body += message.get("body", b"")
            if len(body) > limit:
                raise OverflowError
            if not message.get("more_body", False):
                return bytes(body)

    @staticmethod
    async def refuse(send: Callable, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """An error before the body was read: reply and close the connection (the rest is never read)."""
        data = json.dumps({"error": message}).encode()
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        head += [*extra, (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": data})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two changes. A request's headers must arrive within
    SEARCH_READ_TIMEOUT: uvicorn itself waits for them forever, so a client sending half a request line
    would hold a connection (and its memory) for good. And a request h11 cannot parse (a bad request line,
    header or Content-Length, headers over 16 KiB) gets a JSON 400 like every other error."""

    read_timeout = Settings.read_timeout
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a request's headers are complete: its body is the Guard's business
            self._disarm()
        elif self.cycle is None or self.cycle.response_complete:  # part of the next request's headers
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._timer is None:  # counted from the first byte: trickling bytes does not reset it
            self._timer = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        data = json.dumps({"error": f"request headers not received within {self.read_timeout:g} s"}).encode()
        head = f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
        self.transport.write(head.encode() + b"connection: close\r\n\r\n" + data)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        data = json.dumps({"error": "not a valid HTTP/1.1 request (request line, headers or Content-Length)"})
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=data.encode()), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def main(argv: list[str]) -> None:
    port = int(argv[1]) if len(argv) > 1 else 8080
    # SEARCH_WORKERS model calls share the CPUs granted: each engine would size its pool to all of them, and
    # two calls at once then served 1.2-1.5x fewer requests than with a thread each on 2 cores (bench/README).
    cpus = cpus_granted() or os.cpu_count() or 1
    threads = threads_from_env() or max(1, cpus // SETTINGS.workers)
    # Every file is checked against the manifest here; a tampered or truncated model stops the start.
    models = open_models(os.environ.get("MODELBAKE_MODELS", "/models"), threads=threads)
    clip_runtime.MAX_IMAGE_PIXELS = SETTINGS.max_image_pixels  # the library's limits, for every image
    clip_runtime.MAX_ASPECT_RATIO = SETTINGS.max_aspect_ratio
    GuardedH11Protocol.read_timeout = SETTINGS.read_timeout
    config = uvicorn.Config(
        Guard(Service(models, SETTINGS).app, SETTINGS),
        host=SETTINGS.host,
        port=port,
        loop="asyncio",
        http=GuardedH11Protocol,
        ws="none",
        lifespan="off",
        timeout_keep_alive=SETTINGS.keep_alive,
        server_header=False,
        proxy_headers=bool(SETTINGS.proxies()),
        forwarded_allow_ips=SETTINGS.proxies(),
    )
    log.info("model calls at once: %d; engine threads per call: %d; CPUs granted: %d", SETTINGS.workers, threads, cpus)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main(sys.argv)
