"""An answer as it streams: tokens gathered in the engine's thread, taken by the UI a few tens of times a second.

The engine can make hundreds of tokens a second; one Textual message (and one Markdown re-render) per token
made the TUI show answers 2-5x slower than the engine made them. So TokenDeltas never become messages: the app's
emit callback adds them to a `TokenBuffer` (a lock and a dict), and the chat screen's flush timer takes what
gathered, appends it to the answer's view in one go and updates the live count in the status bar. Every other
engine event takes the buffer first, so a GenerationDone never overtakes the tokens before it.

An update costs more than the append: Textual lays out and repaints the chat log (~25 ms of Python for a
screenful of answer on the 2-core test machine, whatever its length or shape: the whole log region is laid out
and repainted as it scrolls), and the UI and the engine share the GIL and the cores, so every millisecond the UI
thread takes is one the engine loses, or more (a UI thread busy half the time made the engine run at ~40-60% of
its one-shot speed). `FlushPace` keeps the UI thread's share of a CPU while an answer streams near UI_SHARE
(CPU_UI_SHARE with the model on the CPU, where the engine needs the GIL at every step): text updates come up to
~30 a second while they are cheap, and as seldom as every SLOWEST_FLUSH_SECONDS when each one costs more. Between
two text updates the status bar's live count and speed are shown on their own every STATUS_SECONDS: a one-line
repaint, ~20x cheaper than a text update, so the count stays live however seldom the text is shown.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mistral_chat.service.worker import TokenDelta

if TYPE_CHECKING:
    from mistral_chat.tui.widgets.message_view import MessageView

FLUSH_SECONDS = 1 / 30  # at most ~30 screen updates a second while an answer streams
SLOWEST_FLUSH_SECONDS = 1.0  # at least one text update a second, however much one costs
FIRST_FLUSH_SECONDS = 0.25  # where the pace starts (the first tokens are shown at once all the same)
STATUS_SECONDS = 0.25  # the status bar's live figures between text updates
UI_SHARE = 0.04  # the UI thread's CPU time per second of streaming that the pace aims at (0.1: 74-80%
# of one-shot tokens/s in benchmarks/tui_throughput.py)
CPU_UI_SHARE = 0.02  # the same with the model on the CPU, where the engine's every step needs the cores and the GIL


class FlushPace:
    """When the next screen update is due: the interval grows while the UI thread's CPU time (time.thread_time, the
    updates' layout and paint included) over the last interval exceeds `share` of it, and shrinks back when it
    does not. Ask `due()` from the UI thread on every timer tick. One pace serves the app's answers one after the
    other: a new answer (after a pause) starts at the interval the last one ended with."""

    def __init__(self, share: float = UI_SHARE) -> None:
        self.share = share
        self.interval = FIRST_FLUSH_SECONDS
        self._cpu = 0.0
        self._wall: float | None = None
        self._next = 0.0

    def due(self, now: float | None = None, cpu: float | None = None) -> bool:
        wall = time.monotonic() if now is None else now
        if wall < self._next:
            return False
        cpu = time.thread_time() if cpu is None else cpu
        if self._wall is not None and self._wall < wall < self._wall + 2 * SLOWEST_FLUSH_SECONDS:
            share = (cpu - self._cpu) / (wall - self._wall)
            factor = min(max(share / self.share, 0.8), 8.0)  # up fast, down slowly
            self.interval = min(max(self.interval * factor, FLUSH_SECONDS), SLOWEST_FLUSH_SECONDS)
        self._cpu, self._wall = cpu, wall
        self._next = wall + self.interval - FLUSH_SECONDS / 2  # the timer ticks every FLUSH_SECONDS
        return True


@dataclass
class Tokens:
    """What arrived for one request since the UI last looked."""

    request_id: int
    conversation_id: int
    text: str = ""
    count: int = 0


class TokenBuffer:
    """Thread-safe: `add` in the engine's thread, `take` in the UI's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, Tokens] = {}

    def add(self, delta: TokenDelta) -> None:
        with self._lock:
            tokens = self._pending.get(delta.request_id)
            if tokens is None:
                tokens = self._pending[delta.request_id] = Tokens(delta.request_id, delta.conversation_id)
            tokens.text += delta.text
            tokens.count += 1

    def take(self) -> list[Tokens]:
        with self._lock:
            taken, self._pending = list(self._pending.values()), {}
        return taken


@dataclass
class Streaming:
    """The answer being generated: where it goes, what arrived, what is shown and what is saved."""

    request_id: int
    conversation_id: int
    view: MessageView | None  # where it streams (None while another chat is shown)
    text: str = ""
    pending: str = ""  # arrived but not yet shown
    message_id: int = 0  # its row once saved
    saved_text: str = ""
    saved_at: float = field(default_factory=time.monotonic)
    tools: bool = False  # the request offered tools
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    tokens: int = 0  # TokenDeltas received (one per generated token)
    counted_at: float = 0.0  # when the status bar last showed the live figures

    def receive(self, tokens: Tokens, now: float | None = None) -> None:
        if tokens.count and self.first_token_at is None:
            self.first_token_at = time.monotonic() if now is None else now
        self.text += tokens.text
        self.pending += tokens.text
        self.tokens += tokens.count

    def live_figures(self, now: float | None = None) -> tuple[float | None, float | None]:
        """Time to the first token and tokens a second so far, as the UI saw them (None until known)."""
        if self.first_token_at is None:
            return None, None
        now = time.monotonic() if now is None else now
        first = self.first_token_at - self.started_at
        elapsed = now - self.first_token_at
        rate = (self.tokens - 1) / elapsed if self.tokens > 1 and elapsed > 0 else None
        return first, rate
