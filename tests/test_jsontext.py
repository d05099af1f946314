"""The one encoder for stored data (common/jsontext.py): what it writes, what it refuses."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from common.jsontext import MAX_DEPTH, NotJSON, TooLarge, encode
from jobs.tables import events
from json_errors import AUTH, PUBLISH, assert_json_error


def nested(depth: int, wrap=lambda inner: [inner], leaf: object = 1) -> object:
    """`leaf` inside `depth` containers, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = wrap(value)
    return value


def in_object(inner: object) -> dict:
    return {"k": inner}


def test_max_depth_is_the_contracts_64():
    assert MAX_DEPTH == 64


@pytest.mark.parametrize("wrap", [lambda inner: [inner], in_object, lambda inner: (inner,)],
                         ids=["arrays", "objects", "tuples"])
def test_exactly_max_depth_passes_and_one_more_fails(wrap):
    assert json.loads(encode(nested(MAX_DEPTH, wrap))) == json.loads(json.dumps(nested(MAX_DEPTH, wrap)))
    with pytest.raises(NotJSON, match=f"deeper than {MAX_DEPTH} levels"):
        encode(nested(MAX_DEPTH + 1, wrap))


def test_depth_counts_containers_not_scalars():
    """A scalar is depth 0 and an empty container depth 1, so the leaf adds nothing."""
    assert encode(1) == "1"
    for leaf in (None, "deep", 1.5):
        encode(nested(MAX_DEPTH, leaf=leaf))
    encode(nested(MAX_DEPTH - 1, leaf=[]))
    with pytest.raises(NotJSON):
        encode(nested(MAX_DEPTH, leaf={}))


def test_depth_is_the_deepest_branch_not_the_first():
    shallow_then_deep = {"a": 1, "b": [[2]], "c": [nested(MAX_DEPTH)]}  # the deep one is 65
    with pytest.raises(NotJSON):
        encode(shallow_then_deep)
    encode({"a": 1, "b": [[2]], "c": nested(MAX_DEPTH - 1)})


def test_a_hundred_thousand_levels_are_refused_without_recursion():
    with pytest.raises(NotJSON, match=str(MAX_DEPTH)):
        encode(nested(100_000, in_object))


def test_circular_and_widely_shared_references_end_quickly():
    loop: list = []
    loop.extend([loop] * 1000)  # unchecked, each level would be 1000 times wider
    with pytest.raises(NotJSON):
        encode(loop)
    shared = nested(2_000, lambda inner: [inner] * 50)  # 50**2000 paths through 2000 lists
    with pytest.raises(NotJSON):
        encode(shared)


@pytest.mark.parametrize("value", [float("nan"), [float("inf")], {"x": "\ud800"}, {1j: 1}, object()],
                         ids=["NaN", "Infinity", "lone surrogate", "complex key", "object"])
def test_values_json_cannot_hold_are_refused(value):
    with pytest.raises(NotJSON):
        encode(value)


def test_compact_utf8_with_line_separators_escaped():
    assert encode({"a": ["café", 1]}) == '{"a": ["café", 1]}'
    assert encode("a\u2028b\u2029c\x85") == '"a\\u2028b\\u2029c\\u0085"'


def test_size_limit_counts_utf8_bytes():
    assert encode("éé", max_bytes=6) == '"éé"'
    with pytest.raises(TooLarge) as caught:
        encode("ééé", max_bytes=6)
    assert (caught.value.size, caught.value.limit) == (8, 6)


# -- the endpoints that store data ----------------------------------------------------------


def test_publish_refuses_data_deeper_than_max_depth_and_stores_nothing(client, realtime):
    response = client.post(PUBLISH, json={"channel": "c", "topic": "t", "data": nested(MAX_DEPTH + 1)}, headers=AUTH)
    error = assert_json_error(response, 400, "invalid_data")
    assert str(MAX_DEPTH) in error["message"]
    assert realtime.store.last_id() == 0
    response = client.post(PUBLISH, json={"channel": "c", "topic": "t", "data": nested(MAX_DEPTH)}, headers=AUTH)
    assert response.status_code == 201
    assert response.get_json()["data"] == nested(MAX_DEPTH)


def test_events_refuse_data_deeper_than_max_depth_and_store_nothing(app, client):
    """An event's `data` is an object, so it is the first of the levels."""
    def count_events() -> int:
        with app.extensions["database"].engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(events)).scalar()

    deep = {"name": "nothing.listens", "data": nested(MAX_DEPTH + 1, in_object)}
    assert_json_error(client.post("/api/events", json=deep), 400, "invalid_event_data")
    batch = [{"name": "nothing.listens", "data": {}}, deep]  # all or nothing
    assert_json_error(client.post("/api/events", json=batch), 400, "invalid_event_data")
    assert count_events() == 0
    response = client.post("/api/events", json={"name": "nothing.listens", "data": nested(MAX_DEPTH, in_object)})
    assert response.status_code == 202
    assert count_events() == 1
