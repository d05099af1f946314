"""sse-starlette, the in-memory peer, as bench/peers.py serves it.

    uvicorn starlette_app:app          (one process; uvloop and httptools when installed)

No store and no history: POST /publish {"channel", "data"} numbers the message
(`id: <n>`), encodes its frame once and puts it on the asyncio queue of every
subscriber of the channel, then answers 201 {"id": n}. GET /stream?channel=...
registers a queue, sends `retry: 2000` (the load client's sign that the stream
is open) and then whatever arrives on the queue, through sse-starlette's
`EventSourceResponse` (its pings every 15 s, its disconnect handling). Frames end
with LF only (`sep="\\n"`), as this project's do.
"""
import asyncio
import itertools
import json
from collections import defaultdict

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SEP = "\n"
subscribers: dict[str, set[asyncio.Queue]] = defaultdict(set)
_numbers = itertools.count(1)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def publish(request: Request) -> JSONResponse:
    body = await request.json()
    n = next(_numbers)  # no await between numbering and queueing: ids stay in order
    frame = ServerSentEvent(json.dumps(body["data"]), id=str(n), sep=SEP).encode()
    for queue in subscribers.get(body["channel"], ()):
        queue.put_nowait(frame)
    return JSONResponse({"id": n}, status_code=201)


async def stream(request: Request) -> EventSourceResponse:
    channel = request.query_params["channel"]
    queue: asyncio.Queue = asyncio.Queue()
    subscribers[channel].add(queue)

    async def frames():
        try:
            yield ServerSentEvent(retry=2000, sep=SEP)
            while True:
                yield await queue.get()
        finally:
            subscribers[channel].discard(queue)

    return EventSourceResponse(frames(), sep=SEP)


app = Starlette(routes=[
    Route("/health", health),
    Route("/publish", publish, methods=["POST"]),
    Route("/stream", stream),
])
