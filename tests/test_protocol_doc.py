"""docs/protocol.md against the code: each claim of the page that a test can check cheaply.

The page is the users' reference (the README, the other docs and the code's comments point to
its sections), so what it lists is read from the page itself and compared with what the code
does: the stream's bytes with realtime/sse.py, the settings and their defaults with the
extensions' DEFAULTS, the error codes with the errors the code raises, the endpoints with the
app's routes, the metrics with what GET /metrics serves. A change on either side that the
other does not follow fails here, saying which section to update.
"""
from __future__ import annotations

import ast
import functools
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pytest
from werkzeug.exceptions import BadRequest, MethodNotAllowed, NotFound, RequestEntityTooLarge

from common.errors import AppError, _http_code
from jobs.extension import DEFAULTS as JOBS_DEFAULTS
from realtime import sse
from realtime.extension import DEFAULTS as REALTIME_DEFAULTS
from realtime.extension import Realtime
from realtime.store import Message

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEFAULTS = {**REALTIME_DEFAULTS, **JOBS_DEFAULTS}

#: The code that answers HTTP and reads settings (the demo is not part of the protocol).
SERVER_CODE = ["app.py", "gunicorn.conf.py", "common", "realtime", "jobs"]


def section(number: int) -> str:
    """The text of `## <number>. ...` up to the next `## ` heading."""
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", DOC, re.M | re.S)
    assert match, f"docs/protocol.md has no section {number}"
    return match.group(0)


def fenced(text: str, lang: str) -> list[str]:
    """The bodies of the ```lang blocks in `text` (lang "" for bare ones), indentation removed,
    each line ending in LF."""
    blocks, body, indent, open_lang = [], [], "", None
    for line in text.splitlines():
        fence = re.fullmatch(r"([ \t]*)```(\w*)", line)
        if open_lang is None and fence:
            indent, open_lang, body = fence.group(1), fence.group(2), []
        elif open_lang is not None and line == indent + "```":
            if open_lang == lang:
                blocks.append("".join(part + "\n" for part in body))
            open_lang = None
        elif open_lang is not None:
            body.append(line[len(indent):])
    return blocks


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Rows of the markdown tables in `text` whose first cell matches `first_cell` (cells stripped)."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(first_cell, cells[0]):
            rows.append(cells)
    return rows


def python_files(*parts: str) -> list[Path]:
    files = []
    for part in parts:
        path = ROOT / part
        files.extend([path] if path.is_file() else sorted(path.rglob("*.py")))
    return files


# -- section 6: the stream's bytes ---------------------------------------------------------------


def example_message() -> Message:
    return Message(
        id=17, channel="run.42", topic="status", data_json='{"stage": "fetching", "percent": 10}', run_id=None,
        created_at=datetime(2026, 11, 28, 6, 0, 0, 123456, tzinfo=timezone.utc),
    )


def test_the_stream_example_is_what_sse_py_writes():
    stream, reset = fenced(section(6), "text")
    assert stream.encode() == (
        sse.retry_frame(REALTIME_DEFAULTS["REALTIME_RETRY_MS"])
        + sse.message_frame("3f9a1c2b-17", "status", example_message().envelope_json())
        + sse.KEEP_ALIVE
    )
    assert reset.encode() == sse.reset_frame("history_truncated", "3f9a1c2b-40")


def test_the_envelope_example_is_what_the_store_sends():
    (envelope,) = fenced(section(5), "json")
    assert envelope == example_message().envelope_json() + "\n"


def test_the_comments_the_doc_quotes_are_the_ones_sent():
    for comment in (sse.KEEP_ALIVE, sse.SHUTDOWN):
        assert f"`{comment.decode().strip()}`" in section(6)


def test_the_stream_headers_are_the_ones_sent(client):
    (head,) = fenced(section(6), "")
    status, *lines = head.splitlines()
    documented = dict(line.split(": ", 1) for line in lines)
    token = client.post("/api/realtime/token", json={"channel": "doc.headers", "topics": ["status"]}).json["token"]
    response = client.get(f"/api/realtime/subscribe?token={token}")  # not read: it never ends
    try:
        assert status.endswith(f" {response.status}")
        assert {name: response.headers[name] for name in documented} == documented
    finally:
        response.close()


# -- section 2: configuration --------------------------------------------------------------------


def _documented_default(text: str) -> object:
    text = text.strip("`")
    if text in ("unset", "true", "false"):
        return {"unset": None, "true": True, "false": False}[text]
    return float(text)


@pytest.mark.parametrize("row", table_rows(section(2), r"`[A-Z_]+`"), ids=lambda row: row[0].strip("`"))
def test_each_documented_default_is_the_code_default(row):
    key, default = row[0].strip("`"), row[1]
    if key not in DEFAULTS:  # read by name elsewhere (METRICS_KEY): no default but "unset"
        assert default == "unset" and key in _quoted_strings(), f"{key} is not read by the code"
        return
    value = DEFAULTS[key]
    expected = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    assert _documented_default(default) == expected, f"docs/protocol.md section 2 says {key} defaults to {default}"


@functools.cache
def _quoted_strings() -> frozenset[str]:
    """Every string constant in the server's code: a setting the code reads is one of them."""
    found = set()
    for path in python_files(*SERVER_CODE):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return frozenset(found)


def test_every_setting_the_doc_names_is_read_by_the_code():
    named = {key for key in re.findall(r"\b(?:FLASK_)?([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\b", DOC)}
    named -= {"GUNICORN_CMD_ARGS"}  # gunicorn's own
    unread = sorted(key for key in named if key not in DEFAULTS and key not in _quoted_strings())
    assert not unread, f"docs/protocol.md names settings the code does not read: {unread}"


def test_every_setting_is_documented_in_the_protocol_or_the_readme():
    missing = sorted(key for key in DEFAULTS if key not in DOC and key not in README)
    assert not missing, f"settings with a default but no documentation: {missing}"


# -- section 3: error codes ----------------------------------------------------------------------


def _app_error_classes() -> list[type[AppError]]:
    found, todo = [], [AppError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _codes_in_source() -> dict[str, set[int | None]]:
    """code -> the statuses it is answered with (None: not known from the source alone)."""
    classes = {cls.__name__: cls for cls in _app_error_classes()}
    codes: dict[str, set[int | None]] = {}
    for path in python_files(*SERVER_CODE):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name in classes:
                for statement in node.body:
                    if (isinstance(statement, ast.Assign) and [getattr(t, "id", None) for t in statement.targets] == ["code"]
                            and isinstance(statement.value, ast.Constant)):
                        codes.setdefault(statement.value.value, set()).add(classes[node.name].status)
            elif isinstance(node, ast.Call):
                name = getattr(node.func, "id", None)
                for keyword in node.keywords:  # SomeError("...", code="invalid_channel")
                    if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                        status = classes[name].status if name in classes else None
                        codes.setdefault(keyword.value.value, set()).add(status)
                status_and_code = [a.value for a in node.args[:2] if isinstance(a, ast.Constant)]
                if len(status_and_code) == 2 and isinstance(status_and_code[0], int) and isinstance(status_and_code[1], str):
                    status, code = status_and_code  # error_response(400, "malformed_request", ...)
                    codes.setdefault(code, set()).add(status)
            elif isinstance(node, ast.Dict):  # a body written by hand: {"code": "server_busy", ...}
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "code" and isinstance(value, ast.Constant):
                        codes.setdefault(value.value, set()).add(None)
    for http_error in (BadRequest, NotFound, MethodNotAllowed, RequestEntityTooLarge):  # common/errors.py
        codes.setdefault(_http_code(http_error()), set()).add(http_error.code)
    return codes


def _documented_codes() -> list[tuple[int, str]]:
    return [(int(row[0]), row[1].strip("`")) for row in table_rows(section(3), r"\d{3}")]


def test_every_documented_error_code_is_answered_by_the_code(app):
    codes = _codes_in_source()
    for status, code in _documented_codes():
        assert code in codes, f"docs/protocol.md section 3.1 lists {code}, which the code never answers"
        known = codes[code] - {None}
        assert not known or status in known, f"{code} is answered with {sorted(known)}, not {status}"


def test_every_error_code_of_the_code_is_documented(app):
    documented = {code for _, code in _documented_codes()}
    missing = sorted(code for code in _codes_in_source() if code not in documented and f"`{code}`" not in DOC)
    assert not missing, f"error codes the code answers that docs/protocol.md does not list: {missing}"


# -- sections 4, 5, 7, 8: endpoints --------------------------------------------------------------


def _route(path: str) -> str:
    return re.sub(r"<[^>]*>", "<>", path)


def test_every_documented_endpoint_exists(app):
    routes = {(method, _route(rule.rule)) for rule in app.url_map.iter_rules() for method in rule.methods}
    documented = set(re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)", DOC))
    missing = sorted(f"{method} {path}" for method, path in documented if (method, _route(path)) not in routes)
    assert documented and not missing, f"docs/protocol.md documents endpoints the app does not have: {missing}"


def test_every_endpoint_of_the_protocol_is_documented(app):
    documented = {(method, _route(path)) for method, path in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)", DOC)}
    missing = sorted(
        f"{method} {rule.rule}"
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/") or rule.rule in ("/healthz", "/readyz", "/metrics")
        for method in rule.methods - {"HEAD", "OPTIONS"}
        if (method, _route(rule.rule)) not in documented
    )
    assert not missing, f"endpoints docs/protocol.md does not document: {missing}"


# -- section 8: metrics --------------------------------------------------------------------------


def _served_metrics(client) -> dict[str, str]:
    response = client.get("/metrics")
    assert response.status_code == 200
    served = dict(re.findall(r"^# TYPE (\S+) (\S+)$", response.get_data(as_text=True), re.M))
    # prometheus_client's companion series of each counter and histogram, not metrics of their own.
    return {name: kind for name, kind in served.items() if not (name.endswith("_created") and kind == "gauge")}


def _documented_metrics() -> dict[str, str]:
    rows = table_rows(section(8), r"`[a-z_]+(\{[a-z_,]+\})?`")
    return {re.sub(r"\{.*", "", row[0].strip("`")): row[1] for row in rows}


def test_every_documented_metric_is_served_with_its_type(client):
    served, documented = _served_metrics(client), _documented_metrics()
    assert documented
    wrong = {name: (kind, served.get(name)) for name, kind in documented.items() if served.get(name) != kind}
    assert not wrong, f"docs/protocol.md section 8 (documented, served): {wrong}"


def test_every_metric_of_the_app_is_documented(client):
    ours = {name for name in _served_metrics(client) if name.startswith(("realtime_", "jobs_"))}
    missing = sorted(ours - set(_documented_metrics()))
    assert not missing, f"metrics /metrics serves that docs/protocol.md section 8 does not list: {missing}"


# -- section 10: the Python names it gives -------------------------------------------------------


def test_every_python_name_of_the_integrations_exists():
    named = set(re.findall(r"`(realtime\.(?:client|publisher|integrations\.\w+))\.(\w+)", DOC))
    assert named
    for module, name in sorted(named):
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert name in defined, f"docs/protocol.md section 10 names {module}.{name}, which does not exist"


# -- section 11: text streams; section 12: several channels on one stream --------------------


def _documented_text_messages() -> dict[str, set[str]]:
    """Section 11's table: what each kind of message is -> the keys its `data` has (`?` marks optional)."""
    kinds = {}
    for line in section(11).splitlines():
        cells = [cell.strip() for cell in line.replace("\\|", "/").strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[1].startswith("`{"):
            kinds[cells[0]] = set(re.findall(r'"(\w+)"\??:', cells[1])) | (
                {"status", "error"} if "with `status` and `error`" in cells[1] else set()
            )
    return kinds


def test_text_stream_messages_have_the_keys_section_11_gives_them(tmp_path):
    from conftest import app_on

    documented = _documented_text_messages()
    assert list(documented) == ["an attempt's start", "a delta (live)", "the text so far (replay)", "the end (the next seq)"]
    for app in app_on(f"sqlite:///{tmp_path / 'texts.sqlite3'}", REALTIME_TEXT_FLUSH_MS=None):
        realtime = app.extensions["realtime"]
        try:
            with realtime.text_stream("run.doc", "answer") as out:
                out.write("Hello")
                realtime.text_flusher.flush()
                raise KeyError("secret")
        except KeyError:
            pass
        start, delta, end = [m.data for m in realtime.store.read_new(0, 100)]
        [folded] = realtime.store.read_after("run.doc", None, 0, 100)
        assert set(start) == documented["an attempt's start"] and start["seq"] == 0 and start["text"] == ""
        assert set(delta) == documented["a delta (live)"]
        assert set(end) == documented["the end (the next seq)"] and end["delta"] == "" and end["error"] == "KeyError"
        assert set(folded.data) == documented["the text so far (replay)"]
        assert folded.data["text"] == "Hello" and folded.data["seq"] == end["seq"]


def test_several_channels_on_one_stream_are_as_section_12_says(client, app):
    text = section(12)
    assert "Not available yet" not in text and "planned" not in DOC.split("## 1. Commands")[0].lower()
    request_json, answer_json = [json_block for json_block in fenced(text, "json")][:2]
    answer = client.post("/api/realtime/token", data=request_json, content_type="application/json")
    assert answer.status_code == 200, answer.get_json()
    documented = _json_loads(answer_json)
    assert set(answer.get_json()) == set(documented) and answer.get_json()["channels"] == documented["channels"]
    # The reset example is what a stream of several channels writes.
    from realtime.stream import Reset

    [reset_example] = [block for block in fenced(text, "text") if "event: reset" in block]
    data = _json_loads(reset_example.split("data: ", 1)[1])
    assert Reset(data["reason"], data["cursor"], tuple(data["channels"])).frame().decode() == reset_example
    # `since` as documented: a malformed one is the documented error, a channel outside the token 403.
    token = answer.get_json()["token"]
    assert client.get("/api/realtime/subscribe", query_string={"token": token, "since": "run.9:0"}).status_code == 403
    bad = client.get("/api/realtime/subscribe", query_string={"token": token, "since": "run.1"})
    assert bad.get_json()["error"]["code"] == "invalid_last_event_id" and "`since`" in section(3)


def _json_loads(text: str):
    import json

    return json.loads(text)


# -- every pointer leads into the repository -----------------------------------------------------

#: Names of the project's private contract document, which users of this repository do not
#: have (spelled in pieces so that this file does not mention them itself).
OUTSIDE_POINTERS = ["shared " + "folder", "contract" + ".md"]

#: Where pointers to that document's sections stood; they point to docs/protocol.md now.
#: (tests/, app.py and gunicorn.conf.py still name it in comments.)
PROTOCOL_READERS = ["README.md", "docs", "static", "templates", "realtime", "jobs", "common", "demo"]


def _repository_files(*parts: str) -> Iterator[Path]:
    for part in parts:
        path = ROOT / part
        if path.is_file():
            yield path
            continue
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = [name for name in subfolders if name not in (".git", ".venv", "node_modules", "__pycache__")]
            yield from (Path(folder, name) for name in files)


def test_no_file_points_outside_the_repository():
    offenders = sorted(
        str(path.relative_to(ROOT))
        for path in _repository_files(".")
        if any(pointer.encode() in path.read_bytes().lower() for pointer in OUTSIDE_POINTERS)
    )
    assert not offenders, f"files that send readers to a document they do not have: {offenders}"


def test_the_docs_and_the_code_cite_the_protocol_not_the_private_contract():
    offenders = sorted(
        str(path.relative_to(ROOT))
        for path in _repository_files(*PROTOCOL_READERS)
        if b"CONTRACT" in path.read_bytes()
    )
    assert not offenders, f"cite docs/protocol.md and its section instead, in: {offenders}"
