"""The bottom line: model, device and dtype, context used / length, and the answer's speed (live while it streams).

It fits its width: narrower, the separators shrink, then the least needed parts go (the trimmed-messages note,
device and dtype, first-token time, the context, the token count), then the model's name is shortened; the
speed and the "generating (Esc stops)" hint stay to the last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from textual import events
from textual.content import Content
from textual.widgets import Static

from mistral_chat.tui.safe_text import displayable

WIDE, NARROW = "  │  ", " │ "


@dataclass(frozen=True)
class StatusInfo:
    model: str = "no model"
    device: str = ""
    dtype: str = ""
    loading: str = ""  # "loading 30%" while a model loads
    context_used: int = 0
    context_estimated: bool = False  # context_used is a guess from the text (a reopened chat)
    context_length: int = 0
    trimmed_messages: int = 0
    time_to_first_token: float | None = None
    tokens_per_second: float | None = None
    generated_tokens: int | None = None  # the answer's tokens so far (live) or in all
    generating: bool = False


def status_parts(info: StatusInfo) -> list[tuple[int, str]]:
    """(priority, text) in display order; the lowest priority goes first when the line is too narrow."""
    parts = [(6, displayable(info.model))]
    if info.device:
        parts.append((1, f"{info.device} {info.dtype}".strip()))
    if info.loading:
        parts.append((7, info.loading))
    if info.context_length:
        used = f"~{info.context_used}" if info.context_estimated else str(info.context_used)
        parts.append((3, f"ctx {used}/{info.context_length}"))
        if info.trimmed_messages:
            parts.append((0, f"{info.trimmed_messages} older messages left out"))
    if info.time_to_first_token is not None:
        parts.append((2, f"first token {info.time_to_first_token * 1000:.0f} ms"))
    if info.generated_tokens is not None and (info.generating or info.generated_tokens):
        parts.append((4, f"{info.generated_tokens} tok"))
    if info.tokens_per_second is not None:
        parts.append((5, f"{info.tokens_per_second:.1f} tok/s"))
    if info.generating:
        parts.append((8, "generating (Esc stops)"))
    return parts


SPEED = 5  # the parts from the speed up stay until the model's name has been shortened
MODEL_MIN = 10


def status_text(info: StatusInfo, width: int | None = None) -> str:
    """The line for `info`, fitted into `width` cells (None: no limit)."""
    parts = status_parts(info)
    line = WIDE.join(text for _, text in parts)
    if width is None or len(line) <= width:
        return line

    def joined() -> str:
        return NARROW.join(text for _, text in parts)

    def drop_below(limit: int) -> None:
        while len(joined()) > width:
            candidates = [i for i in range(1, len(parts)) if parts[i][0] < limit]
            if not candidates:
                return
            parts.pop(min(candidates, key=lambda i: (parts[i][0], i)))

    drop_below(SPEED)
    excess = len(joined()) - width
    if excess > 0:  # shorten the model's name
        priority, model = parts[0]
        keep = max(MODEL_MIN, len(model) - excess - 1)
        if keep < len(model):
            parts[0] = (priority, model[:keep] + "…")
    drop_below(100)
    return joined()[:width]


class StatusBar(Static):
    """Shows a StatusInfo; `update_info(**changes)` changes some fields."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False)
        self.info = StatusInfo()

    def on_mount(self) -> None:
        self._show()

    def on_resize(self, event: events.Resize) -> None:
        self._show()

    def update_info(self, **changes: object) -> None:
        self.info = replace(self.info, **changes)  # type: ignore[arg-type]
        self._show()

    @property
    def text(self) -> str:
        return status_text(self.info, self._width())

    def _width(self) -> int | None:
        width = self.content_region.width if self.is_mounted else 0
        return width or None

    def _show(self) -> None:
        self.update(Content(self.text), layout=False)  # one line of fixed height: no layout pass
