"""The chat TUI: the Textual application, its engine thread and `run_tui`, which the CLI calls.

Threads: the event loop runs the UI and the SQLite store; the engine's worker (`EngineWorker.run`, started as
a Textual thread worker) owns the model, and is the only thread that imports torch. UI -> engine:
`engine.load/generate/cancel` (a queue and events). Engine -> UI: tokens gather in a `TokenBuffer` that the chat
screen takes on a timer (tui/streaming.py); every other event is posted as an `EngineMessage` (`post_message`
is thread-safe) and handled by the chat screen.

Start-up: the first frame comes first. Finding the model to open (models/store.py and huggingface_hub, ~0.3 s
of imports) runs in a thread after it; keys typed meanwhile land in the prompt.
"""

from __future__ import annotations

import gc
import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from textual import events
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen

from mistral_chat.chat.store import ChatStore
from mistral_chat.engine.options import LoadOptions, SamplingParams
from mistral_chat.errors import MistralChatError
from mistral_chat.paths import database_path
from mistral_chat.service.worker import (EngineWorker, LoadRequest, Loader, SessionFactory, TokenDelta, default_loader,
                                        default_session)
from mistral_chat.tui.engine_messages import EngineMessage
from mistral_chat.tui.streaming import CPU_UI_SHARE, UI_SHARE, FlushPace, TokenBuffer
from mistral_chat.tui.model_choices import remember_model, start_model
from mistral_chat.tui.screens.chat import ChatScreen
from mistral_chat.tui.screens.help import HelpScreen
from mistral_chat.tui.screens.welcome import WelcomeScreen
from mistral_chat.tui.themes import DEFAULT_THEME, load_themes

log = logging.getLogger(__name__)

THEME_PREFERENCE = "theme"


@dataclass
class AppOptions:
    """What the TUI starts with: the model to open and how it loads (`load.tp` > 1: a tensor-parallel run), and
    what new chats start with (their sampling settings, system prompt and tools file)."""

    model: str | None = None  # a folder, alias or repo id; None: the last used
    load: LoadOptions = field(default_factory=LoadOptions)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # new chats' settings
    system_prompt: str = ""
    tools_path: str = ""  # a tools JSON file new chats offer to the model ("" = none)
    theme_dirs: list[Path] | None = None  # None: the shipped and the user's theme folders


ModelResolver = Callable[[str | None], "tuple[Path, str] | None"]


class CannotStart(MistralChatError):
    """The TUI stopped before it could be used (a damaged database, an internal error); the message says why."""


class MistralChatApp(App[None]):
    """Chat with a local Mistral-family model."""

    TITLE = "mistral-chat"
    CSS_PATH = "app.tcss"
    BINDINGS = [Binding("f1", "help", "Help")]

    def __init__(self, options: AppOptions | None = None, store: ChatStore | None = None,
                 loader: Loader = default_loader, session_factory: SessionFactory = default_session,
                 resolve_model: ModelResolver = start_model) -> None:
        super().__init__()
        self.options = options or AppOptions()
        self.store = store or ChatStore(database_path())
        self.tokens = TokenBuffer()  # the engine's TokenDeltas, taken by the chat screen's timer
        self.flush_pace = FlushPace()  # how often that timer shows them
        self._loader = loader
        self.engine = EngineWorker(self._post_engine_event, loader=self._load_in_engine_thread,
                                   session_factory=session_factory)
        self._resolve_model = resolve_model
        self.cannot_start: CannotStart | None = None
        self.model_state = "none"  # none | loading | ready | failed
        self.model_name = ""
        self.model_path: Path | None = None  # the folder of the model loaded (or loading)
        self.theme_problems: list[str] = []

    # ---- start and stop --------------------------------------------------------------------------------------

    def get_default_screen(self) -> Screen:
        return ChatScreen()

    @property
    def chat(self) -> ChatScreen:
        for screen in self.screen_stack:
            if isinstance(screen, ChatScreen):
                return screen
        raise LookupError("the chat screen is not running")

    def on_mount(self) -> None:
        try:
            self._install_themes()
        except sqlite3.DatabaseError as exc:
            self.cannot_start_with_database(exc)
            return
        self.run_worker(self.engine.run, thread=True, name="engine", group="engine", exit_on_error=False)
        if self.options.model is not None:
            self.model_state = "loading"  # answers asked for before the model is found wait for it
            self.model_name = self.options.model
        self.call_after_refresh(self._find_start_model)

    def _find_start_model(self) -> None:
        self.run_worker(self._resolve_in_thread, thread=True, name="find-model", group="find-model",
                        exit_on_error=False)

    def _resolve_in_thread(self) -> None:
        try:
            found: object = self._resolve_model(self.options.model)
        except MistralChatError as exc:
            found = exc
        except Exception as exc:  # noqa: BLE001 - the chat opens anyway; the welcome screen says why
            log.warning("cannot look up the model to open", exc_info=True)
            found = MistralChatError(f"cannot look up the model to open: {exc}")
        self.call_from_thread(self._open_start_model, found)

    def _open_start_model(self, found: object) -> None:
        if isinstance(found, MistralChatError):
            self.model_state = "none"
            self.push_screen(WelcomeScreen(str(found)), self._after_welcome)
        elif found is None:
            self.push_screen(WelcomeScreen(registered=self._registered_models()), self._after_welcome)
        else:
            path, name = found  # type: ignore[misc]
            self.load_model(path, name)

    @staticmethod
    def _registered_models() -> int:
        from mistral_chat.tui.model_choices import local_models

        return len(local_models())

    async def on_event(self, event: events.Event) -> None:
        """Keys that arrive before anything has focus (typed while the app starts) go to the chat's prompt."""
        if (isinstance(event, events.Key) and not event.is_forwarded and self.focused is None
                and isinstance(self.screen, ChatScreen) and self.screen.take_early_key(event)):
            return
        await super().on_event(event)

    def _after_welcome(self, choice: str | None) -> None:
        if choice == "pick":
            self.chat.action_pick_model()

    def load_model(self, path: Path, name: str) -> None:
        """Queue a model load (the chat stays usable meanwhile; answers asked for wait for it)."""
        self.model_state = "loading"
        self.model_name = name
        self.model_path = path
        try:
            self.chat.status.update_info(model=name, device="", dtype="", loading="loading…")
        except (LookupError, NoMatches):  # the chat screen shows it when it mounts
            pass
        self.engine.load(path, self.options.load)
        remember_model(name)

    def _load_in_engine_thread(self, request: LoadRequest, progress: Callable[[int, int], None]) -> object:
        """The loader, run in the engine's thread: deciding on compiling imports torch, which the UI never does.

        What is loaded then lives as long as the model, so it is frozen out of the garbage collector's full passes
        (gc.freeze): with torch and a model in memory one such pass holds the GIL for ~0.15 s, and the screen
        updates' allocations set one off every answer or two, stalling the engine. A new load unfreezes it all
        first, so that what the previous model leaves behind can be collected."""
        from mistral_chat.service.loading import prepare_compile

        gc.unfreeze()
        loaded = self._loader(replace(request, options=prepare_compile(request.options)), progress)
        gc.collect()  # no garbage of the load is kept for good
        gc.freeze()
        return loaded

    def _post_engine_event(self, event: object) -> None:
        """Called in the engine's thread: tokens gather for the screen's timer, other events become messages."""
        if isinstance(event, TokenDelta):
            self.tokens.add(event)
        else:
            self.post_message(EngineMessage(event))  # type: ignore[arg-type]

    def cannot_start_with_database(self, exc: sqlite3.DatabaseError) -> None:
        """The conversation database is unreadable: stop, leaving the file exactly as it is, and say what to do."""
        path = self.store.path
        if self.cannot_start is not None:
            return
        self.cannot_start = CannotStart(
            f"the conversation database {path} cannot be read ({exc}); it was left untouched: move it aside "
            f"(mv {path} {path}.damaged) to start with an empty one, or set MISTRAL_CHAT_HOME to another folder")
        self.engine.shutdown()
        self.exit(return_code=1)

    async def on_engine_message(self, message: EngineMessage) -> None:
        from mistral_chat.service.worker import EngineFailed, ModelReady

        event = message.event
        if isinstance(event, ModelReady):
            self.model_state = "ready"
            self.flush_pace.share = CPU_UI_SHARE if event.device.startswith("cpu") else UI_SHARE
            if event.compiled:
                self.notify("Compiling the model for these GPUs (--tp): the first answer takes a few minutes the first "
                            "time, less once cached (--no-compile skips it).", title="Compiling", timeout=15)
        elif isinstance(event, EngineFailed) and event.during == "load":
            self.model_state = "failed"
        chat = self.chat
        try:
            await chat.handle_engine_event(event)
        except NoMatches:  # the screen is being taken down (quitting): there is nothing to show the event on
            if chat.children:
                raise

    async def on_app_focus(self, event: events.AppFocus) -> None:
        """Back in this window: list the chats again, with those other windows started or took meanwhile."""
        try:
            chat = self.chat
            await chat.refresh_sidebar()
        except (LookupError, NoMatches):  # not composed yet: it lists them when it mounts
            pass
        except sqlite3.Error as exc:
            log.warning("cannot list the chats again: %s", exc)

    async def action_quit(self) -> None:
        self.shutdown_engine()
        self.exit()

    def shutdown_engine(self) -> None:
        try:
            self.chat.save_now()
        except LookupError:
            pass
        self.engine.shutdown()

    def on_unmount(self) -> None:
        self.engine.shutdown()

    # ---- themes ----------------------------------------------------------------------------------------------

    def _install_themes(self) -> None:
        themes, self.theme_problems = load_themes(self.options.theme_dirs)
        for theme in themes:
            self.register_theme(theme)
        wanted = self.store.get_preference(THEME_PREFERENCE) or DEFAULT_THEME
        if wanted in self.available_themes:
            self.theme = wanted
        self.theme_changed_signal.subscribe(self, self._save_theme)
        for problem in self.theme_problems:
            self.notify(f"Theme skipped: {problem}", severity="warning", markup=False)

    def _save_theme(self, theme: object) -> None:
        try:
            self.store.set_preference(THEME_PREFERENCE, theme.name)  # type: ignore[attr-defined]
        except sqlite3.Error as exc:  # a read-only database: the theme holds for this run
            log.warning("cannot save the theme: %s", exc)

    # ---- the command palette ---------------------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        try:
            chat = self.chat
        except LookupError:
            return
        yield SystemCommand("New chat", "Start a new conversation (Ctrl+N)", chat.action_new_chat)
        yield SystemCommand("Rename chat", "Give this conversation a title (F2)", chat.action_rename_chat)
        yield SystemCommand("Delete chat", "Delete this conversation (F8)", chat.action_delete_chat)
        yield SystemCommand("Search chats", "Find a conversation by title or text (Ctrl+F)", chat.action_search)
        yield SystemCommand("Toggle chat list", "Show or hide the sidebar (Ctrl+B)", chat.action_toggle_sidebar)
        yield SystemCommand("Stop", "Stop the answer being generated (Escape)", chat.action_stop)
        yield SystemCommand("Regenerate", "Answer the last message again (Ctrl+R)", chat.action_regenerate)
        yield SystemCommand("Edit last message", "Edit your last message and resend it (Ctrl+L)",
                            chat.action_edit_last)
        yield SystemCommand("Copy last answer", "Copy the last answer to the clipboard (F3)",
                            chat.action_copy_last_answer)
        from mistral_chat.tui.widgets.message_view import code_blocks

        for index, block in enumerate(code_blocks(chat.last_answer() or "")):
            first = next((line for line in block.splitlines() if line.strip()), "")[:40]
            yield SystemCommand(f"Copy code block {index + 1}", f"From the last answer: {first}",
                                partial(chat.copy_code_block, index))
        yield SystemCommand("Paste tool result", "Give the model the result of its tool call (Ctrl+T)",
                            chat.action_tool_result)
        yield SystemCommand("Settings", "System prompt, generation settings and tools of this chat (Ctrl+S)",
                            chat.action_settings)
        yield SystemCommand("Pick model", "Load another local model (Ctrl+O)", chat.action_pick_model)
        yield SystemCommand("Export chat to Markdown", "Write this conversation to a .md file",
                            partial(chat.export, "markdown"))
        yield SystemCommand("Export chat to JSON", "Write this conversation to a .json file",
                            partial(chat.export, "json"))
        yield SystemCommand("Help", "All key bindings (F1)", self.action_help)


def run_tui(options: AppOptions) -> None:
    """Open the chat TUI (the CLI's default on a terminal)."""
    hooks = None
    engine_hooks: dict = {}
    if options.load.tp > 1:  # rank 0 of a tensor-parallel run: the followers load and decode alongside
        from mistral_chat.service.tensor_parallel import ParallelModelLoader

        hooks = ParallelModelLoader(options.load.tp)
        engine_hooks = {"loader": hooks.load, "session_factory": hooks.session_factory}
    store = ChatStore(database_path())
    app = MistralChatApp(options, store, **engine_hooks)
    try:
        app.run()
    finally:
        app.engine.shutdown()
        if hooks is not None:
            hooks.close()
        store.close()
    if app.cannot_start is not None:
        raise app.cannot_start
    if app.return_code:  # Textual printed the traceback of what stopped it
        raise CannotStart("the chat stopped on an internal error (the traceback is above); please report it")
