"""Progress of a model load: a tqdm bar on a TTY, progress lines in the log otherwise."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class LoadProgress:
    """A ``progress(done, total)`` callback for ``Backend.load`` (called from the loading
    thread). Logs at 0, 25, 50, 75 and 100 % when not on a TTY."""

    def __init__(self, what: str, *, tty: bool) -> None:
        self.what = what
        self.tty = tty
        self._bar: Any = None
        self._last_quarter = -1
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            if self.tty:
                if self._bar is None:
                    from tqdm import tqdm

                    self._bar = tqdm(total=total, desc=f"loading {self.what}", unit="tensor", leave=False)
                self._bar.update(done - self._bar.n)
                return
            quarter = (4 * done) // max(total, 1)
            if quarter != self._last_quarter:
                self._last_quarter = quarter
                log.info("loading %s: %d/%d tensors (%d%%)", self.what, done, total, 100 * done // max(total, 1))

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
