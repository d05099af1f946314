"""flask-sse, the peer that publishes through Redis pub/sub, as bench/peers.py serves it.

    gunicorn -k gevent -w 1 --worker-connections 10000 flask_sse_app:app

flask-sse's documented deployment: a gevent worker, `sse.publish()` to publish,
`sse.messages()` (Redis SUBSCRIBE, one Redis connection per stream) to stream,
its `Message` to format each frame. Two additions for the benchmark only:

- GET /stream?channel=... sends `retry: 2000` first, so the load client knows
  the stream is open (flask-sse's own `stream` view sends nothing, not even the
  headers, until the first message). The SUBSCRIBE follows at once; bench/peers.py
  publishes warm-up messages until every stream has received one.
- POST /publish {"channel", "data"} numbers the messages (`id: <n>`) and publishes
  them one at a time, so that the ids are in the order Redis receives them and
  the client's in-order check means something. It answers 201 {"id": n}.

Settings (environment): SSE_REDIS_URL (default redis://127.0.0.1:6379/15) and
BENCH_CHANNEL_PREFIX, prepended to every channel: Redis pub/sub channels are
shared by all of its databases, so each run uses a channel name of its own.
"""
import itertools
import os
import threading  # patched by gunicorn's gevent worker: the lock is a gevent lock

from flask import Flask, Response, jsonify, request, stream_with_context
from flask_sse import sse

app = Flask(__name__)
app.config["SSE_REDIS_URL"] = os.environ.get("SSE_REDIS_URL", "redis://127.0.0.1:6379/15")
PREFIX = os.environ.get("BENCH_CHANNEL_PREFIX", "rt-bench-")

_numbers = itertools.count(1)
_publishing = threading.Lock()


@app.get("/health")
def health():
    return {"ok": True}


@app.post("/publish")
def publish():
    body = request.get_json()
    with _publishing:
        n = next(_numbers)
        sse.publish(body["data"], id=str(n), channel=PREFIX + body["channel"])
    return jsonify(id=n), 201


@app.get("/stream")
def stream():
    messages = sse.messages(channel=PREFIX + request.args["channel"])

    @stream_with_context
    def generator():
        yield "retry: 2000\n\n"
        for message in messages:
            yield str(message)

    return Response(generator(), mimetype="text/event-stream")
