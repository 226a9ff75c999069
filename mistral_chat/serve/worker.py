"""The server's engine thread: the one thread that touches the model (the engine is not thread-safe).

Requests arrive on a queue from the HTTP handlers (any thread, any event loop). The thread builds each one's
prompt (`Model.prompt`: the chat's instruct format, trimmed to the context), then answers them with continuous
batching (`engine/batch.py`'s `BatchGenerator`): a request takes a free row as soon as one frees, every step
decodes one token for all rows in flight, and each piece of text goes back to its handler's event loop as it is
made. A request whose client went away (`Job.cancel`) ends at its next token and frees its row; one still waiting
for a row is dropped. Under tensor parallelism (`tp > 1`) the same, every rank running each step on its shard.

Each job's events, in order: ("accepted", None) once its prompt is built, then ("text", piece)..., then
("done", Reply); or ("error", MistralChatError) at any point instead of what is left.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from mistral_chat.engine.options import SamplingParams
from mistral_chat.errors import ContextLengthError, DeviceError, MistralChatError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request to answer: messages (a chat) or raw prompt text (a completion), and where its events go."""

    params: SamplingParams
    messages: Sequence[Any] | None = None  # OpenAI-style messages, already checked
    tools: Sequence[Any] | None = None
    text: str | None = None  # a completion's prompt, continued as it is (no instruct format)
    cancel: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    events: "asyncio.Queue[tuple[str, Any]] | None" = None
    # set by the engine thread
    prompt_ids: list[int] = field(default_factory=list)
    offered: tuple[Any, ...] = ()
    dropped: int = 0

    def bind(self) -> "Job":
        """Deliver this job's events to the running event loop (call from a handler)."""
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()
        return self

    def post(self, kind: str, value: Any = None) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()


_STOP = object()


class EngineWorker:
    """The engine thread of one Model-like object (`Model` from `mistral_chat.api`)."""

    def __init__(self, model: Any, batch_size: int | None = None) -> None:
        self.model = model
        self.batch_size = batch_size
        self._inbox: "queue.Queue[Any]" = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # the batch's request index -> its job
        self._ids = itertools.count()
        self._generator: Any = None
        self._stopping = False
        self.cancelled = 0  # requests ended because their client went away
        self.most_together = 0  # the most requests decoded in one step so far

    # ---- from any thread ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mistral-chat-engine", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping:
            job.post("error", MistralChatError("the server is shutting down"))
            return
        self._inbox.put(job)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the requests already taken (drain), then end the thread."""
        self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._pending)

    # ---- the engine thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not self._pending and not self._running
            if not self._take(block=idle):
                break
            try:
                self._batch_step()
            except Exception as exc:  # noqa: BLE001 - one failing step must not end the server
                if not isinstance(exc, MistralChatError):
                    log.exception("the engine failed")
                error = exc if isinstance(exc, MistralChatError) else MistralChatError(f"the engine failed: {exc}")
                for job in self._running.values():
                    job.post("error", error)
                self._running.clear()
                if self._generator is not None:
                    self._generator.clear()
        for job in self._pending:
            job.post("error", MistralChatError("the server is shutting down"))

    def _take(self, block: bool) -> bool:
        """Move new jobs from the inbox to the pending queue, their prompts built; False once stopped and
        drained."""
        while True:
            if self._stopping and not self._pending and not self._running:
                return False
            try:
                item = self._inbox.get(block=block and not self._stopping, timeout=0.5 if block else None)
            except queue.Empty:
                if block and not self._stopping:
                    continue
                return True
            if item is _STOP:
                self._stopping = True
                continue
            self._accept(item)
            block = False  # take what else is there, without waiting

    def _accept(self, job: Job) -> None:
        if job.cancel.is_set():
            return
        model = self.model
        try:
            if job.messages is not None:
                prompt, job.offered = model.prompt(job.messages, job.tools, job.params.max_tokens)
                job.prompt_ids, job.dropped = list(prompt.ids), prompt.dropped_messages
            else:
                job.prompt_ids = model.tokenizer.encode(job.text or "", bos=True)
            context = model.context_length
            if len(job.prompt_ids) >= context:
                raise ContextLengthError(f"the prompt is {len(job.prompt_ids)} tokens but the context holds "
                                         f"{context}: shorten it")
        except (MistralChatError, ValueError) as exc:
            job.post("error", exc if isinstance(exc, MistralChatError) else MistralChatError(str(exc)))
            return
        self._pending.append(job)  # counted in flight before the client hears it was accepted
        job.post("accepted")

    def _batch_step(self) -> None:
        """Admit pending jobs into free rows, then decode one token for every row in flight."""
        from mistral_chat.engine.batch import BatchRequest, batch_size_for_memory
        from mistral_chat.engine.loader import is_out_of_memory

        loaded = self.model.loaded
        if self._generator is None:
            context = self.model.context_length
            size = self.batch_size or batch_size_for_memory(loaded, context)
            self._generator = self.model.batch_generator(size, context)
            log.info("serving up to %d requests at a time, %d tokens each", size, context)
        generator = self._generator
        # BatchGenerator.generate takes a fixed iterable; a server's requests arrive while others are in flight,
        # so it admits and steps itself
        generator.claim_cache()
        try:
            admitted: list[tuple[int, BatchRequest]] = []
            while self._pending and len(admitted) < generator.free_rows:  # prefilled together
                job = self._pending.popleft()
                if job.cancel.is_set():
                    self.cancelled += 1
                    continue
                index = next(self._ids)
                self._running[index] = job
                admitted.append((index, BatchRequest(job.prompt_ids, job.params, cancel=job.cancel)))
            if admitted:
                self._deliver(generator.admit(admitted))
            together = generator.active
            self.most_together = max(self.most_together, together)
            if together:
                self._deliver(generator.step())
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise DeviceError(f"out of memory on {loaded.device} while generating: lower --batch-size or "
                              "--context") from exc

    def _deliver(self, events: Any) -> None:
        from mistral_chat.api import make_reply

        tokenizer = self.model.loaded.tokenizer
        for event in events:
            job = self._running.get(event.index)
            if job is None:
                continue
            if event.text:
                job.post("text", event.text)
            if not event.done:
                continue
            del self._running[event.index]
            if event.error:
                job.post("error", ContextLengthError(event.error))
            elif event.stats is not None and event.stats.finish_reason == "cancelled":
                self.cancelled += 1
            else:
                job.post("done", make_reply(tokenizer, event.answer, event.generated_ids, event.stats,
                                            job.offered, job.dropped))
