"""Several channels on one stream (docs/protocol.md §12), without a server: tokens, the token
endpoint, one subscription for several channels, one replay read, `since`, resets, history."""
from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest
from itsdangerous import URLSafeSerializer

from json_errors import MESSAGES, SUBSCRIBE, assert_json_error
from realtime import sse
from realtime.cursor import Cursor
from realtime.dispatch import SeveralChannels
from realtime.errors import InvalidRequest, InvalidToken
from realtime.holds import Holds
from realtime.schema import intent_key
from realtime.store import Message, Ranges
from realtime.stream import open_scope_stream
from realtime.tokens import MAX_TOKEN_CHARS, TokenIssuer
from realtime.visibility import Writer, Writers
from test_dispatch import store  # noqa: F401 - the shared fixtures
from test_stream import clock, dispatcher  # noqa: F401

# -- tokens ------------------------------------------------------------------------------------


def test_a_token_for_several_channels_round_trips_and_says_so():
    issuer = TokenIssuer("secret", now=lambda: 1000.0)
    grant = issuer.issue_for({"run.1": ["status", "run"], "run.2": ["status"]})
    verified = issuer.verify(grant.token)
    assert verified.several and verified.channel is None
    assert dict(verified.channels) == {"run.1": ("status", "run"), "run.2": ("status",)}
    assert grant.to_json() == {
        "token": grant.token, "channels": {"run.1": ["status", "run"], "run.2": ["status"]},
        "expires_at": "1970-01-01T00:17:40+00:00",  # now + 60 s
    }
    single = issuer.verify(issuer.issue("run.1", ["status"]).token)
    assert not single.several and dict(single.channels) == {"run.1": ("status",)}


def test_a_hundred_runs_make_a_token_that_fits_a_url():
    channels = {f"run.{random.Random(n).getrandbits(64):016x}": ["status", "run", "report"] for n in range(100)}
    token = TokenIssuer("secret").issue_for(channels).token
    assert len(token) < 3000  # compressed: the topics repeat, the run ids do not


def test_names_too_long_for_one_token_are_refused():
    rng = random.Random(3)
    channels = {"".join(rng.choice("abcdefghij0123456789") for _ in range(200)): [f"t{n}" for n in range(30)]
                for _ in range(100)}
    with pytest.raises(InvalidRequest) as caught:
        TokenIssuer("secret").issue_for(channels)
    assert caught.value.code == "invalid_channel" and str(MAX_TOKEN_CHARS) in caught.value.message


@pytest.mark.parametrize("channels", [{}, [], "run.1", {"bad name": ["t"]}, {"run.1": []}, {"run.1": "t"},
                                      {f"c{n}": ["t"] for n in range(101)}])
def test_several_channels_are_checked_as_one_is(channels):
    with pytest.raises(InvalidRequest):
        TokenIssuer("secret").issue_for(channels)


ODD = {
    "channels a list": {"m": [["run.1", ["t"]]], "e": 2e6},
    "no channel": {"m": {}, "e": 2e6},
    "topics empty": {"m": {"run.1": []}, "e": 2e6},
    "channel with LF": {"m": {"run.1\n": ["t"]}, "e": 2e6},
    "both forms": {"m": {"run.1": ["t"]}, "c": "run.1", "t": ["t"], "e": 2e6},
    "no expiry": {"m": {"run.1": ["t"]}},
    "101 channels": {"m": {f"c{n}": ["t"] for n in range(101)}, "e": 2e6},
}


@pytest.mark.parametrize("payload", ODD.values(), ids=ODD.keys())
def test_signed_payloads_of_several_channels_of_the_wrong_shape_are_invalid(payload):
    token = URLSafeSerializer("secret", salt=TokenIssuer.salt).dumps(payload)
    with pytest.raises(InvalidToken):
        TokenIssuer("secret", now=lambda: 1000.0).verify(token)


# -- the token endpoint --------------------------------------------------------------------------


def test_the_endpoint_answers_a_grant_of_several_channels(client):
    body = {"channels": {"run.1": ["status", "run"], "run.2": ["status", "run"]}}
    answer = client.post("/api/realtime/token", json=body).get_json()
    assert set(answer) == {"token", "channels", "expires_at"}
    assert answer["channels"] == body["channels"]
    assert client.get(MESSAGES, query_string={"token": answer["token"]}).get_json()["messages"] == []


@pytest.mark.parametrize("body", [
    {"channel": "run.1", "topics": ["t"], "channels": {"run.2": ["t"]}},
    {"channels": {}},
    {"channels": {f"c{n}": ["t"] for n in range(101)}},
    {"channels": {"bad name": ["t"]}},
    {"channels": ["run.1"]},
])
def test_the_endpoint_refuses_a_bad_shape_with_400(client, body):
    response = client.post("/api/realtime/token", json=body)
    assert_json_error(response, 400, "invalid_channel")


def test_the_endpoint_refuses_a_bad_topic_list_with_invalid_topic(client):
    assert_json_error(client.post("/api/realtime/token", json={"channels": {"run.1": []}}), 400, "invalid_topic")


def test_the_policy_is_asked_for_each_channel_and_a_refusal_names_it(app, client):
    asked = []

    def policy(channel, topics):
        asked.append((channel, tuple(topics)))
        return channel != "secret.2"

    app.extensions["realtime"].authorize(policy)
    response = client.post("/api/realtime/token", json={"channels": {"run.1": ["t"], "secret.2": ["t"], "run.3": ["t"]}})
    assert_json_error(response, 403, "forbidden")
    assert "secret.2" in response.get_json()["error"]["message"]
    assert asked == [("run.1", ("t",)), ("secret.2", ("t",))]


def test_history_of_several_channels_pages_in_id_order_with_one_cursor(app, client, realtime):
    published = [realtime.publish(f"h.{n % 3}", "t" if n % 2 else "u", {"n": n}) for n in range(12)]
    token = realtime.create_token_for({"h.0": ["t", "u"], "h.1": ["t"]}).token
    wanted = [m.id for m in published if m.channel == "h.0" or (m.channel == "h.1" and m.topic == "t")]
    got, after = [], None
    while True:
        page = client.get(MESSAGES, query_string={"token": token, "limit": 2, **({"after": after} if after else {})})
        body = page.get_json()
        if not body["messages"]:
            break
        got += [m["id"] for m in body["messages"]]
        after = body["cursor"]
    assert got == wanted
    narrowed = client.get(MESSAGES, query_string={"token": token, "channel": "h.1"}).get_json()["messages"]
    assert {m["channel"] for m in narrowed} == {"h.1"}
    assert_json_error(client.get(MESSAGES, query_string={"token": token, "channel": "h.2"}), 403, "forbidden")


def test_subscribe_refuses_a_bad_since_before_the_stream(realtime, client):
    token = realtime.create_token_for({"a": ["t"], "b": ["t"]}).token
    assert_json_error(client.get(SUBSCRIBE, query_string={"token": token, "since": "zzz"}), 400, "invalid_last_event_id")
    assert_json_error(client.get(SUBSCRIBE, query_string={"token": token, "since": "a:nope"}), 400,
                      "invalid_last_event_id")
    assert_json_error(client.get(SUBSCRIBE, query_string={"token": token, "since": "c:0"}), 403, "forbidden")


# -- one stream, without HTTP -------------------------------------------------------------------


def frames_of(writes: list[bytes]) -> list[tuple[str, dict]]:
    """(event, data) of each frame the stream wrote."""
    found = []
    for write in writes:
        for frame in write.split(b"\n\n"):
            lines = dict(line.split(b": ", 1) for line in frame.split(b"\n") if b": " in line and not line.startswith(b":"))
            if b"data" in lines:
                found.append((lines[b"event"].decode(), json.loads(lines[b"data"])))
    return found


def ids(writes: list[bytes]) -> list[int]:
    return [data["id"] for event, data in frames_of(writes) if event != "reset"]


def test_one_stream_carries_every_channel_in_id_order_and_only_its_topics(store, dispatcher):  # noqa: F811
    old = [store.append(channel, topic, "1") for channel, topic in
           [("a", "t"), ("b", "t"), ("c", "t"), ("a", "x"), ("b", "t")]]
    dispatcher.prime()
    reads = store.reads
    stream = open_scope_stream(dispatcher, {"a": ["t"], "b": None}, None, retry_ms=100)
    assert next(stream) == b"retry: 100\n\n"
    assert ids([next(stream)]) == [old[0].id, old[1].id, old[4].id]
    assert store.reads - reads == 1, "one read for the page of both channels"
    live = [store.append(channel, topic, "2") for channel, topic in [("b", "y"), ("c", "t"), ("a", "x"), ("a", "t")]]
    dispatcher.dispatch_new()
    assert ids([next(stream)]) == [live[0].id, live[3].id]
    assert dispatcher.stream_count == 1
    stream.close()
    assert dispatcher.stream_count == 0


def test_a_cursor_resumes_every_channel_exactly(store, dispatcher):  # noqa: F811
    sent = [store.append("ab"[n % 2], "t", str(n)) for n in range(6)]
    stream = open_scope_stream(dispatcher, {"a": None, "b": None}, Cursor(store.epoch, sent[2].id), retry_ms=100)
    next(stream)
    assert ids([next(stream)]) == [m.id for m in sent[3:]]
    stream.close()


def test_since_starts_a_new_channel_earlier_and_the_others_exactly(store, dispatcher):  # noqa: F811
    sent = [store.append("abc"[n % 3], "t", str(n)) for n in range(9)]
    cursor = Cursor(store.epoch, sent[5].id)
    stream = open_scope_stream(dispatcher, {"a": None, "b": None, "c": None}, cursor,
                               since={"c": None}, retry_ms=100)
    next(stream)
    # c from its beginning, a and b after the cursor, all in id order.
    assert ids([next(stream)]) == [sent[2].id, sent[5].id, sent[6].id, sent[7].id, sent[8].id]
    stream.close()


def test_a_reconnect_keeping_its_since_goes_on_from_its_last_event_id(store, dispatcher):  # noqa: F811
    sent = [store.append("abc"[n % 3], "t", str(n)) for n in range(9)]
    scope = {"a": None, "b": None, "c": None}
    cursor = Cursor(store.epoch, sent[5].id)
    for got_through in [sent[2], sent[5], sent[6], sent[8]]:
        # The EventSource's URL still says since=c:0 and last_event_id=<cursor>; its header says how far it got.
        stream = open_scope_stream(dispatcher, scope, cursor, since={"c": None},
                                   progress=Cursor(store.epoch, got_through.id), retry_ms=100)
        next(stream)
        expected = [m.id for m in sent if m.id > got_through.id and (m.channel == "c" or m.id > sent[5].id)]
        assert ids([next(stream)] if expected else []) == expected
        stream.close()


def test_since_with_its_own_cursor_and_one_of_another_database(store, dispatcher):  # noqa: F811
    sent = [store.append("ab"[n % 2], "t", str(n)) for n in range(6)]
    stream = open_scope_stream(
        dispatcher, {"a": None, "b": None}, Cursor(store.epoch, sent[4].id),
        since={"b": Cursor(store.epoch, sent[1].id)}, retry_ms=100,
    )
    next(stream)
    assert ids([next(stream)]) == [sent[3].id, sent[5].id]
    stream.close()
    stream = open_scope_stream(dispatcher, {"a": None, "b": None}, Cursor(store.epoch, sent[4].id),
                               since={"b": Cursor("0" * 8, 3)}, retry_ms=100)
    next(stream)
    write = next(stream)
    assert frames_of([write])[0] == ("reset", {"reason": "unknown_cursor", "cursor": f"{store.epoch}-0",
                                               "channels": ["b"]})
    assert ids([write]) == [sent[1].id, sent[3].id, sent[5].id]
    stream.close()


def test_a_pruned_channel_is_reset_by_name_and_the_others_lose_nothing(store, dispatcher):  # noqa: F811
    seen = store.append("z", "t", "0")  # the client's cursor
    old_a = store.append("a", "t", "0")
    old_b = store.append("b", "t", "0")
    store.engine.dispose()
    with store.engine.begin() as conn:  # a retention that deleted the oldest ids
        conn.exec_driver_sql("UPDATE realtime_messages SET created_at = '2000-01-01 00:00:00' WHERE id <= ?",
                             (old_a.id,))
    store.prune(timedelta(days=1))
    kept = [store.append("ab"[n % 2], "t", str(n)) for n in range(3)]
    stream = open_scope_stream(dispatcher, {"a": None, "b": None}, Cursor(store.epoch, seen.id),
                               retry_ms=100)
    next(stream)
    write = next(stream)
    frames = frames_of([write])
    assert frames[0] == ("reset", {"reason": "history_truncated", "cursor": f"{store.epoch}-{old_a.id}",
                                   "channels": ["a"]})
    assert ids([write]) == [old_b.id] + [m.id for m in kept]
    stream.close()


# -- the dispatcher: one subscription, several channels, in id order --------------------------


def message(n: int, channel: str, data_json: str = "{}") -> Message:
    return Message(n, channel, "t", data_json, None, datetime.now(timezone.utc))


def test_one_subscription_is_registered_with_each_channel_and_leaves_all(dispatcher):
    subscription = dispatcher.subscribe_many({"a": None, "b": ["t"]})
    assert isinstance(subscription, SeveralChannels)
    assert dispatcher.stream_count == 1
    dispatcher._deliver([message(1, "a"), message(2, "c"), message(3, "b")])
    assert [i for i, _ in subscription.take()] == [1, 3]
    dispatcher.unsubscribe(subscription)
    assert dispatcher.stream_count == 0 and not dispatcher._channels


def test_a_held_channel_holds_the_others_back_until_its_message_comes(dispatcher):
    subscription = dispatcher.subscribe_many({"a": None, "b": None})
    single = dispatcher.subscribe("b", None)
    writer = Writer("1/1", 1, frozenset({intent_key("a")}))
    held = Holds().adding(Writers(1, {writer.vxid: writer}), 10, 0.0)
    dispatcher._deliver([message(12, "b")], position=12, holds=held)
    assert [i for i, _ in single.take()] == [12], "a stream of b alone does not wait"
    assert subscription.queued == 1 and not subscription._pending
    dispatcher._holds = Holds()
    dispatcher._deliver([message(11, "a")])
    assert [i for i, _ in subscription.take()] == [11, 12]


def test_frames_held_back_for_a_held_channel_are_bounded_in_bytes_too(dispatcher):
    """A client of several channels that stops reading while one of them is held must not grow
    the worker past the byte bound any more than a stream of one channel may."""
    subscription = dispatcher.subscribe_many({"a": None, "b": None})
    writer = Writer("1/1", 1, frozenset({intent_key("a")}))
    dispatcher._holds = Holds().adding(Writers(1, {writer.vxid: writer}), 0, 0.0)
    big = "x" * (1024 * 1024)
    for n in range(1, 11):
        dispatcher._deliver([message(n, "b", json.dumps(big))])
        if subscription.closed_reason is not None:
            break
    assert subscription.closed_reason == "overflow"
    assert n < 10 and subscription.queued == 0


def test_ranges_move_on_after_a_page_but_not_below_a_channels_start():
    ranges = Ranges.of({"a": None, "b": ["t"]}, {"a": 5, "b": 0})
    assert ranges.first == 0 and ranges.after(0) is ranges
    assert ranges.after(3).items == (("a", None, 5), ("b", ("t",), 3))
    assert ranges.after(9).items == (("a", None, 9), ("b", ("t",), 9))


def test_a_reset_frame_of_several_channels_is_one_event():
    from realtime.stream import Reset

    frame = Reset("history_truncated", "ab12cd34-7", ("run.2",)).frame()
    assert frame == sse.format_event(
        id="ab12cd34-7", event="reset",
        data='{"reason": "history_truncated", "cursor": "ab12cd34-7", "channels": ["run.2"]}',
    ).encode()


def test_a_page_of_several_channels_folds_each_text_stream(app):
    realtime = app.extensions["realtime"]
    realtime.text_flusher.interval_s = None
    for channel in ("t.1", "t.2"):
        with realtime.text_stream(channel, "answer", "same-id") as out:  # one id, two channels: two texts
            out.write(f"hello {channel}")
            realtime.text_flusher.flush()
            out.write("!")
    between = realtime.publish("t.1", "status", {"done": True})
    page = realtime.store.read_after_many(Ranges.of({"t.1": None, "t.2": ["answer"]}, {"t.1": 0, "t.2": 0}), 100)
    assert [(m.channel, m.data.get("text")) for m in page] == [
        ("t.1", "hello t.1!"), ("t.2", "hello t.2!"), ("t.1", None),
    ]
    assert page[-1].id == between.id


def test_a_channel_held_as_a_stream_subscribes_makes_its_replay_wait_then_read_to_the_position(dispatcher):
    dispatcher.prime()
    writer = Writer("1/1", 1, frozenset({intent_key("a")}))
    dispatcher._holds = Holds().adding(Writers(1, {writer.vxid: writer}), 0, 0.0)
    dispatcher._position = 7
    subscription = dispatcher.subscribe_many({"a": None, "b": None})
    assert (subscription.history_through, subscription.history_settled) == (7, False)
    single = dispatcher.subscribe("a", None)
    assert (single.history_through, single.history_settled) == (0, True), "a stream of one channel does not wait"


def test_the_replay_of_a_held_scope_first_waits_for_the_writers_of_its_channels(store, dispatcher, monkeypatch):  # noqa: F811
    sent = store.append("b", "t", "1")
    dispatcher.prime()
    writer = Writer("1/1", 1, frozenset({intent_key("a")}))
    dispatcher._holds = Holds().adding(Writers(1, {writer.vxid: writer}), 0, 0.0)
    waited: list[tuple[str, ...]] = []
    settled = store.settled_through_all
    monkeypatch.setattr(store, "settled_through_all", lambda channels: waited.append(tuple(channels)) or settled(channels))
    stream = open_scope_stream(dispatcher, {"a": None, "b": None}, None, retry_ms=100)
    next(stream)
    assert ids([next(stream)]) == [sent.id]
    assert waited == [("a", "b")]
    stream.close()
