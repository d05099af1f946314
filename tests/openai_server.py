"""A stand-in for an OpenAI-compatible chat-completions server, on a free local port.

    with FakeOpenAI(["Hel", "lo"]) as server:     # server.base_url == "http://127.0.0.1:<port>/v1"
        ...                                       # server.requests: each request's JSON and headers

`POST /v1/chat/completions` with `"stream": true` answers what such servers
send: `text/event-stream`, one `data: <chat.completion.chunk JSON>` event per
piece (the first carrying the role, the last an empty delta with its
`finish_reason`), then `data: [DONE]`. `status` makes it refuse instead, with
an OpenAI-shaped error body that quotes the key it was sent, as real servers'
messages may: what the app shows must not.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from conftest import free_port


class FakeOpenAI:
    def __init__(self, pieces: list[str], *, status: int = 200, model: str = "fake-model") -> None:
        self.pieces = pieces
        self.status = status
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._server = make_server("127.0.0.1", self.port, self._app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join()

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        if request.method != "POST" or request.path != "/v1/chat/completions":
            return Response(json.dumps({"error": {"message": "not found"}}), 404, mimetype="application/json")(
                environ, start_response)
        body = request.get_json()
        self.requests.append({"json": body, "authorization": request.headers.get("Authorization")})
        if self.status != 200:
            error = {"error": {"message": f"Incorrect API key provided: {request.headers.get('Authorization')}",
                               "type": "invalid_request_error", "code": "invalid_api_key"}}
            return Response(json.dumps(error), self.status, mimetype="application/json")(environ, start_response)
        assert body.get("stream") is True, "the app asks for a stream"
        response = Response(self._events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
        return response(environ, start_response)

    def _events(self) -> Iterator[bytes]:
        created = int(time.time())
        deltas = [{"role": "assistant", "content": ""}] + [{"content": piece} for piece in self.pieces] + [{}]
        for n, delta in enumerate(deltas):
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if n == len(deltas) - 1 else None}],
            }
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"
