"""Exactly once under chaos: cut a subscriber's connection at random, then check what it got.

    .venv/bin/python docs/workshop/chaos.py --messages 300 --cuts 30    (the server: --base, or WORKSHOP_URL)

Three threads publish MESSAGES messages on a fresh channel over HTTP, while one
subscriber reads the stream with a bare http.client, as EventSource would, and
cuts its connection CUTS times at random points, losing what was in flight (whole
frames, half a frame: a half frame is never dispatched, as the spec says). It
reconnects at once with
`Last-Event-ID: <the last complete frame's id>`. At the end every published
message must have arrived exactly once, in id order.

`--no-resume` reconnects without Last-Event-ID: the server then replays the
whole channel, and the duplicates show (exercise 10's "break it").
Needs the server's REALTIME_PUBLISH_KEY in FLASK_REALTIME_PUBLISH_KEY (docs/workshop/env.sh).
Standard library only.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import threading
import urllib.request
import uuid
from urllib.parse import quote, urlsplit


def publish_all(base: str, key: str, channel: str, count: int, published: list[int]) -> None:
    for n in range(count):
        body = json.dumps({"channel": channel, "topic": "tick", "data": {"n": n}}).encode()
        request = urllib.request.Request(
            base + "/api/realtime/publish", data=body, method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            published.append(json.load(response)["id"])


def get_token(base: str, channel: str) -> str:
    body = json.dumps({"channel": channel, "topics": ["tick"]}).encode()
    request = urllib.request.Request(
        base + "/api/realtime/token", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["token"]


class Subscriber:
    """Reads frames; `cut_after` lists how many messages it has received when each cut comes."""

    def __init__(self, base: str, token: str, cut_after: list[int], resume: bool) -> None:
        self.url = urlsplit(base)
        self.path = f"/api/realtime/subscribe?token={quote(token)}"
        self.cut_after = sorted(cut_after)
        self.resume = resume
        self.received: list[int] = []  # envelope ids, in arrival order
        self.cuts = 0
        self.last_event_id: str | None = None

    def run_until(self, expected: int, publishing_done: threading.Event) -> None:
        while not (publishing_done.is_set() and self.distinct() >= expected and not self._cuts_left()):
            self._connect_once(expected, publishing_done)

    def distinct(self) -> int:
        return len(set(self.received))

    def _cuts_left(self) -> bool:
        return self.cuts < len(self.cut_after)

    def _connect_once(self, expected: int, publishing_done: threading.Event) -> None:
        connection = http.client.HTTPConnection(self.url.hostname, self.url.port or 80, timeout=30)
        headers = {"Accept": "text/event-stream"}
        if self.resume and self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        connection.request("GET", self.path, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            sys.exit(f"the stream answered {response.status}: {response.read()[:300]!r}")
        buffer = b""
        try:
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    return  # the server ended the stream: reconnect
                buffer += chunk
                while True:
                    if self._cuts_left() and len(self.received) >= self.cut_after[self.cuts]:
                        # Cut: what is left in `buffer` (frames, half a frame) is lost with the connection.
                        self.cuts += 1
                        return
                    if b"\n\n" not in buffer:
                        break
                    frame, buffer = buffer.split(b"\n\n", 1)
                    self._frame(frame.decode())
                if not self._cuts_left() and publishing_done.is_set() and self.distinct() >= expected:
                    return
        finally:
            connection.close()

    def _frame(self, frame: str) -> None:
        fields = dict(line.split(": ", 1) for line in frame.split("\n") if ": " in line and not line.startswith(":"))
        if "data" in fields and "id" in fields:
            self.last_event_id = fields["id"]
            self.received.append(json.loads(fields["data"])["id"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=os.environ.get("WORKSHOP_URL", "http://localhost:5000"))
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--cuts", type=int, default=30)
    parser.add_argument("--seed", type=int, default=None, help="where the cuts fall (default: random)")
    parser.add_argument("--no-resume", action="store_true", help="reconnect without Last-Event-ID")
    args = parser.parse_args()
    key = os.environ.get("FLASK_REALTIME_PUBLISH_KEY")
    if not key:
        sys.exit("set FLASK_REALTIME_PUBLISH_KEY to the server's key: source docs/workshop/env.sh")
    if not 0 <= args.cuts <= args.messages:
        sys.exit("--cuts must be from 0 to --messages")

    channel = f"workshop.chaos.{uuid.uuid4().hex[:12]}"  # a fresh channel on every run
    rng = random.Random(args.seed)
    subscriber = Subscriber(args.base, get_token(args.base, channel), rng.sample(range(args.messages), args.cuts),
                            resume=not args.no_resume)
    published: list[int] = []
    done = threading.Event()
    per_thread = [args.messages // 3 + (1 if i < args.messages % 3 else 0) for i in range(3)]
    threads = [threading.Thread(target=publish_all, args=(args.base, key, channel, n, published)) for n in per_thread]

    def publish() -> None:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()

    publisher = threading.Thread(target=publish)
    publisher.start()
    subscriber.run_until(args.messages, done)
    publisher.join()

    got = subscriber.received
    duplicates = len(got) - len(set(got))
    missing = len(set(published) - set(got))
    in_order = all(a < b for a, b in zip(got, got[1:]))
    print(f"published {len(published)} messages from {len(threads)} threads")
    print(f"cut the connection {subscriber.cuts} times, losing what was in flight; "
          + ("each reconnect sent Last-Event-ID" if not args.no_resume else "reconnected WITHOUT Last-Event-ID"))
    print(f"received {len(got)} messages: {duplicates} duplicates, {missing} missing, "
          + ("in id order" if in_order else "OUT OF ORDER"))
    ok = duplicates == 0 and missing == 0 and in_order and len(got) == len(published)
    print("exactly once: OK" if ok else "exactly once: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
