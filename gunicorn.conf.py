"""Production server settings: `gunicorn -c gunicorn.conf.py "app:create_app()"`.

Command-line flags and GUNICORN_CMD_ARGS override everything here (gunicorn's
own precedence), so `--bind` and `--workers` work as usual.
"""
import os
import shutil
import tempfile

# gevent: each open stream is a greenlet, not a thread; thousands fit in a worker. gunicorn's
# gevent worker, but for the requests gunicorn refuses before the app sees them (an over-long
# request line, too many headers ...): JSON errors, not its HTML pages (common/server_errors.py).
worker_class = "common.server_errors.JsonErrorGeventWorker"
# gevent records, for each new greenlet, the greenlet and ten stack frames that spawned it (for
# debugging tools). Kept for as long as the stream lives: a share of each idle stream's memory
# worth saving (bench/README.md has the figure). The workers inherit this, as any set before.
os.environ.setdefault("GEVENT_TRACK_GREENLET_TREE", "false")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = 10000  # connections per worker (gunicorn's default, 1000, is too few); 95% for streams
bind = os.environ.get("BIND", "127.0.0.1:8000")
graceful_timeout = 30
# A worker that misses its heartbeat this long is aborted. On a reload (SIGHUP)
# this, not graceful_timeout, bounds how long an old worker may finish its job
# steps (worker_exit below): keep the two equal.
timeout = graceful_timeout
keepalive = 5
# Browsers send the subscription token in the URL (EventSource cannot set
# headers); a token for 50 long topics needs more than the default 4094 bytes.
limit_request_line = 8190
accesslog = "-"
# gunicorn 27's control socket lives at one path per user, which every other
# gunicorn on the machine (another app, a test server) would take over.
control_socket_disable = True
# The path without its query string: subscription tokens travel in `?token=`
# and must never land in a log file.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms %({x-request-id}o)s'
if os.environ.get("LOG_FORMAT", "").lower() == "json":
    from common.logs import gunicorn_logconfig

    logconfig_dict = gunicorn_logconfig()

# /metrics sums every worker's samples: prometheus_client keeps them in files
# in this directory, which must exist before a worker imports it.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="realtime-metrics-")
    os.environ["REALTIME_METRICS_DIR_MADE"] = "1"  # ours to remove at exit (the file is read again on SIGHUP)
METRICS_DIR = os.environ["PROMETHEUS_MULTIPROC_DIR"]

# Job steps run on real OS threads beside the gevent hub (jobs/worker.py). The
# hub gives up the GIL on every socket call and may then wait a whole switch
# interval to get it back, so a CPU-bound step delays every stream of the
# worker; a shorter interval than Python's 5 ms keeps that well under 100 ms
# (bench/README.md, bench/cpu_step.py). It only matters while threads compete.
GIL_SWITCH_INTERVAL_S = float(os.environ.get("GIL_SWITCH_INTERVAL_S", "0.001"))


def on_starting(server):
    """A fresh start counts from zero: remove the samples of an earlier run of this instance."""
    shutil.rmtree(METRICS_DIR, ignore_errors=True)
    os.makedirs(METRICS_DIR, exist_ok=True)


def on_exit(server):
    if os.environ.get("REALTIME_METRICS_DIR_MADE"):
        shutil.rmtree(METRICS_DIR, ignore_errors=True)


def child_exit(server, worker):
    """A worker's live gauges (open streams) leave /metrics with it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """Start the app's background work, and end its streams as soon as the worker is told to stop.

    On SIGTERM (also what the master sends old workers on SIGHUP) gunicorn
    stops accepting and waits up to `graceful_timeout` for open requests; a
    stream never finishes on its own, so without this every shutdown and
    reload would take the full 30 s. We end the streams at once instead; their
    clients reconnect with Last-Event-ID to a live worker and miss nothing.
    """
    import gc
    import signal
    import sys

    import gevent

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    # One connection accepted per turn of the event loop, as gunicorn does with several
    # workers; with one it lets gevent take up to 100 (BaseServer.max_accept, "lower values
    # give higher priority to already established connections"). A reconnect storm then
    # parsed 100 requests between two looks at a publish's database reply: publishes
    # meanwhile had p99 132-150 ms on one worker, 12-19 ms with this (bench/README.md, storm).
    from gevent.server import StreamServer

    StreamServer.max_accept = 1

    # Everything loaded so far lives as long as the worker: move it out of
    # the collector's sight, so full collections under load (thousands of
    # streams) do not rescan it.
    gc.freeze()

    extensions = getattr(worker.wsgi, "extensions", {})

    def stop_then(handler):
        def on_signal(signum, frame):
            for name in ("health", "realtime", "jobs"):
                if name in extensions:
                    # Not inside the signal handler: it may have interrupted
                    # the very code that holds the dispatcher's lock.
                    gevent.spawn(extensions[name].shutdown)
            handler(signum, frame)

        return on_signal

    if "realtime" in extensions:
        # Streams may take this worker's connections but the last 5%: those stay for health
        # checks, publishes and token requests (realtime/stream_limits.py, issue 18). The value
        # gunicorn runs with, --worker-connections included, not the one written above.
        extensions["realtime"].stream_limits.fit_connections(worker.cfg.worker_connections)

    # Background work (dispatcher, pruning, the embedded job pool) starts now,
    # after the fork, rather than waiting for this worker's first request.
    for name in ("realtime", "jobs"):
        if name in extensions:
            extensions[name].start()

    signal.signal(signal.SIGTERM, stop_then(worker.handle_exit))
    signal.signal(signal.SIGQUIT, stop_then(worker.handle_quit))
    signal.signal(signal.SIGINT, stop_then(worker.handle_quit))


# More than any endpoint takes (the largest is a batch publish, REALTIME_MAX_BATCH_BYTES 4 MiB).
LARGEST_BODY_BYTES = 8 * 1024 * 1024


def pre_request(worker, req):
    """A request that declares a body larger than any endpoint takes ends its connection after
    the answer (the app refuses it with a 413 without reading it).

    On a kept-alive connection gunicorn would read and discard the rest of that body before
    the next request, 1 KiB at a time on the gevent hub: a refused 52 MB upload froze the
    worker's streams for seconds (issue 18). A request gunicorn is to close it does not drain.
    """
    length = next((value for name, value in req.headers if name == "CONTENT-LENGTH"), "")
    if length.isdigit() and int(length) > LARGEST_BODY_BYTES:
        req.must_close = True


def worker_exit(server, worker):
    """Let the embedded job pool finish its steps in progress and hand their runs back.

    gunicorn calls this in the worker process after its own graceful shutdown
    (on SIGTERM, also what old workers get on SIGHUP), just before it exits.
    Exiting at once would kill a step midway: its run would wait a whole lease
    for another worker, run that step again and count a crash (docs/protocol.md §7).
    The pool stopped claiming at the signal (post_worker_init); its loop keeps
    renewing leases until the steps end. The master bounds the wait: on
    shutdown it SIGKILLs the worker `graceful_timeout` after its SIGTERM; on
    reload it aborts it `timeout` after its last heartbeat (none come from here).
    """
    # Also called in the master, for a worker that was already gone: it has no app there.
    jobs = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("jobs")
    if jobs is not None:
        jobs.shutdown(wait=True)
