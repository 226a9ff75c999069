"""Model and user text made safe to draw: no control characters reach the terminal.

A model that writes `ESC ] 0 ; title BEL` or `ESC [ 31 m` must not retitle the terminal or colour it: the screen
shows text, so C0 controls (but newline and tab), DEL and the C1 range are dropped before display. What is
stored and exported keeps the exact text. (Markup is a separate matter: text goes into widgets as `Content` or
with markup off, never parsed as Rich/Textual markup.)
"""

from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def displayable(text: str) -> str:
    """`text` without control characters (newlines and tabs stay)."""
    return CONTROL.sub("", text)
