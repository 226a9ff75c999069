"""The bottom line: model, device and dtype, context used / length, and the last answer's speed."""

from __future__ import annotations

from dataclasses import dataclass, replace

from textual.content import Content
from textual.widgets import Static


@dataclass(frozen=True)
class StatusInfo:
    model: str = "no model"
    device: str = ""
    dtype: str = ""
    loading: str = ""  # "loading 3/10" while a model loads
    context_used: int = 0
    context_length: int = 0
    trimmed_messages: int = 0
    time_to_first_token: float | None = None
    tokens_per_second: float | None = None
    generating: bool = False


def status_text(info: StatusInfo) -> str:
    parts = [info.model]
    if info.device:
        parts.append(f"{info.device} {info.dtype}".strip())
    if info.loading:
        parts.append(info.loading)
    if info.context_length:
        ctx = f"ctx {info.context_used}/{info.context_length}"
        if info.trimmed_messages:
            ctx += f" ({info.trimmed_messages} older messages left out)"
        parts.append(ctx)
    if info.time_to_first_token is not None:
        parts.append(f"first token {info.time_to_first_token * 1000:.0f} ms")
    if info.tokens_per_second is not None:
        parts.append(f"{info.tokens_per_second:.1f} tok/s")
    if info.generating:
        parts.append("generating (Esc stops)")
    return "  │  ".join(parts)


class StatusBar(Static):
    """Shows a StatusInfo; `update_info(**changes)` changes some fields."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False)
        self.info = StatusInfo()

    def on_mount(self) -> None:
        self.update(Content(status_text(self.info)))

    def update_info(self, **changes: object) -> None:
        self.info = replace(self.info, **changes)  # type: ignore[arg-type]
        self.update(Content(status_text(self.info)))
