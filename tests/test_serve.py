"""`mistral-chat serve`: the OpenAI-compatible server (serve/app.py, serve/worker.py) on a tiny random checkpoint,
float32 on the CPU, run by uvicorn on 127.0.0.1 and driven by the official `openai` client."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from mistral_chat import Model  # noqa: E402
from mistral_chat.serve.app import create_app  # noqa: E402
from tiny_models import write_tiny_model  # noqa: E402

KEY = "test-key-123"
HI = [{"role": "user", "content": "Hi there"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread, on 127.0.0.1."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


class Raw:
    """A plain HTTP answer (http.client: no client library between the test and the wire)."""

    def __init__(self, response: http.client.HTTPResponse, connection: http.client.HTTPConnection) -> None:
        self.response, self.connection = response, connection
        self.status_code = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}

    def json(self):
        return json.loads(self.response.read())

    def iter_lines(self):
        while True:
            line = self.response.readline()
            if not line:
                return
            yield line.decode().rstrip("\r\n")


def raw(server, method: str, path: str, body=None, content: bytes | None = None, key: str | None = KEY) -> Raw:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = content if content is not None else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=headers)
    return Raw(connection.getresponse(), connection)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tiny = write_tiny_model(tmp_path_factory.mktemp("serve"), "mistral")["native"]
    with Model.load(tiny, device="cpu", dtype="float32", context=256) as m:
        yield m


@pytest.fixture(scope="module")
def server(model):
    running = Running(create_app(model, api_key=KEY, batch_size=4))
    yield running
    running.stop()


def greedy(model, server, messages, max_tokens):
    """Model.chat's greedy text, computed while the server is idle (the engine is not thread-safe)."""
    worker = server.server.config.app.state.worker
    deadline = time.monotonic() + 30
    while worker.in_flight:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return model.chat(messages, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_completion_equals_model_chat(model, server, client):
    reply = greedy(model, server, HI, 12)
    response = client.chat.completions.create(model="anything", messages=HI, max_tokens=12)
    choice = response.choices[0]
    assert choice.message.content == reply.text and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == reply.usage.prompt_tokens
    assert response.usage.completion_tokens == 12 and response.usage.total_tokens == response.usage.prompt_tokens + 12
    assert response.model == model.name and response.object == "chat.completion"


def test_streamed_chat_completion_equals_model_chat(model, server, client):
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "A long story please"}]
    reply = greedy(model, server, messages, 16)
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for p in pieces if p) > 1
    assert "".join(pieces) == reply.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 16


def test_sse_wire_format_ends_with_done(server):
    response = raw(server, "POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 4, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_completions_continue_the_raw_prompt(model, server, client):
    response = client.completions.create(model="x", prompt="Once upon a time", max_tokens=8)
    assert response.object == "text_completion" and response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 8
    ids = model.tokenizer.encode("Once upon a time", bos=True)
    assert response.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="x", prompt="Once upon a time",
                                                                           max_tokens=8, stream=True) if c.choices)
    assert streamed == response.choices[0].text
    two = client.completions.create(model="x", prompt=["Once upon a time", "abc"], max_tokens=8)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == response.choices[0].text


def test_models_list(model, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [model.name]


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 4}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": HI, "temperature": "hot"}, "temperature"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "stop": 3}, "stop"),
    ({"messages": HI, "n": 2}, "n"),
    ({"messages": HI, "stream": "yes"}, "stream"),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, body, param):
    response = raw(server, "POST", "/v1/chat/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="x", messages=HI, temperature="hot")
    assert "temperature" in str(caught.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="x", prompt=[1, 2, 3])


def test_not_json_and_unknown_routes(server):
    response = raw(server, "POST", "/v1/chat/completions", content=b"{nope")
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = raw(server, "GET", "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    response = raw(server, "GET", "/v1/models", key=None)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_concurrent_clients_are_answered_together(model, server, client):
    conversations = [[{"role": "user", "content": f"Question number {i}" + " more" * i}] for i in range(6)]
    wanted = [greedy(model, server, c, 10).text for c in conversations]

    def ask(i: int) -> str:
        if i % 2:
            stream = client.chat.completions.create(model="x", messages=conversations[i], max_tokens=10, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client.chat.completions.create(model="x", messages=conversations[i], max_tokens=10
                                              ).choices[0].message.content

    worker = server.server.config.app.state.worker
    worker.most_together = 0
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, range(6)))
    assert got == wanted
    assert worker.most_together > 1  # decoded in the same steps, not one after the other


def test_a_client_that_disconnects_frees_its_row(model, server, client, monkeypatch):
    from mistral_chat.engine.batch import BatchGenerator

    run_step = BatchGenerator._run_step

    def slowly(self, active):  # 200 tokens take >= 4 s: on a loaded machine the answer could end before the client
        time.sleep(0.02)  # had read its first lines (it did: in_flight was 0)
        return run_step(self, active)

    monkeypatch.setattr(BatchGenerator, "_run_step", slowly)
    worker = server.server.config.app.state.worker
    cancelled = worker.cancelled
    response = raw(server, "POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 200, "stream": True})
    lines = response.iter_lines()
    while not next(lines).startswith("data: {"):
        pass
    next(lines)
    assert worker.in_flight == 1
    response.connection.sock.shutdown(socket.SHUT_RDWR)
    response.connection.close()
    deadline = time.monotonic() + 20
    while worker.in_flight:
        assert time.monotonic() < deadline, "the cancelled request still holds its row"
        time.sleep(0.02)
    assert worker.cancelled == cancelled + 1
    reply = client.chat.completions.create(model="x", messages=HI, max_tokens=5)
    assert reply.choices[0].message.content == greedy(model, server, HI, 5).text


def test_serve_command_without_the_extra_says_what_to_install(monkeypatch):
    import builtins

    from typer.testing import CliRunner
    import typer

    from mistral_chat.cli.serve import register

    real = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    app = typer.Typer()
    register(app)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["serve", "-m", "nowhere"])
    assert result.exit_code != 0
    assert "mistral-chat[serve]" in str(result.exception)


def test_serve_help_lists_the_options():
    from mistral_chat.cli.main import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["serve", "--help"])
    assert status == 0
    text = out.getvalue()
    for option in ("--host", "--port", "--api-key", "--batch-size", "--model", "--temperature", "--device"):
        assert option in text


@pytest.mark.slow
def test_the_command_serves_and_ctrl_c_drains(tmp_path):
    import signal
    import subprocess
    import sys

    tiny = write_tiny_model(tmp_path, "mistral")["native"]
    port = free_port()
    code = "import sys; from mistral_chat.cli.main import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "-m", str(tiny), "--device", "cpu", "--dtype",
                             "float32", "--context", "256", "--port", str(port), "--api-key", KEY],
                            stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        stream = client.chat.completions.create(model="x", messages=HI, max_tokens=150, stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        proc.send_signal(signal.SIGINT)  # drains: the answer in flight still ends
        rest = list(stream)
        assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
        assert proc.wait(30) in (0, 130)  # 130: Ctrl-C, as every command (newer uvicorn re-raises it)
        err = proc.stderr.read()
        assert f"http://127.0.0.1:{port}/v1" in err and ("stopped" in err or "interrupted" in err)
    finally:
        if proc.poll() is None:
            proc.kill()
