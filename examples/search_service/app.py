"""A minimal search service on the runtime image: the models come from /models, checked at start-up.

    POST /embed/text  {"texts": ["a dog on a beach"]}            -> {"embeddings": [[...]]}
    POST /rank        {"query": "...", "passages": ["...", ...]}  -> {"ranking": [[index, score], ...]}
    POST /boundaries  {"features": [[...], ...]}                  -> {"deltas": [[start, end], ...]}
    GET  /models                                                  -> what was loaded

Standard library HTTP only, so the image needs nothing beyond the runtime image.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from modelbake.runtime.models import open_models

# Every file is checked against the manifest here; a tampered or truncated model stops the start.
MODELS = open_models(os.environ.get("MODELBAKE_MODELS", "/models"))


def handle(path: str, body: dict) -> dict:
    if path == "/embed/text":
        return {"embeddings": MODELS.default_clip.encode_text(body["texts"]).tolist()}
    if path == "/rank":
        if MODELS.reranker is None:
            raise LookupError("this model folder holds no reranker")
        ranking = MODELS.reranker.rank(body["query"], body["passages"], top_k=body.get("top_k"))
        return {"ranking": [[int(i), float(s)] for i, s in ranking]}
    if path == "/boundaries":
        if MODELS.regressor is None:
            raise LookupError("this model folder holds no boundary regressor")
        return {"deltas": MODELS.regressor.predict(body["features"]).tolist()}
    raise KeyError(path)


class Handler(BaseHTTPRequestHandler):
    def _reply(self, status: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path != "/models":
            return self._reply(404, {"error": f"no route {self.path}"})
        clip = {name: enc.embed_dim for name, enc in MODELS.clip.items()}
        return self._reply(200, {"clip": clip, "reranker": MODELS.reranker is not None,
                                 "regressor": MODELS.regressor is not None})  # fmt: skip

    def do_POST(self) -> None:
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            self._reply(200, handle(self.path, body))
        except KeyError as exc:
            self._reply(404 if str(exc).strip("'").startswith("/") else 400, {"error": f"missing {exc}"})
        except LookupError as exc:  # a model this folder does not hold (default_clip raises it too)
            self._reply(404, {"error": str(exc)})
        except (ValueError, TypeError) as exc:  # the loaders' input checks name the problem
            self._reply(400, {"error": str(exc)})


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
