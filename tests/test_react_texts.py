"""`useRealtime`'s `texts` (static/react.js) in real React against a live gunicorn (issue 20).

An answer written by `Publisher.text_stream` in this process renders as it grows; a component
mounted after it ended shows it whole, from the one folded message a late stream gets.
"""
from __future__ import annotations

import secrets

import pytest

from realtime.publisher import Publisher
from test_react import ReactPage, node  # noqa: F401 - the node fixture

pytestmark = [pytest.mark.integration, pytest.mark.node]

COMPONENT = """
import { useRealtime } from "/static/react.js";

export function Answer({ channel, token }) {
  const { state, texts } = useRealtime({ channel, topics: ["answer"], token });
  const [answer] = Object.values(texts);
  return (
    <section>
      <p className="run">{answer?.status ?? "waiting"}</p>
      <p className="connection">{state}</p>
      <ul><li>{answer?.text ?? ""}</li></ul>
    </section>
  );
}
"""


def test_use_realtime_shows_a_text_stream_growing_then_whole_when_mounted_late(node, shared_server, tmp_path):  # noqa: F811
    component = tmp_path / "Answer.jsx"
    component.write_text(COMPONENT)
    channel = f"answer.{secrets.token_hex(4)}"
    token = shared_server.token(channel, ["answer"])
    page = ReactPage(node, shared_server.url, component, "Answer")
    try:
        page.send(render={"channel": channel, "token": token})
        page.wait_to_show("the component to connect", connection="open", run="waiting")
        with Publisher(shared_server.database_url, text_flush_ms=10) as publisher:
            with publisher.text_stream(channel, "answer") as out:
                out.write("Blue light ")
                page.wait_to_show("the first piece", run="streaming", log=["Blue light "])
                out.write("scatters more.")
        page.wait_to_show("the whole answer", run="completed", log=["Blue light scatters more."])
        texts_shown = [dom["log"][0] for dom in page.of_type("dom") if dom["log"]]
        assert all("Blue light scatters more.".startswith(text) for text in texts_shown), "it only grew"

    finally:
        exit_code, stderr = page.close()
    assert exit_code == 0, stderr[-3000:]
    assert page.of_type("console") == [], "React reported a problem"

    late = ReactPage(node, shared_server.url, component, "Answer")  # a page opened after the answer ended
    try:
        late.send(render={"channel": channel, "token": shared_server.token(channel, ["answer"])})
        late.wait_to_show("the answer whole, from a late stream", run="completed", log=["Blue light scatters more."])
        assert [dom["log"] for dom in late.of_type("dom") if dom["log"] not in ([], [""])] == [["Blue light scatters more."]]
    finally:
        exit_code, stderr = late.close()
    assert exit_code == 0, stderr[-3000:]
