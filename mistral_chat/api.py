"""The Python API: load a model once, then chat, stream, or answer many conversations together.

```python
from mistral_chat import Model

with Model.load("mistral-7b-instruct") as model:          # alias, repo id or folder
    reply = model.chat([{"role": "user", "content": "Hi"}], max_tokens=200, temperature=0.7)
    print(reply.text, reply.finish_reason, reply.usage.tokens_per_second)
    for piece in model.stream([{"role": "user", "content": "A haiku"}]):
        print(piece, end="", flush=True)
    replies = model.chat_batch([[{"role": "user", "content": q}] for q in ("2+2?", "Capital of France?")])
```

Messages are OpenAI-style dicts (`system`, `user`, `assistant` with optional `tool_calls`, `tool` with
`tool_call_id`) or `chat.templates.ChatMessage`s. Prompts are built, trimmed to the context and read for tool calls
exactly as the chat does (`chat/`). `chat`, `stream` and `stream_ids` run the engine's batch-1 `Session` (compiled
decode on GPUs), which keeps the cache of the previous prompt for the next one that shares its start; `chat_batch`
and `chat_requests` run continuous batching (`engine/batch.py`; under tensor parallelism, `tp > 1`, every rank
runs each batch step on its shard: `engine/parallel/batch.py`). The model holds one cache: a batch takes it and
the next chat starts on a fresh one. The CLI's one-shot mode, the TUI's engine worker, `batch` and `serve` all
answer through this class.

Importing this module does not import torch; `Model.load` does.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral_chat.chat.openai_messages import Message, MessageError, ToolSpec, to_chat_messages, to_tools
from mistral_chat.chat.templates import ChatMessage, encode_conversation
from mistral_chat.chat.fim import encode_fim
from mistral_chat.chat.tools import Tool, ToolCall, ToolCallsRead, read_tool_calls, supports_tools
from mistral_chat.chat.trim import TrimmedPrompt, answer_reserve, trim_history
from mistral_chat.engine.options import LoadOptions, SamplingParams
from mistral_chat.engine.stats import GenerationStats
from mistral_chat.errors import MistralChatError
from mistral_chat.service.loading import release_memory

if TYPE_CHECKING:
    from mistral_chat.engine.batch import BatchGenerator
    from mistral_chat.engine.generate import Session
    from mistral_chat.engine.loader import LoadedModel
    from mistral_chat.text.base import Tokenizer

__all__ = ["ChatRequest", "Message", "Model", "ModelTokenizer", "Reply", "ToolSpec", "Usage", "to_chat_messages",
           "to_tools"]

log = logging.getLogger(__name__)

def sampling_params(base: SamplingParams | None = None, **given: Any) -> SamplingParams:
    """`base` (default: SamplingParams()) with the keywords given that are not None; `stop` may be one string.
    ValueError for a value out of range or a keyword that is not a SamplingParams field."""
    unknown = {k for k, v in given.items() if v is not None} - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    changes = {k: v for k, v in given.items() if v is not None}
    if isinstance(changes.get("stop"), str):
        changes["stop"] = (changes["stop"],)
    elif "stop" in changes:
        changes["stop"] = tuple(changes["stop"])
    return dataclasses.replace(base or SamplingParams(), **changes)


# ---- replies out --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """What an answer cost: prompt and generated tokens, time to the first token (s), decode speed (tokens/s)."""

    prompt_tokens: int
    generated_tokens: int
    time_to_first_token: float
    tokens_per_second: float
    dropped_messages: int = 0  # oldest messages left out of the prompt to fit the context

    @classmethod
    def of(cls, stats: GenerationStats, dropped_messages: int = 0) -> "Usage":
        return cls(stats.prompt_tokens, stats.generated_tokens, stats.time_to_first_token, stats.tokens_per_second,
                   dropped_messages)

    def to_json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "time_to_first_token_s": round(self.time_to_first_token, 4),
                "tokens_per_second": round(self.tokens_per_second, 2), "dropped_messages": self.dropped_messages}


@dataclass(frozen=True)
class Reply:
    """One answer. With tool calls, `text` is what the model wrote before them (often "") and `finish_reason` is
    "tool_calls"; otherwise "stop" (end of answer or a stop string), "length" (max tokens or the context) or
    "cancelled". `tool_call_error` says why calls that could not be read came back as plain text."""

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=lambda: Usage(0, 0, 0.0, 0.0))
    tool_call_error: str = ""
    token_ids: tuple[int, ...] = ()  # the answer's generated ids (EOS excluded)
    stats: GenerationStats | None = field(default=None, compare=False, repr=False)  # the engine's whole record

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "tool_calls": [c.to_json() for c in self.tool_calls],
                "finish_reason": self.finish_reason, "usage": self.usage.to_json()}


def make_reply(tokenizer: Any, text: str, generated_ids: Sequence[int] | None, stats: GenerationStats,
               tools: Sequence[Tool], dropped_messages: int = 0) -> Reply:
    """A Reply from an answer's text, ids and stats; its ids read for tool calls where tools were offered."""
    read = ToolCallsRead(text)
    if tools and generated_ids is not None and stats.finish_reason != "cancelled":
        read = read_tool_calls(tokenizer, generated_ids, text)
    return Reply(read.text, read.calls, "tool_calls" if read.calls else stats.finish_reason,
                 Usage.of(stats, dropped_messages), read.error, tuple(generated_ids or ()), stats)


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to answer in a batch (`Model.chat_requests`): messages, tools, sampling."""

    messages: Sequence[Message]
    tools: Sequence[ToolSpec] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)


# ---- the tokenizer ------------------------------------------------------------------------------------------


class ModelTokenizer:
    """A model's tokenizer: text <-> ids, and conversations in the model's instruct format."""

    def __init__(self, tokenizer: "Tokenizer") -> None:
        self.raw = tokenizer  # text.base.Tokenizer

    @property
    def version(self) -> str:
        return self.raw.version

    @property
    def vocab_size(self) -> int:
        return self.raw.vocab_size

    @property
    def bos_id(self) -> int:
        return self.raw.bos_id

    @property
    def eos_id(self) -> int:
        return self.raw.eos_id

    @property
    def supports_tools(self) -> bool:
        return supports_tools(self.raw)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.raw.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, control tokens left out."""
        return self.raw.decode(list(ids))

    def encode_chat(self, messages: Iterable[Message], tools: Iterable[ToolSpec] | None = None) -> list[int]:
        """The prompt ids of a conversation (ending with a user message or tool results), ready for the answer."""
        return encode_conversation(self.raw, to_chat_messages(messages), list(to_tools(tools)) or None)

    def encode_fim(self, prefix: str, suffix: str = "") -> list[int]:
        """The prompt ids asking a code model for what goes between `prefix` and `suffix` (`stream_ids` answers)."""
        return encode_fim(self.raw, prefix, suffix)

    def __repr__(self) -> str:
        return f"ModelTokenizer({self.raw!r})"


# ---- the model ----------------------------------------------------------------------------------------------


class Model:
    """A loaded model. Make one with `Model.load`; `close()` (or leaving a `with` block) frees its memory and ends
    its tensor-parallel processes. Not thread-safe: one thread at a time.

    `Model(loaded, options, session)` wraps a model loaded otherwise; `session` is what chats run on (a tensor-parallel
    run's ParallelSession, or a stand-in with `generate` and `context_length`), by default a `Session` made at the
    first chat."""

    def __init__(self, loaded: "LoadedModel", options: LoadOptions, session: "Session | None" = None) -> None:
        self.loaded: LoadedModel | None = loaded
        self.options = options
        self._session = session
        self.last_reply: Reply | None = None  # the reply of the last `stream` (or `chat`), once it ended

    @classmethod
    def load(cls, name_or_path: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
             quantize: str | None = None, context: int | None = None, tp: int = 1,
             lora: str | Path | None = None, lora_scale: float = 1.0, compile: bool = True,
             progress: Callable[[int, int], None] | None = None) -> "Model":
        """Load a model: a folder, an alias from `mistral-chat list` or a pulled repo id (None: the last used).

        device: auto | cpu | cuda | cuda:N; dtype: auto | bfloat16 | float16 | float32; quantize: None | int8 | int4;
        context: tokens (default the model's, at most 32768); tp: tensor-parallel processes, one a GPU;
        lora: a mistral-finetune adapter merged at load; compile: CUDA-graph decode on GPUs;
        progress(done, total): called as tensors load (one process only).
        """
        options = LoadOptions(device=device, dtype=dtype, context_length=context, quantize=quantize, compile=compile,
                              lora=Path(lora) if lora is not None else None, lora_scale=lora_scale, tp=tp)
        model = cls.from_options(name_or_path, options, progress)
        if model is None:
            from mistral_chat.engine.parallel.group import ParallelRunError

            raise ParallelRunError("this process was a torchrun follower and holds no model: use "
                                   "Model.load(..., tp=N) in one process, which starts the others itself")
        return model

    @classmethod
    def from_options(cls, name_or_path: str | Path | None, options: LoadOptions,
                     progress: Callable[[int, int], None] | None = None) -> "Model | None":
        """`load` with the options as `LoadOptions` (the CLI's). With `tp > 1`, None in a torchrun follower (a rank
        other than 0), which follows rank 0 inside this call until rank 0 closes its model."""
        from mistral_chat.service.loading import prepare_compile, resolve_model_path

        options = prepare_compile(options)
        name = None if name_or_path is None else str(name_or_path)
        if options.tp > 1:
            from mistral_chat.service.tensor_parallel import start_parallel

            started = start_parallel(name, options, progress)
            return None if started is None else cls(started[0], options, started[1])
        from mistral_chat.engine.loader import load_model

        loaded = load_model(resolve_model_path(name), progress=progress, **options.load_kwargs())
        return cls(loaded, options)

    # ---- what it is ---------------------------------------------------------------------------------------------

    def _loaded(self) -> "LoadedModel":
        if self.loaded is None:
            raise MistralChatError("this model was closed: load it again with Model.load")
        return self.loaded

    @property
    def tokenizer(self) -> ModelTokenizer:
        return ModelTokenizer(self._loaded().tokenizer)

    @property
    def name(self) -> str:
        return self._loaded().name

    @property
    def path(self) -> Path:
        return self._loaded().path

    @property
    def device(self) -> str:
        return str(self._loaded().device)

    @property
    def dtype(self) -> str:
        return str(self._loaded().dtype).removeprefix("torch.")

    @property
    def context_length(self) -> int:
        """The most tokens a conversation (prompt and answer) may hold."""
        if self._session is not None:
            return self._session.context_length
        from mistral_chat.engine.memory import session_context

        return session_context(self._loaded().config, self.options.context_length)

    @property
    def tensor_parallel(self) -> int:
        return self.options.tp

    def __repr__(self) -> str:
        if self.loaded is None:
            return "Model(closed)"
        return f"Model({self.name!r}, device={self.device!r}, dtype={self.dtype!r})"

    # ---- one conversation -----------------------------------------------------------------------------------------

    @property
    def session(self) -> "Session":
        """The batch-1 session chats run on (made at first use): its cache, `tokens`, last `stats`."""
        if self._session is None:
            from mistral_chat.engine.generate import Session

            self._session = Session(self._loaded(), context_length=self.options.context_length)
        return self._session

    def prompt(self, messages: Iterable[Message], tools: Iterable[ToolSpec] | None = None,
               max_tokens: int | None = None) -> tuple[TrimmedPrompt, tuple[Tool, ...]]:
        """The prompt ids a conversation becomes (oldest turns left out to leave room for `max_tokens` of
        answer, as the chat does), and the tools it offers (none where the tokenizer has no function calling)."""
        chat = to_chat_messages(messages)
        offered = self._usable_tools(chat, to_tools(tools))
        tokenizer = self._loaded().tokenizer
        context = self.context_length
        budget = context - answer_reserve(context, max_tokens or SamplingParams().max_tokens)
        try:
            trimmed = trim_history(chat, lambda ms: encode_conversation(tokenizer, ms, list(offered) or None),
                                   budget)
        except ValueError as exc:  # a conversation the instruct format cannot end with
            raise MessageError(str(exc)) from exc
        return trimmed, offered

    def _usable_tools(self, messages: Sequence[ChatMessage], tools: tuple[Tool, ...]) -> tuple[Tool, ...]:
        """As the chat worker does: tools go unused with a tokenizer that has no function calling, and a
        conversation that holds calls or results then cannot be answered."""
        if not tools or self.tokenizer.supports_tools:
            return tools
        if any(m.role == "tool" or m.tool_calls for m in messages):
            raise MistralChatError("this conversation holds tool calls, but the model's tokenizer has no function "
                                   "calling: pick a model made for tools (e.g. Mistral-7B-Instruct-v0.3 or later)")
        log.warning("%s has no function calling: answering without the tools", self.name)
        return ()

    def chat(self, messages: Iterable[Message], tools: Iterable[ToolSpec] | None = None, *,
             max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, seed: int | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, presence_penalty: float | None = None,
             stop: str | Sequence[str] | None = None, speculate: int | None = None,
             params: SamplingParams | None = None) -> Reply:
        """The answer to a conversation. Sampling keywords left None keep `params`' values (default greedy, 1024
        tokens at most); `tools` are OpenAI function definitions the model may call (see `Reply.tool_calls`)."""
        for _ in self.stream(messages, tools, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed, min_p=min_p, repetition_penalty=repetition_penalty,
                             presence_penalty=presence_penalty, stop=stop, speculate=speculate, params=params):
            pass
        assert self.last_reply is not None
        return self.last_reply

    def stream(self, messages: Iterable[Message], tools: Iterable[ToolSpec] | None = None, *,
               max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, seed: int | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, presence_penalty: float | None = None,
               stop: str | Sequence[str] | None = None, speculate: int | None = None,
               params: SamplingParams | None = None, cancel: threading.Event | None = None) -> Iterator[str]:
        """The answer's text as it is generated (keywords as `chat`); `last_reply` holds the whole Reply once the
        iterator ends. With tools, a tool call streams as its raw text; `last_reply.tool_calls` has it read.
        Setting `cancel` ends the answer at its next token (finish reason "cancelled")."""
        sampling = sampling_params(params, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, seed=seed, min_p=min_p, repetition_penalty=repetition_penalty,
                                   presence_penalty=presence_penalty, stop=stop, speculate=speculate)
        prompt, offered = self.prompt(messages, tools, sampling.max_tokens)
        return self.stream_ids(prompt.ids, sampling, tools=offered, cancel=cancel,
                               dropped_messages=prompt.dropped_messages)

    def stream_ids(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                   tools: Sequence[Tool] = (), cancel: threading.Event | None = None,
                   dropped_messages: int = 0) -> Iterator[str]:
        """As `stream`, for prompt ids already built (`prompt`, `tokenizer.encode_fim`, raw text's `encode`):
        answered as they are, untrimmed; `tools`: those the prompt offers, to read the answer's calls by."""
        session = self.session
        self.last_reply = None
        pieces: list[str] = []
        for piece in session.generate(prompt_ids, params or SamplingParams(), cancel):
            pieces.append(piece)
            yield piece
        self.last_reply = make_reply(self._loaded().tokenizer, "".join(pieces),
                                     getattr(session, "generated_ids", None), session.stats, tuple(tools),
                                     dropped_messages)

    # ---- many conversations ----------------------------------------------------------------------------------

    def chat_batch(self, conversations: Iterable[Iterable[Message]], tools: Iterable[ToolSpec] | None = None, *,
                   batch_size: int | None = None, max_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                   min_p: float | None = None, repetition_penalty: float | None = None,
                   presence_penalty: float | None = None, stop: str | Sequence[str] | None = None,
                   speculate: int | None = None, params: SamplingParams | None = None) -> list[Reply]:
        """The answers to many conversations, generated together (continuous batching), in their order.

        The same sampling for all (keywords as `chat`; with a seed, each answer's draws are seeded alike);
        `batch_size`: sequences in flight (default: as many as memory allows, at most 64). Every conversation is
        checked before any is answered: the first bad one raises."""
        sampling = sampling_params(params, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, seed=seed, min_p=min_p, repetition_penalty=repetition_penalty,
                                   presence_penalty=presence_penalty, stop=stop, speculate=speculate)
        tool_list = list(to_tools(tools))
        requests = [ChatRequest(list(messages), tool_list, sampling) for messages in conversations]
        prompts = [self.prompt(r.messages, r.tools, sampling.max_tokens) for r in requests]
        replies: list[Reply | None] = [None] * len(requests)
        for index, outcome in self._answer(prompts, [sampling] * len(prompts), batch_size):
            if isinstance(outcome, MistralChatError):
                raise outcome
            replies[index] = outcome
        return [r for r in replies if r is not None]

    def chat_requests(self, requests: Iterable[ChatRequest], batch_size: int | None = None
                      ) -> Iterator[tuple[int, Reply | MistralChatError]]:
        """Answer `requests` together (continuous batching): (index in `requests`, its Reply) as each finishes,
        in any order; a request that cannot be answered (bad messages, a prompt longer than the context) gives
        its error instead, and the others go on."""
        prompts: list[tuple[TrimmedPrompt, tuple[Tool, ...]] | MistralChatError] = []
        params: list[SamplingParams] = []
        for request in requests:
            try:
                prompts.append(self.prompt(request.messages, request.tools, request.params.max_tokens))
            except MistralChatError as exc:
                prompts.append(exc)
            params.append(request.params)
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, MistralChatError):
                yield index, prompt
        yield from self._answer(prompts, params, batch_size)

    def batch_generator(self, batch_size: int, context_length: int | None = None) -> "BatchGenerator":
        """A continuous-batching generator of `batch_size` rows on this model (`engine/batch.py`); under tensor
        parallelism one whose every model call the other ranks repeat (`engine/parallel/batch.py`)."""
        loaded = self._loaded()
        if self.options.tp > 1:
            from mistral_chat.engine.parallel.batch import ParallelBatchGenerator

            session: Any = self.session  # a tensor-parallel run's ParallelSession
            return ParallelBatchGenerator(session, batch_size, context_length=context_length)
        from mistral_chat.engine.batch import BatchGenerator

        return BatchGenerator(loaded, batch_size, context_length=context_length)

    def _answer(self, prompts: Sequence[tuple[TrimmedPrompt, tuple[Tool, ...]] | MistralChatError],
                params: Sequence[SamplingParams], batch_size: int | None
                ) -> Iterator[tuple[int, Reply | MistralChatError]]:
        """Replies to the prompts that are not errors, as they finish."""
        todo = [i for i, p in enumerate(prompts) if not isinstance(p, MistralChatError)]
        if not todo:
            return
        loaded = self._loaded()
        from mistral_chat.engine.batch import BatchRequest, batch_size_for_memory

        context = self.context_length
        need = max(len(prompts[i][0].ids) + params[i].max_tokens + 1 for i in todo)  # type: ignore[index]
        context = min(context, need)
        size = batch_size or batch_size_for_memory(loaded, context)
        size = max(1, min(size, len(todo)))
        generator = self.batch_generator(size, context)
        batch = [BatchRequest(prompts[i][0].ids, params[i]) for i in todo]  # type: ignore[index]
        for event in generator.generate(batch):
            if not event.done:
                continue
            index = todo[event.index]
            prompt, tools = prompts[index]  # type: ignore[misc]
            if event.error:
                from mistral_chat.errors import ContextLengthError

                yield index, ContextLengthError(event.error)
                continue
            assert event.stats is not None
            yield index, make_reply(loaded.tokenizer, event.answer, event.generated_ids, event.stats, tools,
                                    prompt.dropped_messages)

    # ---- freeing -------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the model's memory (and end its tensor-parallel processes). Safe to call twice."""
        close = getattr(self._session, "close", None)  # a tensor-parallel session ends its follower processes
        if close is not None:
            close()
        self._session = self.loaded = None
        release_memory()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
