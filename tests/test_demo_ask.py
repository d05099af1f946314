"""The demo's Ask card, server side (demo/ask.py, demo/views.py): the local generator, `POST /demo/ask`,
the answer's text stream end to end, Stop with the run's cancel token, and the OpenAI path against a
local fake server (tests/openai_server.py)."""
from __future__ import annotations

import sys

import httpx
import pytest
from sqlalchemy import func, select

from conftest import PUBLISH_KEY, FakeClock, app_on, skip_or_fail, wait_until
from demo.ask import MAX_PROMPT_CHARS, local_answer, paced, tokenize
from jobs.capabilities import CancelTokens
from jobs.tables import runs
from json_errors import assert_json_error

PROMPT = "How does the page resume a stream after a dropped connection?"
SECRET_API_KEY = "sk-test-never-shown-4f1d"


def make_app(tmp_path, **config):
    """A demo app whose answers come from the local generator at full speed, unless `config` says."""
    defaults = {
        "REALTIME_PUBLISH_KEY": PUBLISH_KEY, "DEMO_ENABLED": True, "DEMO_ASK_TOKENS_PER_S": 0,
        "OPENAI_BASE_URL": "",  # the local generator, whatever the environment says
    }
    yield from app_on(f"sqlite:///{tmp_path / 'ask.sqlite3'}", **{**defaults, **config})


@pytest.fixture
def app(tmp_path):
    """Eager mode: a run executes inside the request that starts it."""
    yield from make_app(tmp_path)


@pytest.fixture
def client(app):
    return app.test_client()


def ask(client, prompt: str = PROMPT) -> dict:
    response = client.post("/demo/ask", json={"prompt": prompt})  # what static/app.js sends
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def answer_of(client, run_id: str) -> dict:
    """The answer's text stream as a reload gets it: one message folding every delta ({} before it starts)."""
    token = client.post("/api/realtime/token", json={"channel": f"run.{run_id}", "topics": ["answer"]}).get_json()
    response = client.get("/api/realtime/messages", query_string={"token": token["token"]})
    assert response.status_code == 200, response.get_data(as_text=True)
    found = response.get_json()["messages"]
    assert len(found) <= 1, found
    return found[0]["data"] if found else {}


def lifecycle(client, run_id: str) -> list[str]:
    token = client.post("/api/realtime/token", json={"channel": f"run.{run_id}", "topics": ["run"]}).get_json()
    found = client.get("/api/realtime/messages", query_string={"token": token["token"]}).get_json()["messages"]
    return [m["data"]["status"] for m in found]


def cancel(client, run_id: str, token: str):
    return client.post(f"/api/runs/{run_id}/cancel", headers={"Authorization": f"Bearer {token}"})


# -- the local generator ----------------------------------------------------------------------


def test_the_local_answer_is_the_same_for_the_same_prompt_and_a_few_paragraphs_long():
    answer = local_answer(PROMPT)
    assert local_answer(PROMPT) == answer
    assert local_answer(PROMPT + " And why?") != answer
    tokens = tokenize(answer)
    assert "".join(tokens) == answer
    # 150-400 tokens, then the sentence that passes the count and a closing one.
    assert 150 <= len(tokens) <= 500
    assert 3.0 <= len(answer) / len(tokens) <= 5.0, "tokens of about four characters"
    assert answer.count("\n\n") >= 1 and "dropped connection" in answer


def test_the_answer_length_is_configurable():
    assert len(tokenize(local_answer(PROMPT, 40))) < 150
    assert len(tokenize(local_answer(PROMPT, 2000))) >= 2000


def test_the_pace_is_configurable_and_does_not_drift():
    clock = FakeClock()
    now = lambda: clock().timestamp()  # noqa: E731
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        clock.advance(seconds)

    for piece in paced(["a", "b", "c", "d"], 40, clock=now, sleep=sleep):
        if piece == "b":
            clock.advance(0.01)  # the caller took 10 ms over this piece: the next wait is shorter
    assert slept == [0.025, 0.015, 0.025]
    slept.clear()
    assert list(paced(["a", "b", "c"], 0, clock=now, sleep=sleep)) == ["a", "b", "c"]
    assert slept == [], "0: as fast as it comes"


# -- POST /demo/ask, end to end -----------------------------------------------------------------


def test_asking_streams_the_local_answer_and_grants_a_cancel_token(app, client):
    grant = ask(client)
    run_id = grant["run_id"]
    assert grant["kind"] == "ask" and grant["channel"] == f"run.{run_id}"
    assert grant["topics"] == ["answer", "run"] and grant["token"] and grant["expires_at"]
    assert grant["prompt"] == PROMPT  # the page shows it above the answer
    assert app.extensions["jobs"].cancel_tokens.allows(grant["cancel_token"], run_id)

    expected = local_answer(PROMPT)
    answer = answer_of(client, run_id)
    assert (answer["text"], answer["status"]) == (expected, "completed")
    assert answer["text_stream"].startswith(run_id) and answer["seq"] > 1
    run = app.extensions["jobs"].run(run_id)
    assert (run.function_id, run.status, run.output) == (
        "answer-question", "completed", {"source": "local", "characters": len(expected)})
    assert lifecycle(client, run_id) == ["queued", "running", "completed"]


def test_the_token_refresh_knows_an_ask_run_from_a_report(client):
    run_id = ask(client)["run_id"]
    grant = client.post("/demo/token", json={"run_id": run_id}).get_json()
    assert (grant["kind"], grant["topics"]) == ("ask", ["answer", "run"]) and grant["cancel_token"]
    assert grant["prompt"] == PROMPT  # a reload shows the question again
    # A run the demo does not know (or no longer keeps) is watched as a report, and gets no cancel token.
    grant = client.post("/demo/token", json={"run_id": "0123456789abcdef"}).get_json()
    assert (grant["kind"], grant["topics"]) == ("report", ["status", "log", "run"]) and "cancel_token" not in grant


@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": "   "}, {"prompt": 42},
                                  {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}])
def test_a_bad_prompt_is_400_and_starts_nothing(app, client, body):
    error = assert_json_error(client.post("/demo/ask", json=body), 400, "invalid_prompt")
    assert f"1-{MAX_PROMPT_CHARS} characters" in error["message"]
    with app.extensions["database"].engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(runs)).scalar() == 0


def test_with_the_demo_off_there_is_no_ask_route_nor_job(tmp_path):
    for app in make_app(tmp_path, DEMO_ENABLED=False):
        assert_json_error(app.test_client().post("/demo/ask", json={"prompt": PROMPT}), 404, "not_found")
        assert "answer-question" not in app.extensions["jobs"].registry.ids


# -- Stop ---------------------------------------------------------------------------------------


@pytest.fixture
def pooled(tmp_path):
    """The embedded pool on real threads: a cancel must reach a step that is still writing.
    A long, slow answer, so it is still streaming when the test stops it."""
    yield from make_app(tmp_path, JOBS_EAGER=False, JOBS_EMBEDDED=True,
                        DEMO_ASK_TOKENS_PER_S=50, DEMO_ASK_TOKENS=5000)


def test_stop_ends_the_stream_cancelled_keeping_its_text_and_the_run_cancelled(pooled):
    client = pooled.test_client()
    grant = ask(client)
    run_id = grant["run_id"]
    jobs = pooled.extensions["jobs"]
    wait_until(lambda: len(answer_of(client, run_id).get("text", "")) >= 40, what="the answer to start")

    assert cancel(client, run_id, grant["cancel_token"]).status_code == 202
    wait_until(lambda: jobs.run(run_id).status == "cancelled", what="the run to end")
    answer = answer_of(client, run_id)
    assert answer["status"] == "cancelled"
    assert len(answer["text"]) >= 40 and local_answer(PROMPT, 5000).startswith(answer["text"])
    assert lifecycle(client, run_id)[-1] == "cancelled"


@pytest.fixture
def queued(tmp_path):
    """No worker: runs stay queued, so a cancel that got through would show."""
    yield from make_app(tmp_path, JOBS_EAGER=False, JOBS_EMBEDDED=False)


def test_a_wrong_expired_or_other_runs_cancel_token_is_401_and_cancels_nothing(queued):
    client = queued.test_client()
    jobs = queued.extensions["jobs"]
    mine, other = ask(client), ask(client)
    run_id = mine["run_id"]
    expired = CancelTokens(queued.config["SECRET_KEY"], ttl_s=300, now=lambda: 0.0).issue(run_id)
    forged = CancelTokens("another-secret").issue(run_id)
    subscription = mine["token"]  # a token for the run's channel is no cancel token
    for token in (other["cancel_token"], expired, forged, subscription, "nonsense"):
        assert_json_error(cancel(client, run_id, token), 401, "invalid_cancel_token")
    assert jobs.run(run_id).status == "queued"

    jobs.event_key = "operator-key"  # where the operator's key is required, the capability still passes
    assert cancel(client, run_id, mine["cancel_token"]).status_code == 202
    assert jobs.run(run_id).status == "cancelled"
    assert jobs.run(other["run_id"]).status == "queued"


# -- an OpenAI-compatible server ----------------------------------------------------------------


@pytest.fixture
def fake_openai():
    try:
        import openai  # noqa: F401
    except ImportError:
        skip_or_fail("the openai package is not installed (pip install -r requirements-openai.txt): "
                     "the OPENAI_BASE_URL path of demo/ask.py is not tested")
    from openai_server import FakeOpenAI

    return FakeOpenAI


def test_with_openai_base_url_the_answer_streams_from_that_server(tmp_path, fake_openai):
    pieces = ["Server-sent", " events", " resume", " with", " `Last-Event-ID`", ":", " the ", "cursor", ".\n\n", "Done."]
    with fake_openai(pieces) as server:
        for app in make_app(tmp_path, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=SECRET_API_KEY,
                            OPENAI_MODEL="fake-model"):
            client = app.test_client()
            run_id = ask(client)["run_id"]
            answer = answer_of(client, run_id)
            assert (answer["text"], answer["status"]) == ("".join(pieces), "completed")
            assert app.extensions["jobs"].run(run_id).output == {"source": "openai", "characters": len("".join(pieces))}
    [request] = server.requests
    assert request["json"]["model"] == "fake-model" and request["json"]["stream"] is True
    assert request["json"]["messages"][-1] == {"role": "user", "content": PROMPT}
    assert request["authorization"] == f"Bearer {SECRET_API_KEY}"


def test_a_refusal_fails_the_run_at_once_without_showing_the_key(tmp_path, fake_openai):
    with fake_openai([], status=401) as server:
        for app in make_app(tmp_path, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=SECRET_API_KEY):
            client = app.test_client()
            run_id = ask(client)["run_id"]
            run = app.extensions["jobs"].run(run_id)
            assert (run.status, run.attempt) == ("failed", 1), "a 401 is not retried"
            assert run.error == "ModelServerRefused: the model server answered 401 (AuthenticationError)"
            answer = answer_of(client, run_id)
            assert (answer["text"], answer["status"], answer["error"]) == ("", "failed", "ModelServerRefused")
            # The server's message quoted the key; nothing the app stored for the channel does.
            stored = app.extensions["realtime"].store.read_after(f"run.{run_id}", None, 0, 1000)
            assert stored and not any(SECRET_API_KEY in m.data_json for m in stored)
            assert SECRET_API_KEY not in client.get(f"/api/runs/{run_id}").get_data(as_text=True)
            assert SECRET_API_KEY not in client.get("/").get_data(as_text=True)
    assert server.requests[0]["authorization"] == f"Bearer {SECRET_API_KEY}"


def test_without_the_openai_package_the_run_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` raises ImportError
    for app in make_app(tmp_path, OPENAI_BASE_URL="http://127.0.0.1:9/v1"):
        client = app.test_client()
        run = app.extensions["jobs"].run(ask(client)["run_id"])
        assert run.status == "failed"
        assert run.error == ("ModelUnavailable: OPENAI_BASE_URL is set, but the openai package is not installed: "
                             "pip install -r requirements-openai.txt")


@pytest.mark.integration
def test_under_gunicorn_the_answer_streams_from_the_openai_server_too(start_server, tmp_path, fake_openai):
    """gevent workers, the job on a native thread of the embedded pool: the client's sockets work there."""
    pieces = ["A", " cursor", " and", " a", " log", "."]
    with fake_openai(pieces) as server:
        live = start_server(f"sqlite:///{tmp_path / 'live.sqlite3'}", workers=1, DEMO_ENABLED=True,
                            OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=SECRET_API_KEY)
        started = httpx.post(live.url + "/demo/ask", json={"prompt": PROMPT}, timeout=10)
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]
        wait_until(lambda: httpx.get(f"{live.url}/api/runs/{run_id}", timeout=10).json()["status"] == "completed",
                   timeout=30, what="the run to complete")
        token = httpx.post(live.url + "/api/realtime/token", json={"channel": f"run.{run_id}", "topics": ["answer"]},
                           timeout=10).json()["token"]
        [message] = httpx.get(live.url + "/api/realtime/messages", params={"token": token}, timeout=10).json()["messages"]
        assert (message["data"]["text"], message["data"]["status"]) == ("".join(pieces), "completed")
    assert SECRET_API_KEY not in live.log_path.read_text()
