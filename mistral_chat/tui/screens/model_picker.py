"""Pick a local model to load; dismisses with its ModelChoice, or None.

Typing filters the list (every word typed must appear in the model's name); Up/Down move, Enter loads the
highlighted model. The loaded (or loading) model is marked and highlighted when the picker opens.
"""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from mistral_chat.tui.model_choices import ModelChoice, local_models
from mistral_chat.tui.screens.welcome import PULL_COMMAND

LOADED_MARK = "●"


def _same_folder(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return a.expanduser().resolve() == b.expanduser().resolve()
    except (OSError, RuntimeError):
        return a == b


class ModelPickerScreen(ModalScreen[ModelChoice | None]):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        Binding("pageup", "move(-10)", "Page up", show=False),
        Binding("pagedown", "move(10)", "Page down", show=False),
    ]

    def __init__(self, current: str = "", current_path: Path | None = None, state: str = "ready") -> None:
        """`current` (name) and `current_path`: the model loaded now, if any; `state`: "ready" or "loading"."""
        super().__init__()
        self.choices: list[ModelChoice] = []
        self.shown: list[int] = []  # indexes into `choices` of the options shown (after the filter)
        self.current, self.current_path, self.state = current, current_path, state

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="picker"):
            yield Label("Pick a model  (type to filter, Enter loads it, Escape cancels)", classes="title")
            yield Input(placeholder="filter", id="filter")
            yield Label("Looking for local models…", id="picker-status", markup=False)
            yield OptionList(id="models")

    def on_mount(self) -> None:
        self.query_one("#filter", Input).focus()
        self.list_models()

    @work(thread=True, exclusive=True)
    def list_models(self) -> None:
        choices = local_models()
        self.app.call_from_thread(self.show_models, choices)

    def is_current(self, choice: ModelChoice) -> bool:
        if not self.current and self.current_path is None:
            return False
        return _same_folder(choice.path, self.current_path) or (self.current_path is None
                                                                 and choice.name == self.current)

    def show_models(self, choices: list[ModelChoice]) -> None:
        self.choices = choices
        self.refilter()

    def refilter(self) -> None:
        words = self.query_one("#filter", Input).value.lower().split()
        self.shown = [i for i, c in enumerate(self.choices)
                      if all(w in c.name.lower() for w in words)]
        status = self.query_one("#picker-status", Label)
        if not self.choices:
            status.update(f"No local model found: run `{PULL_COMMAND}` in another terminal.")
        elif not self.shown:
            status.update(f"No model matches; {len(self.choices)} local model(s) in all.")
        else:
            status.update(f"{len(self.shown)} of {len(self.choices)} local model(s)" if words
                          else f"{len(self.choices)} local model(s)")
        options = self.query_one("#models", OptionList)
        options.clear_options()
        options.add_options(self._option(i) for i in self.shown)
        if self.shown:
            current = next((n for n, i in enumerate(self.shown) if self.is_current(self.choices[i])), 0)
            options.highlighted = current if not words else 0
            options.scroll_to_highlight()

    def _option(self, index: int) -> Option:
        choice = self.choices[index]
        current = self.is_current(choice)
        mark = f"{LOADED_MARK} " if current else "  "
        note = ("  (loading)" if self.state == "loading" else "  (loaded)") if current else ""
        return Option(Content.assemble(mark, choice.name, (note, "bold"), ("  " + choice.detail, "dim")),
                      id=str(index))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.refilter()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        options = self.query_one("#models", OptionList)
        if options.highlighted is not None and self.shown:
            self.dismiss(self.choices[self.shown[options.highlighted]])

    def action_move(self, step: int) -> None:
        options = self.query_one("#models", OptionList)
        if not self.shown:
            return
        now = options.highlighted if options.highlighted is not None else 0
        options.highlighted = max(0, min(len(self.shown) - 1, now + step))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.choices[int(event.option.id or 0)])

    def action_cancel(self) -> None:
        self.dismiss(None)
