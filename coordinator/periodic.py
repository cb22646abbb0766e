"""A daemon thread that calls a function every few seconds until stopped (finalizer, roster)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``fn()`` every ``interval_s`` (first call right away); an exception is logged, not fatal."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], object]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.fn = fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fn()
            except Exception:  # keep going: the next pass may succeed
                log.exception("%s failed; retrying in %.1f s", self.name, self.interval_s)
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
