"""A writer process of bench/texts.py: many generations, each writing `rate` tokens a second.

    .venv/bin/python bench/text_writers.py < config    (bench/texts.py starts these)

Not a job: a standalone process with `DATABASE_URL`, writing through
`realtime.publisher.Publisher`, as a task-queue worker would (README "Publishing from
anywhere"). It reads one JSON line of configuration on stdin, makes its publisher, answers
`ready`, then waits for one line: the CLOCK_MONOTONIC time to start at (system-wide, so every
process starts together and the write times compare with the clients' receive times).

Generation g writes token k at start + phase(g) + k / rate, the phases spreading the
generations evenly over one token interval. A few threads each run their share of the
generations on one schedule (a thread per generation would measure the threads' wake-ups
more than the library); a thread that falls behind writes late, never skips, and the late
writes show in `late` (call time - due time). Two ways:

- `text`: `publisher.text_stream(channel, "answer")`, one `write(token)` per token: it only
  appends to memory; the process's flusher stores every stream's pieces in one INSERT each
  REALTIME_TEXT_FLUSH_MS. The streams are ended (`completed`) on a pool of threads, since
  `end` waits for the end to be stored;
- `naive`: `publisher.publish(channel, "answer", {"k": k, "t": token})` per token: one INSERT
  and COMMIT each, the call returning once committed, so a generation's next token waits for it.

It writes, per generation, the call time and the text's length after each token (pickle) to
`out`, answers `done` with its CPU time, and keeps its connections until the next line (the
orchestrator reads the PostgreSQL backends' CPU first).
"""
from __future__ import annotations

import json
import pickle
import resource
import sys
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realtime.publisher import Publisher  # noqa: E402

#: The pieces a generation writes, about 4 characters on average; with a quote, a backslash, a
#: line break, non-ASCII and a code point outside the BMP, so the client's text check covers escaping.
VOCAB = (" the", " cat", " sat", " on", " a", " mat", ",", " and", " then", " it", " said", ' "hi"',
         " été", "\n", " naïve", " 🙂", " data", " \\o/", " stream", " token", " of", " text", ".", " We")


def token(g: int, k: int) -> str:
    """Token k of generation g: the same in every process, so the expected text can be rebuilt."""
    return VOCAB[(g * 7 + k * 5 + (k * k) % 11) % len(VOCAB)]


def expected_text(g: int, tokens: int) -> str:
    return "".join(token(g, k) for k in range(tokens))


def channel_of(prefix: str, g: int) -> str:
    return f"{prefix}.{g}"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    config = json.loads(sys.stdin.readline())
    mode, prefix = config["mode"], config["prefix"]
    generations: list[int] = config["generations"]  # this process's share
    total, rate, tokens = config["total"], config["rate"], config["tokens"]
    threads = max(1, min(config["threads"], len(generations)))

    publisher = Publisher.from_env()
    print(json.dumps({"ready": True}), flush=True)
    start = float(sys.stdin.readline())
    cpu_at_start = cpu()

    call_times = {g: array("d") for g in generations}
    lengths = {g: array("q") for g in generations}
    late = array("d")
    failures: list[str] = []
    ender = ThreadPoolExecutor(max_workers=32, thread_name_prefix="end") if mode == "text" else None
    ends = []

    def run(share: list[int]) -> None:
        try:
            phase = {g: (g / total) / rate for g in share}
            streams = {}
            if mode == "text":
                for g in share:
                    streams[g] = publisher.text_stream(channel_of(prefix, g), "answer", id=f"g{g}")
                    streams[g].__enter__()
            length = {g: 0 for g in share}
            sleep, now = time.sleep, time.monotonic
            for k in range(tokens):
                for g in share:
                    due = start + phase[g] + k / rate
                    delay = due - now()
                    if delay > 0:
                        sleep(delay)
                    piece = token(g, k)
                    called = now()
                    if mode == "text":
                        streams[g].write(piece)
                    else:
                        publisher.publish(channel_of(prefix, g), "answer", {"k": k, "t": piece})
                    length[g] += len(piece)
                    call_times[g].append(called)
                    lengths[g].append(length[g])
                    late.append(called - due)
                    if k == tokens - 1 and mode == "text":
                        ends.append(ender.submit(streams[g].__exit__, None, None, None))
            if mode == "naive":
                for g in share:
                    publisher.publish(channel_of(prefix, g), "answer", {"k": tokens, "t": "", "status": "completed"})
        except BaseException as exc:  # noqa: BLE001 - reported to the orchestrator
            failures.append(f"{type(exc).__name__}: {exc}")

    shares = [generations[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=run, args=(share,)) for share in shares]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    writing_done = time.monotonic()
    for f in ends:
        try:
            f.result()
        except Exception as exc:  # noqa: BLE001
            failures.append(f"end: {type(exc).__name__}: {exc}")
    if ender is not None:
        ender.shutdown()
    ended = time.monotonic()
    used = cpu()
    with open(config["out"], "wb") as f:
        pickle.dump({g: (call_times[g].tobytes(), lengths[g].tobytes()) for g in generations}, f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    ordered = sorted(late)
    print(json.dumps({
        "done": True, "cpu": used, "cpu_at_start": cpu_at_start, "failures": failures[:5],
        "writing_done": writing_done, "ended": ended,
        "late_p50_ms": ordered[len(ordered) // 2] * 1000 if ordered else None,
        "late_p99_ms": ordered[int(len(ordered) * 0.99)] * 1000 if ordered else None,
        "late_max_ms": ordered[-1] * 1000 if ordered else None,
    }), flush=True)
    # Connected until told: the database's CPU is read from this process's backends too.
    sys.stdin.readline()
    publisher.close()


if __name__ == "__main__":
    main()
