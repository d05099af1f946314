"""Watch one job run from the outside, over HTTP only (exercise 12 of docs/workshop.md).

    .venv/bin/python docs/workshop/runs.py wait RUN_ID --step fetch   until that step is completed
    .venv/bin/python docs/workshop/runs.py wait RUN_ID --ended         until the run ended
    .venv/bin/python docs/workshop/runs.py show RUN_ID                 its status, steps and progress

`show` reads GET /api/runs/<id> and the run's channel `run.<id>` (history, through
a token), and prints what matters for durability: how often each step ran, and
every progress message the run published, once each or not.
Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from typing import Any
from urllib.parse import quote


def get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return json.load(response)


def post(base: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def wait(base: str, run_id: str, step: str | None) -> None:
    while True:
        run = get(base, f"/api/runs/{run_id}")
        if step is None and run["status"] in ("completed", "failed", "cancelled"):
            return
        if step is not None and any(s["id"] == step and s["status"] == "completed" for s in run["steps"]):
            return
        time.sleep(0.2)  # a poll: this is what a dashboard without a stream does


def show(base: str, run_id: str) -> None:
    run = get(base, f"/api/runs/{run_id}")
    print(f"status: {run['status']}")
    for step in run["steps"]:
        print(f"step {step['id']}: {step['status']}, attempts: {step['attempts']}")
    token = post(base, "/api/realtime/token", {"channel": f"run.{run_id}", "topics": ["status", "run"]})["token"]
    history = get(base, f"/api/realtime/messages?token={quote(token)}&limit=1000")["messages"]
    progress = [str(m["data"]["percent"]) for m in history if m["topic"] == "status"]
    lifecycle = [m["data"]["status"] for m in history if m["topic"] == "run"]
    print("progress published: " + " ".join(progress))
    print("lifecycle published: " + " ".join(lifecycle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("wait", "show"))
    parser.add_argument("run_id")
    parser.add_argument("--step", help="wait: until this step is completed")
    parser.add_argument("--ended", action="store_true", help="wait: until the run ended")
    parser.add_argument("--base", default=os.environ.get("WORKSHOP_URL", "http://localhost:5000"))
    args = parser.parse_args()
    if args.command == "wait":
        if bool(args.step) == args.ended:
            sys.exit("wait needs either --step NAME or --ended")
        wait(args.base, args.run_id, args.step)
    else:
        show(args.base, args.run_id)


if __name__ == "__main__":
    main()
