"""One message of the conversation: a role label and its text. The model's text is Markdown; the user's is shown
exactly as typed (line breaks, backticks and asterisks kept). Either is data, never markup, and control
characters never reach the terminal (safe_text.displayable)."""

from __future__ import annotations

import re

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Label, Markdown, Static

from mistral_chat.chat.templates import Role
from mistral_chat.tui.clipboard import copy_text
from mistral_chat.tui.safe_text import displayable

FENCE_OPEN = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
ROLE_LABELS = {"user": "You", "assistant": "Assistant", "system": "System", "tool": "Tool result"}


def code_blocks(markdown: str) -> list[str]:
    """The contents of the fenced code blocks of `markdown`, in order (an unclosed last fence counts)."""
    blocks: list[str] = []
    fence: str | None = None
    lines: list[str] = []
    for line in markdown.splitlines():
        match = FENCE_OPEN.match(line)
        if fence is None:
            if match:
                fence, lines = match.group(1), []
        elif match and match.group(1).startswith(fence) and not line.strip().strip(fence[0]):
            blocks.append("\n".join(lines))
            fence = None
        else:
            lines.append(line)
    if fence is not None:
        blocks.append("\n".join(lines))
    return blocks


class MessageView(Vertical, can_focus=True):
    """A message. Focus it (Tab / click) to copy it (c) or its code blocks (y)."""

    BINDINGS = [
        Binding("c", "copy_message", "Copy message"),
        Binding("y", "copy_code", "Copy code block"),
    ]

    def __init__(self, role: Role, text: str, message_id: int = 0, note: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self.message_id = message_id
        self.note = note

    def compose(self) -> ComposeResult:
        yield Label(self._label(), classes="role")
        if self.role == "user":
            yield Static(Content(displayable(self.text)), classes="body plain")
        else:
            yield Markdown(displayable(self.text), classes="body")

    def _label(self) -> Content:
        label = ROLE_LABELS.get(self.role, self.role)
        return Content(f"{label}  {self.note}" if self.note else label)

    # The label and the body may be missing: before compose (which then reads self.note and self.text) and while
    # the view is being removed (the chat log shown again as an answer ends); then only the fields change.

    def set_note(self, note: str) -> None:
        self.note = note
        for label in self.query(".role").results(Label):
            label.update(self._label())

    @property
    def markdown(self) -> Markdown | None:
        return next(iter(self.query(Markdown).results(Markdown)), None)

    async def append(self, fragment: str) -> None:
        """Stream more text in: Markdown.append keeps the finished blocks and parses only from the last one on.
        Awaited here (not through a MarkdownStream's task), so the new text and the status bar's figures of the
        same update reach the screen in one frame."""
        self.text += fragment
        markdown = self.markdown
        if markdown is not None:
            await markdown.append(displayable(fragment))

    async def finish(self, text: str | None = None) -> None:
        """The answer ended; with `text`, show exactly that."""
        if text is not None and text != self.text:
            self.text = text
            markdown = self.markdown
            if markdown is not None:
                await markdown.update(displayable(text))

    def action_copy_message(self) -> None:
        copy_text(self, self.text, "The message")

    def action_copy_code(self) -> None:
        blocks = code_blocks(self.text)
        if not blocks:
            self.notify("This message has no code block", severity="warning")
            return
        copy_text(self, blocks[-1], "The code block" if len(blocks) == 1 else
                  f"The last of {len(blocks)} code blocks (the command palette copies the others)")
