"""Pick a local model to load; dismisses with its ModelChoice, or None."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from mistral_chat.tui.model_choices import ModelChoice, local_models
from mistral_chat.tui.screens.welcome import PULL_COMMAND


class ModelPickerScreen(ModalScreen[ModelChoice | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self) -> None:
        super().__init__()
        self.choices: list[ModelChoice] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="picker"):
            yield Label("Pick a model  (Enter loads it, Escape cancels)", classes="title")
            yield Label("Looking for local models…", id="picker-status", markup=False)
            yield OptionList(id="models")

    def on_mount(self) -> None:
        self.list_models()

    @work(thread=True, exclusive=True)
    def list_models(self) -> None:
        choices = local_models()
        self.app.call_from_thread(self.show_models, choices)

    def show_models(self, choices: list[ModelChoice]) -> None:
        self.choices = choices
        status = self.query_one("#picker-status", Label)
        status.update(f"{len(choices)} local model(s)" if choices else
                      f"No local model found: run `{PULL_COMMAND}` in another terminal.")
        options = self.query_one("#models", OptionList)
        options.clear_options()
        options.add_options(Option(Content.assemble(c.name, ("  " + c.detail, "dim")), id=str(i))
                            for i, c in enumerate(choices))
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.choices[int(event.option.id or 0)])

    def action_cancel(self) -> None:
        self.dismiss(None)
