"""Shown when there is no model to open: how to get one, in exact commands."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

PULL_COMMAND = "mistral-chat pull mistral-7b-instruct"


def welcome_text(reason: str = "", registered: int = 0) -> str:
    lines = ["Welcome to mistral-chat.", ""]
    if reason:
        lines += [reason, ""]
    if registered:
        models = "1 model is" if registered == 1 else f"{registered} models are"
        lines += [f"{models} ready on disk, and none was chosen to open: press Enter (Pick a model) or Ctrl+O",
                  "to load one. It opens by itself next time.", "",
                  "You can read and search your saved chats meanwhile."]
        return "\n".join(lines)
    lines += ["No model to open yet. In another terminal, download one:", "", f"    {PULL_COMMAND}", "",
              "then press Ctrl+O to pick it (or start `mistral-chat --model mistral-7b-instruct`).",
              "A model folder on disk works too: `mistral-chat --model ./path/to/model`.",
              "", "You can read and search your saved chats meanwhile."]
    return "\n".join(lines)


class WelcomeScreen(ModalScreen[str]):
    """Dismisses with "pick" (open the model picker) or "close"."""

    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, reason: str = "", registered: int = 0) -> None:
        super().__init__()
        self.reason = reason
        self.registered = registered  # ready models on disk (none was named or used before)

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="dialog"):
            yield Static(welcome_text(self.reason, self.registered), id="welcome-text", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Pick a model", id="pick", variant="primary")
                yield Button("Continue", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss("pick" if event.button.id == "pick" else "close")

    def action_close(self) -> None:
        self.dismiss("close")
