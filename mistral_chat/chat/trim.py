"""Fitting a long conversation into the model's context: the oldest turns are left out, never the system prompt.

A turn is a user message with the answers that follow it. The latest user turn is always kept; if even that
does not fit, the prompt is returned as is and the engine reports the context error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mistral_chat.chat.templates import ChatMessage


@dataclass(frozen=True)
class TrimmedPrompt:
    """The prompt that fits, and how many of the conversation's messages it leaves out."""

    ids: list[int]
    messages: list[ChatMessage]
    dropped_messages: int

    @property
    def trimmed(self) -> bool:
        return self.dropped_messages > 0


def answer_reserve(context_length: int, max_tokens: int) -> int:
    """Room kept free for the answer: max tokens, but never more than a quarter of the context."""
    return max(1, min(max_tokens, context_length // 4))


def _turn_starts(messages: Sequence[ChatMessage]) -> list[int]:
    """Indexes of the messages where each droppable turn starts (user messages after the first turn)."""
    return [i for i, m in enumerate(messages) if m.role == "user"]


def trim_history(messages: Sequence[ChatMessage], encode: Callable[[list[ChatMessage]], list[int]],
                 budget: int) -> TrimmedPrompt:
    """The longest suffix of whole turns (plus every system message) whose prompt is at most `budget` tokens."""
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    ids = encode(system + rest)
    if len(ids) <= budget:
        return TrimmedPrompt(ids, system + rest, 0)
    starts = [i for i in _turn_starts(rest) if i > 0]
    if not starts:
        return TrimmedPrompt(ids, system + rest, 0)
    # more dropped turns never make the prompt longer: binary-search the fewest that fit
    lo, hi = 0, len(starts) - 1  # candidate cut points: rest[starts[k]:]
    best: tuple[list[int], list[ChatMessage], int] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        kept = system + rest[starts[mid]:]
        mid_ids = encode(kept)
        if len(mid_ids) <= budget:
            best = (mid_ids, kept, starts[mid])
            hi = mid - 1
        else:
            lo = mid + 1
    if best is None:  # even the last turn alone is too long: keep it, the engine says so
        cut = starts[-1]
        kept = system + rest[cut:]
        return TrimmedPrompt(encode(kept), kept, cut)
    return TrimmedPrompt(best[0], best[1], best[2])
