"""The OpenAI-compatible HTTP API as an ASGI app (starlette): `create_app(model)`.

    POST /v1/chat/completions   messages -> the assistant's answer (whole, or streamed as server-sent events)
    POST /v1/completions        prompt -> its continuation (raw text, no instruct format)
    GET  /v1/models             the one model served

Every request goes to one engine thread (`serve/worker.py`), which answers many together (continuous batching).
A bad request gets OpenAI's error shape, {"error": {"message", "type": "invalid_request_error", "param", "code"}},
with status 400 and `param` naming the field; with an API key, a request without `Authorization: Bearer KEY`
gets 401. A client that disconnects ends its answer (its row is freed at the next token).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mistral_chat.api import MessageError, Reply, sampling_params, to_chat_messages, to_tools
from mistral_chat.engine.options import SamplingParams
from mistral_chat.errors import ContextLengthError, MistralChatError
from mistral_chat.serve.worker import EngineWorker, Job

FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}
DISCONNECT_POLL_S = 0.5


class RequestError(Exception):
    """A request that cannot be answered as sent: 400 (or `status`) naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def response(self) -> JSONResponse:
        return error_response(self.message, self.param, self.status, self.kind, self.code)


def error_response(message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


# ---- reading a request ------------------------------------------------------------------------------------------


def _number(body: Mapping[str, Any], name: str, integer: bool = False, low: float | None = None,
            high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(f"'{name}' must be {kind}, got {json.dumps(value)}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"'{name}' must be {bounds}, got {value}", name)
    return value


def read_sampling(body: Mapping[str, Any], defaults: SamplingParams) -> SamplingParams:
    """The request's sampling fields over the server's defaults; RequestError names a bad one."""
    max_tokens = _number(body, "max_completion_tokens", True, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", True, 1)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or
                                 (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    n = _number(body, "n", True, 1)
    if n not in (None, 1):
        raise RequestError("only n=1 is supported", "n")
    frequency = _number(body, "frequency_penalty", False, -2, 2)
    if frequency:
        raise RequestError("'frequency_penalty' is not supported: use presence_penalty or repetition_penalty",
                           "frequency_penalty")
    if body.get("logprobs") not in (None, False):
        raise RequestError("'logprobs' is not supported", "logprobs")
    values = dict(max_tokens=max_tokens, temperature=_number(body, "temperature", low=0),
                  top_p=_number(body, "top_p", low=0, high=1), top_k=_number(body, "top_k", True, 0),
                  seed=_number(body, "seed", True, 0, 2**64 - 1), min_p=_number(body, "min_p", low=0, high=0.99),
                  repetition_penalty=_number(body, "repetition_penalty", low=0.01),
                  presence_penalty=_number(body, "presence_penalty", low=-2, high=2), stop=stop)
    try:
        return sampling_params(defaults, **values)
    except ValueError as exc:  # e.g. top_p 0
        field = next((name for name in values if name.replace("_", " ") in str(exc).replace("-", " ")), None)
        raise RequestError(str(exc), field) from None


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise RequestError("'stream_options' must be an object", "stream_options")
    return bool(stream), bool(options.get("include_usage"))


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, RecursionError):
        raise RequestError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    return body


def read_chat(body: Mapping[str, Any], defaults: SamplingParams) -> Job:
    messages = body.get("messages")
    if messages is None:
        raise RequestError("'messages' is required: a list of {\"role\", \"content\"} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    try:
        to_chat_messages(messages)
    except MessageError as exc:
        raise RequestError(str(exc), "messages") from None
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise RequestError("'tools' must be a list of function definitions", "tools")
        try:
            to_tools(tools)
        except (MistralChatError, ValueError, TypeError, KeyError) as exc:
            raise RequestError(f"'tools': {exc}", "tools") from None
    choice = body.get("tool_choice")
    if choice is not None and not (choice in ("auto", "none", "required") or isinstance(choice, Mapping)):
        raise RequestError("'tool_choice' must be \"auto\", \"none\", \"required\" or a function", "tool_choice")
    if choice == "none":
        tools = None
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, Mapping)
                                        or response_format.get("type", "text") != "text"):
        raise RequestError("only the \"text\" response format is supported", "response_format")
    return Job(read_sampling(body, defaults), messages=messages, tools=tools or None)


def read_completion(body: Mapping[str, Any], defaults: SamplingParams) -> list[Job]:
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("'prompt' is required: a string or a list of strings", "prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompt' must be a string or a non-empty list of strings (token ids are not "
                           "supported)", "prompt")
    if any(not p for p in prompts):
        raise RequestError("'prompt' is empty: give some text to continue", "prompt")
    for name in ("suffix", "echo", "best_of"):
        if body.get(name) not in (None, False, 1):
            raise RequestError(f"'{name}' is not supported", name)
    params = read_sampling(body, defaults)
    return [Job(params, text=p) for p in prompts]


# ---- answering --------------------------------------------------------------------------------------------------


def _usage(reply: Reply) -> dict[str, int]:
    prompt, generated = reply.usage.prompt_tokens, reply.usage.generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _message(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text if reply.text or not reply.tool_calls
                               else None}
    if reply.tool_calls:
        message["tool_calls"] = [call.to_json() for call in reply.tool_calls]
    return message


def _error_event(exc: BaseException) -> dict[str, Any]:
    """A streamed answer's last event when the engine failed: OpenAI's error object."""
    failure = _failure(exc)
    return {"error": {"message": failure.message, "type": failure.kind, "param": failure.param, "code": None}}


def _failure(error: BaseException) -> RequestError:
    if isinstance(error, RequestError):
        return error
    if isinstance(error, (MessageError, ValueError, ContextLengthError)):
        return RequestError(str(error), "messages")
    return RequestError(str(error), None, 500, "server_error")


class _Server:
    def __init__(self, model: Any, worker: EngineWorker, defaults: SamplingParams, api_key: str | None) -> None:
        self.model, self.worker, self.defaults, self.api_key = model, worker, defaults, api_key
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return str(getattr(self.model, "name", "mistral-chat"))

    async def _submit(self, job: Job) -> Job:
        """Hand the job to the engine and wait until its prompt is built (RequestError if it cannot be)."""
        job.bind()
        self.worker.submit(job)
        assert job.events is not None
        kind, value = await job.events.get()
        if kind == "error":
            raise _failure(value)
        return job

    async def _result(self, request: Request, job: Job) -> tuple[str, Reply]:
        """The job's whole reply; cancels it if the client goes away first."""
        assert job.events is not None
        text: list[str] = []
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel.set()
                        raise asyncio.CancelledError from None
                    continue
                if kind == "text":
                    text.append(value)
                elif kind == "done":
                    return "".join(text), value
                elif kind == "error":
                    raise _failure(value)
        except BaseException:
            job.cancel.set()
            raise

    async def chat(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            stream, include_usage = _stream_flags(body)
            job = await self._submit(read_chat(body, self.defaults))
        except RequestError as exc:
            return exc.response()
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if stream:
            return _sse(job, self._chat_chunks(job, ident, created, include_usage))
        try:
            _, reply = await self._result(request, job)
        except RequestError as exc:
            return exc.response()
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": self.name,
                             "system_fingerprint": None,
                             "choices": [{"index": 0, "message": _message(reply), "logprobs": None,
                                          "finish_reason": FINISH.get(reply.finish_reason, "stop")}],
                             "usage": _usage(reply)})

    async def _chat_chunks(self, job: Job, ident: str, created: int, include_usage: bool
                           ) -> AsyncIterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        assert job.events is not None
        held = bool(job.offered)  # with tools, the text may turn out to be a tool call: sent whole at the end
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text" and not held:
                yield chunk({"content": value})
            elif kind == "done":
                reply: Reply = value
                if held:
                    message = _message(reply)
                    delta: dict[str, Any] = {}
                    if message["content"]:
                        delta["content"] = message["content"]
                    if reply.tool_calls:
                        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                    if delta:
                        yield chunk(delta)
                yield chunk({}, FINISH.get(reply.finish_reason, "stop"))
                if include_usage:
                    yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.name,
                           "choices": [], "usage": _usage(reply)}
                return
            elif kind == "error":
                yield _error_event(value)
                return

    async def completions(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            stream, include_usage = _stream_flags(body)
            jobs = read_completion(body, self.defaults)
            if stream and len(jobs) > 1:
                raise RequestError("streaming takes one prompt", "prompt")
            jobs = [await self._submit(job) for job in jobs]
        except RequestError as exc:
            return exc.response()
        ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if stream:
            return _sse(jobs[0], self._completion_chunks(jobs[0], ident, created, include_usage))
        try:
            results = await asyncio.gather(*(self._result(request, job) for job in jobs))
        except RequestError as exc:
            for job in jobs:
                job.cancel.set()
            return exc.response()
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for _, reply in results:
            for key, value in _usage(reply).items():
                usage[key] += value
        return JSONResponse({"id": ident, "object": "text_completion", "created": created, "model": self.name,
                             "system_fingerprint": None,
                             "choices": [{"index": i, "text": text, "logprobs": None,
                                          "finish_reason": FINISH.get(reply.finish_reason, "stop")}
                                         for i, (text, reply) in enumerate(results)],
                             "usage": usage})

    async def _completion_chunks(self, job: Job, ident: str, created: int, include_usage: bool
                                 ) -> AsyncIterator[dict[str, Any]]:
        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            return {"id": ident, "object": "text_completion", "created": created, "model": self.name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        assert job.events is not None
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield chunk(value)
            elif kind == "done":
                yield chunk("", FINISH.get(value.finish_reason, "stop"))
                if include_usage:
                    yield {"id": ident, "object": "text_completion", "created": created, "model": self.name,
                           "choices": [], "usage": _usage(value)}
                return
            elif kind == "error":
                yield _error_event(value)
                return

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model",
                                                         "created": self.created, "owned_by": "mistral-chat"}]})


def _sse(job: Job, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`. A client that disconnects cancels this
    body, and so the job: the engine frees its row at the next token."""

    async def body() -> AsyncIterator[str]:
        try:
            async for item in chunks:
                yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(model: Any, *, api_key: str | None = None, defaults: SamplingParams | None = None,
               batch_size: int | None = None, worker: EngineWorker | None = None) -> Starlette:
    """The ASGI app serving `model` (a `mistral_chat.Model`). Its engine thread starts with the app (lifespan)
    and, at shutdown, finishes the requests it holds before it ends; the model itself stays the caller's."""
    from contextlib import asynccontextmanager

    engine = worker or EngineWorker(model, batch_size)
    server = _Server(model, engine, defaults or SamplingParams(), api_key)

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if api_key is not None:
                given = request.headers.get("authorization", "")
                scheme, _, token = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                    return error_response("missing or wrong API key: send 'Authorization: Bearer KEY'", None, 401,
                                          "invalid_request_error", "invalid_api_key")
            return await handler(request)
        return endpoint

    async def chat(request: Request) -> Response:
        return await server.chat(request)

    async def completions(request: Request) -> Response:
        return await server.completions(request)

    async def models(request: Request) -> Response:
        return await server.models(request)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return error_response(str(getattr(exc, "detail", exc)), None, status,
                              "invalid_request_error" if status < 500 else "server_error")

    app = Starlette(exception_handlers={HTTPException: http_error},
                    routes=[Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
                            Route("/v1/completions", guarded(completions), methods=["POST"]),
                            Route("/v1/models", guarded(models), methods=["GET"])],
                    lifespan=lifespan)
    app.state.worker = engine
    return app
