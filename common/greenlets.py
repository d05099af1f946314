"""Is this process running under gevent's monkey patching, and on which hub?

Asked by the job pool (to run functions on real OS threads), the database
(to keep the hub free), the realtime change feed and the text streams' flusher
(to wake a greenlet safely from such a thread) and the dispatcher (to cut a stream whose client stopped
reading).
"""
from __future__ import annotations

import threading
import time
from typing import Any


def gevent_is_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("threading")


def gevent_hub() -> Any:
    """The gevent hub of this thread when threading is monkey-patched, else None."""
    if not gevent_is_patched():
        return None
    from gevent import get_hub

    return get_hub()


def native_thread_ident() -> int:
    """The OS thread's id, which a patched `threading.get_ident` hides behind the greenlet's."""
    from gevent import monkey

    return monkey.get_original("_thread", "get_ident")()


def current_greenlet() -> Any:
    """The greenlet running this code under gevent's patching, else None (a plain thread)."""
    if not gevent_is_patched():
        return None
    from gevent import getcurrent

    return getcurrent()


def interrupt(greenlet: Any, exception: BaseException) -> None:
    """Raise `exception` in `greenlet` where it waits (a write to a client that stopped reading)."""
    import gevent

    gevent.kill(greenlet, exception)


def set_event(event: Any, hub: Any) -> None:
    """`event.set()` from any thread: under gevent an Event belongs to its hub's thread
    (`hub`, None without gevent), and code on a native thread (a job, jobs/worker.py)
    must hand the call over to that thread."""
    if hub is not None and hub.thread_ident != native_thread_ident():
        hub.loop.run_callback_threadsafe(event.set)
    else:
        event.set()


def native_lock() -> Any:
    """A lock of the OS, even under gevent's patching: one a native thread and a greenlet
    of the hub can share, as long as no one holding it waits on anything."""
    if gevent_is_patched():
        from gevent import monkey

        return monkey.get_original("_thread", "allocate_lock")()
    return threading.Lock()


def wait_native_lock(lock: Any, timeout: float) -> bool:
    """Acquire a `native_lock` within `timeout` seconds. In the hub's thread, by looking every
    few milliseconds: blocking there would stop every greenlet, the one to release it included."""
    hub = gevent_hub()
    if hub is None or hub.thread_ident != native_thread_ident():
        return lock.acquire(timeout=timeout)
    import gevent

    deadline = time.monotonic() + timeout
    while not lock.acquire(blocking=False):
        if time.monotonic() >= deadline:
            return False
        gevent.sleep(0.005)
    return True
