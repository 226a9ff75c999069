"""Model output on a terminal: text only, never control sequences.

A model's answer is data. Written raw to a terminal, `ESC ] 0 ; title BEL` retitles the window, `ESC [ 31 m` leaves
the shell red, and OSC 8 / OSC 52 sequences make links or write the clipboard. `TerminalText` removes every C0
control character but newline and tab, DEL, every C1 control character, and whole escape sequences (CSI, OSC, DCS,
SOS, PM, APC and two-character escapes), also when a sequence is split across the pieces of a streamed answer.
Pipes and files get the bytes exactly as the model wrote them; this is only for a terminal.
"""

from __future__ import annotations

ESC = "\x1b"
BEL = "\x07"
KEEP = {"\n", "\t"}
STRING_STARTS = {"]", "P", "X", "^", "_"}  # OSC, DCS, SOS, PM, APC: run until ST (ESC \) or, for OSC, BEL
C1_CSI, C1_OSC, C1_ST = "\x9b", "\x9d", "\x9c"
C1_STRINGS = {"\x90", "\x98", "\x9e", "\x9f", C1_OSC}  # DCS, SOS, PM, APC, OSC
MAX_STRING = 4096  # an unterminated string sequence swallows at most this much of the answer


def is_control(ch: str) -> bool:
    code = ord(ch)
    return (code < 0x20 and ch not in KEEP) or code == 0x7F or 0x80 <= code <= 0x9F


class TerminalText:
    """Filters a stream of text for a terminal: `feed(piece)` returns what is safe to show of it."""

    def __init__(self) -> None:
        self._state = "text"  # text | esc | csi | string | string_esc
        self._string_len = 0

    def feed(self, piece: str) -> str:
        out: list[str] = []
        for ch in piece:
            state = self._state
            if state == "text":
                if ch == ESC:
                    self._state = "esc"
                elif ch == C1_CSI:
                    self._state = "csi"
                elif ch in C1_STRINGS:
                    self._start_string()
                elif not is_control(ch):
                    out.append(ch)
            elif state == "esc":
                if ch == "[":
                    self._state = "csi"
                elif ch in STRING_STARTS:
                    self._start_string()
                elif " " <= ch <= "/" or ch == ESC:  # an intermediate byte: the escape goes on (ESC ( B)
                    pass
                else:  # the final byte of a two-character escape (ESC c, ESC 7, ...) is dropped with it;
                    self._state = "text"  # a newline or tab ends a broken escape and stays
                    if ch in KEEP:
                        out.append(ch)
            elif state == "csi":
                if "\x40" <= ch <= "\x7e":  # the final byte
                    self._state = "text"
                elif "\x20" <= ch <= "\x3f":  # parameters and intermediates
                    pass
                else:  # not part of a CSI: the sequence was broken; show what follows
                    self._state = "text"
                    out.append(self.feed(ch))
            else:  # string, string_esc
                self._string_len += 1
                if ch == BEL or ch == C1_ST or (state == "string_esc" and ch == "\\"):
                    self._state = "text"
                elif self._string_len > MAX_STRING:
                    self._state = "text"
                else:
                    self._state = "string_esc" if ch == ESC else "string"
        return "".join(out)

    def _start_string(self) -> None:
        self._state = "string"
        self._string_len = 0


def terminal_safe(text: str) -> str:
    """`text` without control sequences (a whole text, not a stream)."""
    return TerminalText().feed(text)
