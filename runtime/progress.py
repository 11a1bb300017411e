"""Progress of long work (many sentences, calibration texts, graph exports) on stderr.

- stderr is a terminal: one line redrawn in place (bar, count, current item, elapsed time). It appears
  only once the work has taken `delay` seconds, so quick runs print nothing, and a background thread
  redraws it every second, so a single step of minutes (a graph export) still shows it is alive.
- otherwise (a log, CI, a pipe): plain lines, at most one per `every` seconds, also from the thread,
  so a log of a long run says where it is without a line per sentence.
- `announce=True`: a plain line for every step as it starts too (few, long steps such as graphs).

Lines the caller prints while the bar is shown go through `echo`, which clears the bar first.
stdout is never written: it may carry audio (`--out -`) or a table someone parses.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, label: str, total: int, *, delay: float = 1.0, every: float = 30.0, announce: bool = False,
                 stream=None):
        self.label, self.total, self.delay, self.every, self.announce = label, total, delay, every, announce
        self.stream = stream if stream is not None else sys.stderr  # looked up now: test runners replace it
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.done, self.item = 0, ""
        self.t0 = time.monotonic()
        self._last_line = self.t0  # plain mode: when a line was last printed
        self._drawn = False  # terminal mode: whether the bar is on the screen now
        self._drawn_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name=f"progress-{label}", daemon=True)

    # -- caller side ---------------------------------------------------------------------------------
    def step(self, item: str = "") -> None:
        """Step `done + 1` of `total` starts now (`item` names it)."""
        with self._lock:
            self.done += 1
            self.item = item
            if self.tty:
                if time.monotonic() - self._drawn_at >= 0.1:  # many quick steps: at most 10 redraws a second
                    self._draw()
            elif self.announce or time.monotonic() - self._last_line >= self.every:
                self._line()

    def echo(self, text: str, err: bool = False) -> None:
        """Print a line (to stdout, or with `err` to stderr) without tearing the bar."""
        with self._lock:
            self._clear()
            print(text, file=self.stream if err else sys.stdout, flush=True)
            if self.tty:
                self._draw()

    def __enter__(self):
        self.t0 = self._last_line = time.monotonic()  # the work starts now, not when this was made
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._clear()
        return False

    # -- rendering -------------------------------------------------------------------------------------
    def _status(self) -> str:
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        return f"{count}{' ' + self.item if self.item else ''} ({_clock(time.monotonic() - self.t0)})"

    def _line(self) -> None:
        print(f"{self.label}: {self._status()}", file=self.stream, flush=True)
        self._last_line = time.monotonic()

    def _draw(self) -> None:
        if time.monotonic() - self.t0 < self.delay:
            return
        width = shutil.get_terminal_size((80, 24)).columns
        status = self._status()
        bar_w = max(10, min(30, width - len(self.label) - len(status) - 6))
        # the bar fills with the steps finished; the count names the one running
        filled = round(bar_w * min(max(self.done - 1, 0), self.total) / self.total) if self.total else 0
        text = f"{self.label} [{'#' * filled}{'-' * (bar_w - filled)}] {status}"[: width - 1]
        self.stream.write("\r" + text + "\x1b[K")  # \x1b[K: clear the rest of a longer earlier line
        self.stream.flush()
        self._drawn, self._drawn_at = True, time.monotonic()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self.tty:
                    self._draw()
                elif time.monotonic() - self._last_line >= self.every:
                    self._line()
