"""What the realtime package counts (docs/protocol.md §8), for `GET /metrics`.

Only bounded labels: a resume's result, a stream's close reason. Never a
channel, a topic or a token.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STREAMS_OPEN = Gauge(
    "realtime_streams_open", "Event streams open now.", multiprocess_mode="livesum"
)
STREAMS_OPENED = Counter("realtime_streams_opened_total", "Event streams opened.")
STREAMS_CLOSED = Counter(
    "realtime_streams_closed_total",
    "Event streams ended, by reason: client_gone, shutdown, overflow (the client read too slowly), "
    "send_timeout (it stopped reading).",
    ["reason"],
)
RESUMES = Counter(
    "realtime_resumes_total",
    "Streams and history reads that came with a cursor, by how it was honoured.",
    ["result"],
)
MESSAGES_PUBLISHED = Counter("realtime_messages_published_total", "Messages stored by this instance.")
FRAMES_SENT = Counter(
    "realtime_frames_sent_total", "Message frames handed to streams, replayed or live (not keep-alives)."
)
PUBLISH_TO_SEND = Histogram(
    "realtime_publish_to_send_seconds",
    "From a message's creation to its live frame handed to the streams of this process.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
STORE_READS = Counter(
    "realtime_store_reads_total",
    "SELECTs of messages, by kind: dispatcher (new messages, once for every stream of the process), "
    "replay (a channel's page for streams and history, shared in a storm), lookup (where a cursor stands).",
    ["kind"],
)
VISIBILITY_WAIT = Gauge(
    "realtime_visibility_wait_seconds",
    "How long delivery (or a history read) has been waiting for a transaction that may still commit "
    "messages on its channels; 0 when nothing waits. The longest over the instance's workers.",
    multiprocess_mode="livemax",
)
VISIBILITY_STALLS = Counter(
    "realtime_visibility_stalls_total",
    "Transactions that held back delivery on their channels for more than a second (each is logged "
    "with its backend pid).",
)
STREAM_ADMISSION_REFUSED = Counter(
    "realtime_stream_admission_refused_total",
    "Stream requests answered 503 server_busy: they waited the longest admission allows for one of the "
    "REALTIME_STREAM_ADMISSION turns and none came free (a storm bigger than the process takes in time, "
    "or setups stuck on the database).",
)
STREAM_LIMIT_REFUSED = Counter(
    "realtime_stream_limit_refused_total",
    "Stream requests refused by a cap on open streams (stream_limits.py), by reason: per_token "
    "(429 too_many_streams: the token holds REALTIME_MAX_STREAMS_PER_TOKEN streams in the process), "
    "process_full (503 server_full: the process holds REALTIME_MAX_STREAMS).",
    ["reason"],
)
TEXT_STREAMS_OPEN = Gauge(
    "realtime_text_streams_open", "Text streams being written in this instance (text_streams.py).",
    multiprocess_mode="livesum",
)
TEXT_FLUSHES = Counter(
    "realtime_text_flushes_total",
    "INSERTs of the text streams' flusher: each stores what all of a process's text streams wrote since the last.",
)
