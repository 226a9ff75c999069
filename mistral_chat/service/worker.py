"""The engine's worker: one thread owns the model and its session; commands go in by a queue, events come out.

It knows nothing of the UI, and answers through the public API: the model it loads is held as an `api.Model`
(`Model.prompt` builds and trims each prompt, `Model.stream_ids` streams the answer and reads its tool calls), as
the one-shot CLI, `batch` and `serve` do. A front end gives it an `emit` callback (called from the worker thread;
the TUI turns each event into a Textual message with `post_message`, which is thread-safe) and runs
`EngineWorker.run` in a thread of its own (a Textual thread worker, or `start_thread()`).

Commands: `load` a model, `generate` an answer for a conversation, `cancel` the answer being produced (its
partial text stays with the caller), `shutdown`. One session serves every conversation: it reuses its KV cache
for the longest prefix a prompt shares with the previous one, so a follow-up turn prefills only its new tokens,
and a switch to another conversation (or an edited history) re-prefills from where the prompts differ.

Function calling: a request may carry tools. The prompt is then encoded with them (a conversation may end with
tool results instead of a user message), and once the answer ends its generated ids are read for calls by the
[TOOL_CALLS] token (`read_tool_calls`, never by text). A tokenizer without function calling (v1) answers
without the tools and says so in `GenerationStarted.tools_used`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

from mistral_chat.api import Model
from mistral_chat.chat.templates import ChatMessage
from mistral_chat.chat.tools import Tool, ToolCall, ToolCallsRead, read_tool_calls, supports_tools
from mistral_chat.engine.stats import GenerationStats
from mistral_chat.engine.options import LoadOptions, SamplingParams
from mistral_chat.errors import MistralChatError
from mistral_chat.service.loading import release_memory

__all__ = ["ToolCallsRead", "read_tool_calls"]  # read here by older callers; they live in chat/tools.py

log = logging.getLogger(__name__)


class GenerationSession(Protocol):
    """What the worker needs of a session: engine.generate.Session, or a tensor-parallel one."""

    context_length: int
    stats: GenerationStats

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 cancel: threading.Event | None = None) -> Iterator[str]: ...

    def reset(self) -> None: ...


# ---- commands ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadRequest:
    path: Path
    options: LoadOptions = field(default_factory=LoadOptions)


@dataclass(frozen=True)
class GenerateRequest:
    request_id: int
    conversation_id: int
    messages: tuple[ChatMessage, ...]
    params: SamplingParams
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)
    tools: tuple[Tool, ...] = ()


@dataclass(frozen=True)
class _Shutdown:
    pass


Command = Union[LoadRequest, GenerateRequest, _Shutdown]


# ---- events -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadProgress:
    done: int
    total: int


@dataclass(frozen=True)
class ModelReady:
    name: str
    path: Path
    device: str
    dtype: str
    context_length: int
    architecture: str
    load_seconds: float
    supports_tools: bool = False  # the tokenizer has function calling (v2 and later)
    compiled: bool = False  # decode compiles into CUDA graphs: the first answer waits for the compiler


@dataclass(frozen=True)
class GenerationStarted:
    request_id: int
    conversation_id: int
    prompt_tokens: int
    dropped_messages: int  # oldest messages left out of the prompt to fit the context
    context_length: int
    tools_used: bool = False  # the prompt offers the request's tools (False too when the model has none)


@dataclass(frozen=True)
class TokenDelta:
    request_id: int
    conversation_id: int
    text: str


@dataclass(frozen=True)
class GenerationDone:
    """The answer's end. With tool calls, `text` is only what the model wrote before them (often "");
    `tool_call_error` says why calls that could not be read are shown as plain text."""

    request_id: int
    conversation_id: int
    text: str
    stats: GenerationStats
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_error: str = ""


@dataclass(frozen=True)
class EngineFailed:
    """A load or a generation that failed; `message` says what to do. The worker keeps running."""

    message: str
    during: str  # "load" | "generate"
    request_id: int | None = None
    conversation_id: int | None = None


EngineEvent = Union[LoadProgress, ModelReady, GenerationStarted, TokenDelta, GenerationDone, EngineFailed]
Loader = Callable[[LoadRequest, Callable[[int, int], None]], Any]
SessionFactory = Callable[[Any, Union[int, None]], GenerationSession]


def default_loader(request: LoadRequest, progress: Callable[[int, int], None]) -> Any:
    from mistral_chat.engine.loader import load_model

    return load_model(request.path, progress=progress, **request.options.load_kwargs())


def default_session(loaded: Any, context_length: int | None) -> GenerationSession:
    from mistral_chat.engine.generate import Session

    return Session(loaded, context_length=context_length)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, MistralChatError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory: close other programs, use a smaller model or lower --context"
    return f"internal error: {type(exc).__name__}: {exc} (run with --debug for details, and please report it)"


class EngineWorker:
    """Runs commands one at a time in the thread that calls `run()`; `emit` receives every event."""

    def __init__(self, emit: Callable[[EngineEvent], None], loader: Loader = default_loader,
                 session_factory: SessionFactory = default_session) -> None:
        self._emit = emit
        self._loader = loader
        self._session_factory = session_factory
        self._commands: queue.Queue[Command] = queue.Queue()
        self._ids = itertools.count(1)
        self._pending: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.model: Model | None = None  # the model loaded, and the session it answers on
        self.stopped = threading.Event()

    @property
    def loaded(self) -> Any:
        """The engine's LoadedModel (or a loader's stand-in); None before a load."""
        return None if self.model is None else self.model.loaded

    @property
    def session(self) -> GenerationSession | None:
        return None if self.model is None else self.model.session

    # ---- called from any thread ------------------------------------------------------------------------------

    def load(self, path: Path | str, options: LoadOptions | None = None) -> None:
        """Queue a load of the model at `path` (the previous model goes first); ModelReady or EngineFailed follows."""
        self._commands.put(LoadRequest(Path(path), options or LoadOptions()))

    def generate(self, conversation_id: int, messages: Sequence[ChatMessage], params: SamplingParams,
                 tools: Sequence[Tool] = ()) -> int:
        """Queue an answer for `messages` (ending with the user's or tool results); returns the request id its
        events carry. With `tools`, the model may call them (see `GenerationDone.tool_calls`)."""
        request = GenerateRequest(next(self._ids), conversation_id, tuple(messages), params, tools=tuple(tools))
        with self._lock:
            self._pending[request.request_id] = request.cancel
        self._commands.put(request)
        return request.request_id

    def cancel(self, request_id: int | None = None) -> None:
        """Stop one answer (or all queued and running ones); each still ends with a GenerationDone."""
        with self._lock:
            events = [self._pending[request_id]] if request_id in self._pending else \
                list(self._pending.values()) if request_id is None else []
        for event in events:
            event.set()

    def shutdown(self) -> None:
        self.cancel()
        self._commands.put(_Shutdown())

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="mistral-chat-engine", daemon=True)
        thread.start()
        return thread

    # ---- the worker thread -----------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                command = self._commands.get()
                if isinstance(command, _Shutdown):
                    break
                if isinstance(command, LoadRequest):
                    self._load(command)
                else:
                    self._generate(command)
        finally:
            self._unload()
            self.stopped.set()

    def _unload(self) -> None:
        if self.model is not None:
            self.model.close()  # a tensor-parallel session ends its follower processes
            self.model = None
        else:
            release_memory()

    def _load(self, request: LoadRequest) -> None:
        self._unload()
        try:
            loaded = self._loader(request, lambda done, total: self._emit(LoadProgress(done, total)))
            session = self._session_factory(loaded, request.options.context_length)
        except Exception as exc:  # noqa: BLE001 - reported, the worker lives on
            log.debug("load failed", exc_info=True)
            self._emit(EngineFailed(describe_error(exc), "load"))
            return
        self.model = Model(loaded, request.options, session)
        config = getattr(loaded, "config", None)
        self._emit(ModelReady(
            name=getattr(loaded, "name", request.path.name), path=request.path,
            device=str(getattr(loaded, "device", request.options.device)),
            dtype=str(getattr(loaded, "dtype", request.options.dtype)).removeprefix("torch."),
            context_length=session.context_length, architecture=str(getattr(config, "architecture", "")),
            load_seconds=float(getattr(loaded, "load_seconds", 0.0)),
            supports_tools=_tokenizer_supports_tools(getattr(loaded, "tokenizer", None)),
            compiled=bool(getattr(loaded, "compile", False))))

    def _tools(self, request: GenerateRequest) -> tuple[Tool, ...]:
        """The request's tools, or none when the tokenizer has no function calling (then a chat that already
        holds calls or results cannot be encoded: say what to do)."""
        if _tokenizer_supports_tools(self.loaded.tokenizer):
            return request.tools
        if any(m.role == "tool" or m.tool_calls for m in request.messages):
            raise MistralChatError("this chat holds tool calls, but the model's tokenizer has no function calling: "
                                   "pick a model made for tools (e.g. Mistral-7B-Instruct-v0.3 or later)")
        return ()

    def _generate(self, request: GenerateRequest) -> None:
        pieces: list[str] = []
        stats = GenerationStats(finish_reason="cancelled")
        read = ToolCallsRead("")
        model = self.model
        try:
            if request.cancel.is_set():
                return
            if model is None:
                raise MistralChatError("no model is loaded: pick one with the model picker (Ctrl+O), or run "
                                       "`mistral-chat pull mistral-7b-instruct` first")
            prompt, tools = model.prompt(request.messages, self._tools(request), request.params.max_tokens)
            self._emit(GenerationStarted(request.request_id, request.conversation_id, len(prompt.ids),
                                         prompt.dropped_messages, model.context_length, bool(tools)))
            for delta in model.stream_ids(prompt.ids, request.params, tools=tools, cancel=request.cancel,
                                          dropped_messages=prompt.dropped_messages):
                pieces.append(delta)
                self._emit(TokenDelta(request.request_id, request.conversation_id, delta))
            reply = model.last_reply
            assert reply is not None and reply.stats is not None
            stats = reply.stats
            read = ToolCallsRead(reply.text, reply.tool_calls, reply.tool_call_error)
        except Exception as exc:  # noqa: BLE001 - reported, the worker lives on
            log.debug("generation failed", exc_info=True)
            self._emit(EngineFailed(describe_error(exc), "generate", request.request_id, request.conversation_id))
            stats = getattr(model.session, "stats", stats) if model is not None else stats
            stats.finish_reason = "error"
        finally:
            with self._lock:
                self._pending.pop(request.request_id, None)
            if read.calls or read.error:
                self._emit(GenerationDone(request.request_id, request.conversation_id, read.text, stats,
                                          read.calls, read.error))
            else:
                self._emit(GenerationDone(request.request_id, request.conversation_id, "".join(pieces), stats))


def _tokenizer_supports_tools(tokenizer: Any) -> bool:
    try:
        return tokenizer is not None and supports_tools(tokenizer)
    except (AttributeError, TypeError):  # a stand-in without a version
        return False
