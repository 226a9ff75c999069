"""A chat's system prompt and generation settings (temperature, top-p, top-k, max tokens, seed)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from mistral_chat.chat.conversation import GenerationSettings


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str
    generation: GenerationSettings


def parse_settings(system_prompt: str, fields: dict[str, str]) -> ChatSettings:
    """The settings the form's text means; ValueError with a readable message otherwise."""
    def number(name: str, kind: type, label: str) -> float | int:
        try:
            return kind(fields[name].strip())
        except ValueError:
            raise ValueError(f"{label} must be {'a whole number' if kind is int else 'a number'}") from None

    seed_text = fields["seed"].strip()
    if seed_text and not seed_text.lstrip("-").isdigit():
        raise ValueError("seed must be a whole number, or empty for a random one")
    generation = GenerationSettings(
        temperature=float(number("temperature", float, "temperature")),
        top_p=float(number("top_p", float, "top-p")),
        top_k=int(number("top_k", int, "top-k")),
        max_tokens=int(number("max_tokens", int, "max tokens")),
        seed=int(seed_text) if seed_text else None)
    generation.sampling_params()  # range checks
    return ChatSettings(system_prompt.strip(), generation)


FIELDS = [("temperature", "Temperature (0 = greedy)"), ("top_p", "Top-p"), ("top_k", "Top-k (0 = off)"),
          ("max_tokens", "Max tokens"), ("seed", "Seed (empty = random)")]


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """Ctrl+S saves, Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, title: str, current: ChatSettings) -> None:
        super().__init__()
        self.chat_title = title
        self.current = current

    def compose(self) -> ComposeResult:
        g = self.current.generation
        values = {"temperature": str(g.temperature), "top_p": str(g.top_p), "top_k": str(g.top_k),
                  "max_tokens": str(g.max_tokens), "seed": "" if g.seed is None else str(g.seed)}
        with Vertical(classes="dialog wide", id="settings"):
            yield Label(f"Settings of “{self.chat_title}”", classes="title", markup=False)
            yield Label("System prompt")
            yield TextArea(self.current.system_prompt, id="system_prompt", soft_wrap=True)
            with Grid(id="fields"):
                for name, label in FIELDS:
                    yield Label(label)
                    yield Input(values[name], id=name, compact=True)
            yield Static("", id="error", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Save", id="save", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def on_input_submitted(self) -> None:
        self.action_save()

    def action_save(self) -> None:
        fields = {name: self.query_one(f"#{name}", Input).value for name, _ in FIELDS}
        try:
            settings = parse_settings(self.query_one("#system_prompt", TextArea).text, fields)
        except ValueError as exc:
            self.query_one("#error", Static).update(str(exc))
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)
