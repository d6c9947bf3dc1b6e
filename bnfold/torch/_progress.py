"""A tiny progress bar on stderr, shown only when stderr is a terminal (no tqdm dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress("recalibrate", total) as bar: bar.advance()``; silent when not enabled."""

    _WIDTH = 24

    def __init__(self, label: str, total: int | None, enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled and isatty is not None and isatty())
        self.label = label
        self.total = total
        self.done = 0
        self._last = 0.0

    def __enter__(self) -> "Progress":
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        # Redraw at most ~10 times a second: a terminal write per batch slows small batches.
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            self._draw()

    def _draw(self) -> None:
        if self.total:
            filled = min(self._WIDTH, self._WIDTH * self.done // self.total)
            bar = "#" * filled + "." * (self._WIDTH - filled)
            text = f"\r{self.label} [{bar}] {self.done}/{self.total}"
        else:
            text = f"\r{self.label} {self.done} batches"
        self.stream.write(text)
        self.stream.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled and self.done:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
