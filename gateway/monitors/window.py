"""The monitor window arithmetic, in Python: the in-memory mirror of ``monitor.lua``.

Both implement exactly the same rule, so ``store: memory`` behaves like a fleet
sharing Redis: the last ``window`` rows' suspicion bits per (monitor, subject,
model); an update slides the window over *every* new row, and an alarm is
raised when any full window has more than ``alarm_rate`` of its rows
suspicious (a caller cannot hide a noise batch behind a tail of honest rows),
lasting ``alarm_for`` after the last such window.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class WindowState:
    until_ms: float = 0.0  # when the alarm ends (0: never raised)
    bits: str = ""  # the last N rows, oldest first: "1" suspicious


def slide(state: WindowState, new: str, n: int, rate: float, alarm_for_ms: float, now_ms: float) -> bool:
    """Add ``new`` rows' bits to ``state``; True when this started an alarm (it was not in alarm)."""
    if not new:
        return False
    was = state.until_ms > now_ms
    everything = state.bits + new
    start = len(state.bits)  # 0-based index of the first new row
    count = everything[max(0, start - n):start].count("1")
    hit = False
    for j in range(start, len(everything)):
        if everything[j] == "1":
            count += 1
        drop = j - n
        if drop >= 0 and everything[drop] == "1":
            count -= 1
        if j + 1 >= n and count > rate * n:
            hit = True
    state.bits = everything[-n:]
    if hit:
        state.until_ms = now_ms + alarm_for_ms
    return hit and not was
