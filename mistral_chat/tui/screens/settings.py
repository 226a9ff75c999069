"""A chat's system prompt, generation settings (temperature, top-p, top-k, min-p, penalties, max tokens, seed,
speculative draft tokens, stop strings) and the tools file its model may call."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from mistral_chat.chat.tools import ToolsFileError, load_tools
from mistral_chat.engine.options import SamplingParams


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str
    generation: SamplingParams
    tools_path: str = ""  # "" = no tools


STOP_SEPARATOR = re.compile(r"(?<!\\),|\n")
ESCAPES = {"\\n": "\n", "\\t": "\t", "\\,": ",", "\\\\": "\\"}


def parse_stop_strings(text: str) -> tuple[str, ...]:
    r"""Stop strings separated by commas or new lines; \n, \t, \, and \\ stand for a newline, a tab, a comma, a
    backslash. Spaces around each one are dropped, empty ones ignored."""
    stops: list[str] = []
    for piece in STOP_SEPARATOR.split(text):
        piece = re.sub(r"\\[nt,\\]", lambda m: ESCAPES[m.group(0)], piece.strip())
        if piece:
            stops.append(piece)
    return tuple(stops)


def format_stop_strings(stops: tuple[str, ...]) -> str:
    """The field's text for `stops` (parse_stop_strings reads it back)."""
    escaped = (s.replace("\\", "\\\\").replace(",", "\\,").replace("\n", "\\n").replace("\t", "\\t") for s in stops)
    return ", ".join(escaped)


def check_tools_path(text: str) -> str:
    """The absolute path of a tools file that `load_tools` reads ("" for none); ValueError otherwise."""
    text = text.strip()
    if not text:
        return ""
    path = Path(text).expanduser().resolve()
    try:
        tools = load_tools(path)
    except ToolsFileError as exc:
        raise ValueError(str(exc)) from None
    if not tools:
        raise ValueError(f"tools file {path} defines no function")
    return str(path)


def parse_settings(system_prompt: str, fields: dict[str, str]) -> ChatSettings:
    """The settings the form's text means; ValueError with a readable message otherwise."""
    def number(name: str, kind: type, label: str, default: str) -> float | int:
        try:
            return kind(fields.get(name, default).strip() or default)
        except ValueError:
            raise ValueError(f"{label} must be {'a whole number' if kind is int else 'a number'}") from None

    seed_text = fields["seed"].strip()
    if seed_text and not seed_text.lstrip("-").isdigit():
        raise ValueError("seed must be a whole number, or empty for a random one")
    generation = SamplingParams(  # ValueError when a value is out of range
        temperature=float(number("temperature", float, "temperature", "0")),
        top_p=float(number("top_p", float, "top-p", "1")),
        top_k=int(number("top_k", int, "top-k", "0")),
        max_tokens=int(number("max_tokens", int, "max tokens", "1024")),
        seed=int(seed_text) if seed_text else None,
        min_p=float(number("min_p", float, "min-p", "0")),
        repetition_penalty=float(number("repetition_penalty", float, "repetition penalty", "1")),
        presence_penalty=float(number("presence_penalty", float, "presence penalty", "0")),
        speculate=int(number("speculate", int, "speculate", "0")) if fields.get("speculate", "").strip() else None,
        stop=parse_stop_strings(fields.get("stop", "")))
    return ChatSettings(system_prompt.strip(), generation, check_tools_path(fields.get("tools", "")))


# (id, label, placeholder); the numbers go two to a row, the texts one to a row
NUMBER_FIELDS = [("temperature", "Temperature (0 = greedy)", ""), ("top_p", "Top-p", ""),
                 ("top_k", "Top-k (0 = off)", ""), ("min_p", "Min-p (0 = off)", ""),
                 ("max_tokens", "Max tokens", ""), ("seed", "Seed (empty = random)", ""),
                 ("repetition_penalty", "Repetition penalty", ""), ("presence_penalty", "Presence penalty", ""),
                 ("speculate", "Speculate (0 = off)", "empty = automatic")]
TEXT_FIELDS = [("stop", "Stop strings", "comma-separated; \\n = new line"),
               ("tools", "Tools file (JSON)", "functions the model may call; empty = none")]
FIELDS = NUMBER_FIELDS + TEXT_FIELDS


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
                  "max_tokens": str(g.max_tokens), "seed": "" if g.seed is None else str(g.seed),
                  "min_p": str(g.min_p), "repetition_penalty": str(g.repetition_penalty),
                  "presence_penalty": str(g.presence_penalty),
                  "speculate": "" if g.speculate is None else str(g.speculate),
                  "stop": format_stop_strings(tuple(g.stop)),
                  "tools": self.current.tools_path}
        with Vertical(classes="dialog wide", id="settings"):
            yield Label(f"Settings of “{self.chat_title}”", classes="title", markup=False)
            yield Label("System prompt")
            yield TextArea(self.current.system_prompt, id="system_prompt", soft_wrap=True)
            with Grid(id="fields"):
                for name, label, placeholder in NUMBER_FIELDS:
                    yield Label(label)
                    yield Input(values[name], id=name, compact=True, placeholder=placeholder)
            with Grid(id="text-fields"):
                for name, label, placeholder in TEXT_FIELDS:
                    yield Label(label)
                    yield Input(values[name], id=name, compact=True, placeholder=placeholder)
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
        fields = {name: self.query_one(f"#{name}", Input).value for name, _, _ in FIELDS}
        try:
            settings = parse_settings(self.query_one("#system_prompt", TextArea).text, fields)
        except ValueError as exc:
            self.query_one("#error", Static).update(str(exc))
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)
