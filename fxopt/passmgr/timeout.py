"""Time limits for code that may never return: ``with time_limit(seconds): ...``.

The pass manager runs every pass under one (``compile(..., pass_timeout=)``), so a
runaway pass is stopped and named instead of hanging the compile. In the main thread of
a Unix process the limit is a ``SIGALRM`` timer (it also interrupts ``time.sleep`` and
blocking calls); elsewhere a watchdog thread raises :class:`PassTimeout` in the limited
thread at its next Python instruction. Either way the exception derives from
``BaseException``, so a pass's ``except Exception`` cannot swallow it; a long call into
native code (one huge matmul) is interrupted when it returns.

    >>> import time
    >>> from fxopt.passmgr.timeout import time_limit, PassTimeout
    >>> try:
    ...     with time_limit(0.2):
    ...         while True:
    ...             pass
    ... except PassTimeout:
    ...     print("stopped")
    stopped
"""
from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from typing import Iterator

__all__ = ["PassTimeout", "time_limit"]


class PassTimeout(BaseException):
    """Raised inside code that ran past its time limit."""


def _can_use_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`PassTimeout` in this thread if the block runs longer than ``seconds`` (None: no limit)."""
    if seconds is None:
        yield
        return
    if _can_use_alarm():
        with _alarm(seconds):
            yield
    else:
        with _watchdog(seconds):
            yield


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def fire(signum, frame):  # noqa: ANN001
        raise PassTimeout(f"time limit of {seconds:g} s reached")
    previous = signal.signal(signal.SIGALRM, fire)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:  # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, old_delay, old_interval)


@contextlib.contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    target = threading.get_ident()
    done = threading.Event()

    def watch() -> None:
        if done.wait(seconds):
            return
        while not done.is_set():  # repeat: the first shot may land in an ``except BaseException``
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(PassTimeout))
            if done.wait(0.5):
                break
    thread = threading.Thread(target=watch, name="fxopt-pass-timeout", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)  # drop a shot still in flight
