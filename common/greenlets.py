"""Is this process running under gevent's monkey patching, and on which hub?

Asked by the job pool (to run functions on real OS threads), the database
(to keep the hub free), the realtime change feed (to wake a greenlet safely
from such a thread) and the dispatcher (to cut a stream whose client stopped
reading).
"""
from __future__ import annotations

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
