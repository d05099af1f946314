"""What the browser tests drive the page with: a fake report job, a console watch, held reconnects.

Plain helpers for tests/test_browser.py (its fixtures live there): they take
Playwright's page and locators and the live server, and know the demo page's
markup (`.report[data-run-id]`, `.log li[data-id]`).
"""
from __future__ import annotations

import re
import time
import uuid

import httpx

from conftest import ROOT, LiveServer, wait_until

ARTIFACTS = ROOT / "test-artifacts"
SUBSCRIBE_URL = re.compile(r"/api/realtime/subscribe\?")


class Console:
    """Everything the page said on its console at level warning or error, and its uncaught errors."""

    def __init__(self, page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))

    def _on_console(self, message) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console.{message.type}: {message.text}")

    def assert_clean(self, allowed: re.Pattern[str] | None = None) -> None:
        self.page.evaluate("0")  # a round trip, so events sent before now have been dispatched
        left = [p for p in self.problems if not (allowed and allowed.search(p))]
        assert left == [], "the page logged problems:\n" + "\n".join(left)


class FakeReport:
    """Publishes what the report job publishes on `run.<id>`, when the test says so."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.run_id = uuid.uuid4().hex
        self.channel = f"run.{self.run_id}"

    def status(self, stage: str, percent: int, **extra: object) -> dict:
        return self._publish("status", {"stage": stage, "percent": percent, **extra})

    def log(self, message: str, level: str = "info") -> dict:
        return self._publish("log", {"level": level, "message": message})

    def run(self, status: str, **extra: object) -> dict:
        return self._publish("run", {"status": status, **extra})

    def _publish(self, topic: str, data: dict) -> dict:
        return self.server.publish(self.channel, topic, data, run_id=self.run_id)

    def stored_log_ids(self) -> list[int]:
        token = self.server.token(self.channel, ["log"])
        response = httpx.get(
            self.server.url + "/api/realtime/messages", params={"token": token, "limit": 1000}, timeout=10
        )
        assert response.status_code == 200, response.text
        return [m["id"] for m in response.json()["messages"]]


def card_of(page, run_id: str):
    return page.locator(f'.report[data-run-id="{run_id}"]')


def shown_log_ids(card) -> list[int]:
    return [int(i) for i in card.locator(".log li").evaluate_all("items => items.map(li => li.dataset.id)")]


def screenshot(page, name: str, **options: object) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), **options)


def pump_until(page, condition, timeout: float = 15.0, what: str = "") -> None:
    """Like conftest.wait_until, for conditions set by Playwright callbacks.

    The sync API dispatches route, request and console callbacks only while a
    Playwright call runs, so the wait itself must be one.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        page.wait_for_timeout(20)


class HeldReconnects:
    """Hold the page's next stream requests until `release()`, to publish while it is disconnected."""

    def __init__(self, page) -> None:
        self.page = page
        self.held: list = []
        self.urls: list[str] = []
        page.route(SUBSCRIBE_URL, self._hold)

    def _hold(self, route) -> None:
        self.held.append(route)
        self.urls.append(route.request.url)

    def wait(self, what: str) -> None:
        pump_until(self.page, lambda: self.held, what=what)

    def release(self) -> None:
        for route in self.held:
            route.continue_()
        self.page.unroute(SUBSCRIBE_URL, self._hold)


def wait_for_token_expiry(server: LiveServer, report: FakeReport) -> None:
    """Until a token issued before now is refused: the server's clock decides, not ours."""
    token = server.token(report.channel, ["log"])

    def refused() -> bool:
        response = httpx.get(server.url + "/api/realtime/messages", params={"token": token}, timeout=5)
        return response.status_code == 401 and response.json()["error"]["code"] == "token_expired"

    wait_until(refused, timeout=10, interval=0.1, what="the token to expire")
