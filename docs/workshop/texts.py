"""Ask the demo a question and look at its answer's text stream from the outside (exercise 14 of docs/workshop.md).

    .venv/bin/python docs/workshop/texts.py ask "Why do streams fold?"

Starts an answer (`POST /demo/ask`), reads its stream live as a browser
would, then reads it again as a reload would, twice: once from the start,
once from a cursor in the middle of the answer. It prints what each reader got,
in terms that do not change from run to run (how many pieces a flush holds
does). Standard library only: the SSE parsing is the dozen lines of `frames`.
"""
from __future__ import annotations

import argparse
import json
import os
import urllib.request
from typing import Any, Iterator
from urllib.parse import quote


def post(base: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def frames(base: str, token: str, cursor: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(id, envelope) of each message frame of a stream, as EventSource parses them."""
    headers = {"Last-Event-ID": cursor} if cursor else {}
    request = urllib.request.Request(f"{base}/api/realtime/subscribe?token={quote(token)}", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id, data = "", []
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            if line == "":  # a blank line ends a frame
                if data:
                    yield event_id, json.loads("\n".join(data))
                data = []
            elif line.startswith("id:"):
                event_id = line[3:].lstrip(" ")
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))


class Text:
    """The client rule of docs/protocol.md §11, as static/realtime.js applies it."""

    def __init__(self) -> None:
        self.text, self.seq, self.status = "", -1, "streaming"
        self.in_order = True  # every delta's seq was the previous one + 1

    def apply(self, data: dict[str, Any]) -> None:
        if "text" in data:  # the whole text so far: replace
            self.text, self.seq, self.status = data["text"], data["seq"], data.get("status", "streaming")
        elif data["seq"] == self.seq + 1:  # the next delta: append
            self.text, self.seq, self.status = self.text + data["delta"], data["seq"], data.get("status", self.status)
        elif data["seq"] > self.seq + 1:
            self.in_order = False
        # seq <= current: a repeat, ignored


def read(base: str, token: str, cursor: str | None = None) -> tuple[Text, list[tuple[str, dict[str, Any]]]]:
    """Read one stream until its text stream ended: the text, and every frame of topic `answer`."""
    text, got = Text(), []
    for event_id, envelope in frames(base, token, cursor):
        if envelope["topic"] != "answer":
            continue
        got.append((event_id, envelope["data"]))
        text.apply(envelope["data"])
        if text.status != "streaming":
            return text, got
    raise SystemExit("the stream ended before the answer did")


def ask(base: str, prompt: str) -> None:
    grant = post(base, "/demo/ask", {"prompt": prompt})
    live, got = read(base, grant["token"])
    first = got[0][1]
    # Opened as the run starts: seq 0 with "" (the attempt's start), or, if the worker was
    # quicker, the text so far. Either way a `text` message: the client replaces, then appends.
    print(f"live: the first frame carries `text`, the text so far: {'yes' if 'text' in first else 'no'}")
    print(f"live: each delta's seq was the previous one + 1: {'yes' if live.in_order else 'no'}")
    print(f"live: the last frame has status {got[-1][1]['status']!r} and delta {got[-1][1]['delta']!r}")
    print(f"live: {len(live.text)} characters of text")

    reload, again = read(base, grant["token"])
    print(f"reload: {len(again)} frame, with {sorted(again[0][1])}")
    print(f"reload: the same text and seq: {'yes' if (reload.text, reload.seq) == (live.text, live.seq) else 'no'}")
    print(f"reload: its id is the cursor of the live end: {'yes' if again[0][0] == got[-1][0] else 'no'}")

    middle = got[len(got) // 2][0]
    resumed, rest = read(base, grant["token"], middle)
    print(f"resume from the middle: {len(rest)} frame, the whole text again: "
          f"{'yes' if resumed.text == live.text else 'no'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("ask",))
    parser.add_argument("prompt")
    parser.add_argument("--base", default=os.environ.get("WORKSHOP_URL", "http://localhost:5000"))
    args = parser.parse_args()
    ask(args.base, args.prompt)


if __name__ == "__main__":
    main()
