"""Copying text: Textual sends it to the terminal's clipboard with an OSC 52 sequence, which many terminals (and
tmux without `set -g set-clipboard on`) drop without a word. Nothing comes back to tell, so the notice says what
was done rather than claiming the text is on the clipboard."""

from __future__ import annotations

from textual.dom import DOMNode

HOW_TO_CHECK = ("if nothing pastes, the terminal does not accept OSC 52 (in tmux: set -g set-clipboard on); "
                "select the text with the mouse (Shift+drag) or export the chat instead")


def copy_text(node: DOMNode, text: str, what: str) -> None:
    """Send `text` to the terminal's clipboard and say so, with what to do if the terminal ignored it."""
    node.app.copy_to_clipboard(text)
    lines = text.count("\n") + 1
    node.notify(f"{what} ({len(text)} characters, {lines} line{'s' if lines != 1 else ''}) was sent to the "
                f"terminal's clipboard; {HOW_TO_CHECK}.", title="Copy", timeout=8, markup=False)
