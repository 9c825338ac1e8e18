"""Stop strings over a stream of text deltas: a stop may straddle deltas, so a short tail is held back."""

from __future__ import annotations


class StopScanner:
    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text that is safe to emit after this delta (empty once a stop string was seen)."""
        if self.stopped:
            return ""
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        if self._hold == 0:
            self._pending = ""
            return text
        self._pending = text[-self._hold :]
        return text[: -self._hold]

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return "" if self.stopped else text
