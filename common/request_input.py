"""Reading what a client sent, the same strict way for every endpoint.

Bodies are JSON in strict UTF-8, declared as `Content-Type: application/json`
(415 otherwise), with no NaN or Infinity, which JSON does not have and
browsers cannot parse. Each endpoint passes its own size limit (docs/protocol.md §3.3:
a token request is small, a batch of events is not) and the error that names
what was too large; time limits come from `BODY_TIMEOUT_S` (docs/protocol.md
§3.3).

A body costs the worker a bounded share of its time and memory, whatever a
client sends (issue 18): it is read a step at a time, each step followed by a
turn for the worker's other greenlets, and its values are counted on the text
(`jsontext.MAX_VALUES`) before parsing builds any of them.

Cross-site requests: a web page on another site can make a browser POST
anywhere without asking (no CORS preflight) as long as the body is
`text/plain`, a form, or nothing at all, e.g. `fetch(url, {method: "POST",
mode: "no-cors"})`; the page cannot read the answer, but the request has
done its work: started or cancelled a run, on a server only the victim's
browser may reach. So `refuse_cross_site` turns away every state-changing
request a browser says came from another site, whatever its body, and the
Content-Type rule below stays for browsers too old to say (no
`Sec-Fetch-Site`, no `Origin` on a form post).
"""
from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import urlsplit

import gevent
from flask import Flask, current_app, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from common import jsontext
from common.errors import AppError
from common.greenlets import gevent_is_patched

#: The whole body must arrive within this many seconds: a client trickling a
#: byte now and then would otherwise hold its connection (and greenlet) forever.
BODY_TIMEOUT_S = 10.0

#: The body limit of endpoints that take a few small fields (a token request, a run id).
SMALL_BODY_BYTES = 64 * 1024

#: How much of a body is read between two turns given to the worker's other greenlets; gunicorn's
#: own largest read step (its body reader copies what it buffered at each read: fewer, larger reads).
READ_STEP_BYTES = 1024 * 1024


class BodyTimeout(AppError):
    """The body trickled in too slowly (408; docs/protocol.md §3.3)."""

    status = 408
    code = "request_timeout"


class BodyTooLarge(AppError):
    """A body over its endpoint's limit (413); endpoints with a more telling code pass their own."""

    status = 413
    code = "body_too_large"


class UnsupportedMediaType(AppError):
    status = 415
    code = "unsupported_media_type"
    headers = {"Accept-Post": "application/json"}  # the type that would do, as a 405's Allow names methods


class CrossSiteRequest(AppError):
    status = 403
    code = "cross_site_request"


#: Methods that change state: all but the safe ones (RFC 9110 §9.2.1), which change nothing here.
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: `Sec-Fetch-Site` values of requests this app's own pages send, or the user typed.
#: `same-site` is refused too: a sibling subdomain (user content, a forgotten
#: host taken over) is another site for this app, which answers no CORS request.
TRUSTED_FETCH_SITES = frozenset({"same-origin", "none"})


def refuse_cross_site() -> None:
    """403 `cross_site_request` for a state-changing request sent by a page of another site.

    Browsers say where a request comes from: `Sec-Fetch-Site` (Fetch Metadata,
    all current browsers) or, from older ones, `Origin` (sent with every POST).
    A request with neither did not come from a web page (curl, a server, a
    task queue) and passes.
    """
    if request.method not in STATE_CHANGING_METHODS:
        return
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        if fetch_site.lower() in TRUSTED_FETCH_SITES:
            return
        raise CrossSiteRequest(
            f"a page on another site may not change anything here (Sec-Fetch-Site: {fetch_site}); "
            "call this API from this server's own pages, or from a server"
        )
    origin = request.headers.get("Origin")
    # The host and port the browser put in the URL, in both headers; not the
    # scheme, which behind a TLS proxy the app may not know.
    if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
        raise CrossSiteRequest(
            f"a page of {origin} may not change anything on {request.host}; "
            "call this API from this server's own pages, or from a server"
        )


def init_app(app: Flask) -> None:
    app.before_request(refuse_cross_site)


def check_content_type() -> None:
    """415 unless a body, if any, is declared `application/json` (parameters such as a charset allowed).

    `json_body` calls it; so do POST views that read no body but change state
    (cancel a run, start a report), since a cross-site form from a browser
    without `Sec-Fetch-Site` can reach them too. A POST with no body and no
    Content-Type (`curl -X POST`, `fetch` without a body) passes; any other
    declared type is refused even with an empty body, which is what a
    cross-site form without fields sends.
    """
    declared = request.headers.get("Content-Type")
    if declared is None and not _has_body():
        return
    if request.mimetype != "application/json":  # lowercase, without parameters
        raise UnsupportedMediaType(
            f"the body must be JSON sent as 'Content-Type: application/json', not {declared or 'no Content-Type'!r}"
        )


def _has_body() -> bool:
    if request.content_length is not None:
        return request.content_length > 0
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def json_body(max_bytes: int = SMALL_BODY_BYTES, too_large: type[AppError] = BodyTooLarge) -> Any:
    """The request body as a JSON value, at most `max_bytes` long.

    415 when it is not declared JSON, 413 `too_large` when it is longer or
    holds more than `jsontext.MAX_VALUES` values, 408 when it trickles in, 400
    `invalid_json` when it does not parse. Nothing is read before the
    Content-Type and a declared Content-Length are checked.
    """
    check_content_type()
    # An operator's app-wide MAX_CONTENT_LENGTH, if any, stays a ceiling.
    ceiling = current_app.config.get("MAX_CONTENT_LENGTH")
    limit = max_bytes if ceiling is None else min(max_bytes, ceiling)
    request.max_content_length = limit  # read by Werkzeug when it opens the body stream, next
    message = f"the request body is over {limit} bytes, the limit of this endpoint"
    try:
        # A Content-Length over the limit, or a chunked body read up to it that goes on (one
        # of exactly `limit` bytes, whose end Werkzeug cannot tell apart from more to come).
        raw = _read_body()
    except RequestEntityTooLarge:
        raise too_large(message) from None
    try:
        body = jsontext.decode(raw)
    except jsontext.TooManyValues as exc:
        raise too_large(f"the request body holds {exc}, the limit of this endpoint; send fewer at a time") from None
    except jsontext.NotJSON:
        raise AppError("the body must be JSON encoded as UTF-8", code="invalid_json") from None
    _let_others_run()  # between parsing a large body and what the view does with it (encode, store)
    return body


def _read_body() -> bytes:
    """The raw body, read within `BODY_TIMEOUT_S` under gevent, a step at a time.

    gunicorn's gevent worker has no per-request timeout, so the deadline is a
    `gevent.Timeout` around the read. Only our own instance is caught: an
    outer timeout (the worker's, a caller's) must still reach its owner.
    Without gevent (tests, `flask run`) the body is read as it comes.

    A read lets the other greenlets run only when it has to wait for the
    client; one that sends fast never makes it wait, and reading megabytes
    (gunicorn parses chunked framing in Python) held every stream of the
    worker for seconds. So each step ends with a turn for the others.
    """
    deadline = gevent.Timeout(BODY_TIMEOUT_S) if gevent_is_patched() else None
    if deadline is not None:
        deadline.start()
    # Up to the Content-Length, never past it: under gunicorn (`wsgi.input_terminated`) Werkzeug
    # cuts the stream at the endpoint's limit and refuses a read past it, even at the end of a
    # body of exactly that size. A chunked body is read until it ends, or goes past the limit.
    steps, left = [], request.content_length
    try:
        while left is None or left > 0:
            step = request.stream.read(READ_STEP_BYTES if left is None else min(left, READ_STEP_BYTES))
            if not step:
                break
            steps.append(step)
            if left is not None:
                left -= len(step)
            _let_others_run()
        return b"".join(steps)
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise
        raise BodyTimeout(
            f"the request body did not arrive within {BODY_TIMEOUT_S:g} s; send it in one go"
        ) from None
    except (OSError, ClientDisconnected):
        # The client went away mid-body: gunicorn raises NoMoreData (an
        # OSError), which Werkzeug's LimitedStream turns into ClientDisconnected.
        raise AppError("the request body ended before it was complete", code="malformed_request") from None
    finally:
        if deadline is not None:
            deadline.close()


def _let_others_run() -> None:
    """Under gevent, a turn for the worker's other greenlets (its streams) between long steps."""
    if gevent_is_patched():
        gevent.sleep(0)


def json_object(max_bytes: int = SMALL_BODY_BYTES, too_large: type[AppError] = BodyTooLarge) -> dict[str, Any]:
    """The request body, which must be a JSON object (see `json_body`)."""
    body = json_body(max_bytes, too_large)
    if not isinstance(body, dict):
        raise AppError("the body must be a JSON object", code="invalid_json")
    return body


def bearer_token() -> str | None:
    """The credentials of `Authorization: Bearer ...`, or None."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def bearer_matches(expected: str) -> bool:
    """Whether `Authorization: Bearer ...` carries `expected` (compared in constant time)."""
    given = bearer_token()
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
