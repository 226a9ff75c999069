"""Continuous batching (engine/batch.py, Transformer.forward_rows) and `mistral-chat batch` (cli/batch.py).

Greedy answers generated together equal the same requests answered one at a time by `Session` (float32, CPU, tiny
random checkpoints): prompts of different lengths, more requests than rows (rows reused), a sliding window shorter
than the sequences (the rotating cache wraps), prompts prefilled in several chunks, and Mixtral.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from mistral_chat.engine.batch import BatchGenerator, BatchRequest, batch_size_for_memory
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.generate import Session
from mistral_chat.engine.loader import LoadedModel, load_model
from mistral_chat.engine.options import SamplingParams
from tiny_models import random_model, write_tiny_model

GREEDY = SamplingParams(max_tokens=24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batch")
    return {kind: write_tiny_model(root / kind, kind)["native"] for kind in ("mistral", "mixtral")}


@pytest.fixture(scope="module")
def mistral(tiny) -> LoadedModel:
    return load_model(tiny["mistral"], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def mixtral(tiny) -> LoadedModel:
    return load_model(tiny["mixtral"], device="cpu", dtype="float32")


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 1000) for _ in range(n - 1)] for n in lengths]


def one_at_a_time(loaded: LoadedModel, requests: list[BatchRequest],
                  **session_args) -> list[tuple[list[int], str, str]]:
    session = Session(loaded, **session_args)
    out = []
    for request in requests:
        text = "".join(session.generate(request.prompt_ids, request.params))
        out.append((list(session.generated_ids), text, session.stats.finish_reason))
        session.reset()
    return out


def together(loaded: LoadedModel, requests: list[BatchRequest], batch_size: int,
             **generator_args) -> list[tuple[list[int], str, str]]:
    generator = BatchGenerator(loaded, batch_size, **generator_args)
    done: dict[int, tuple[list[int], str, str]] = {}
    streamed: dict[int, str] = {}
    for event in generator.generate(requests):
        streamed[event.index] = streamed.get(event.index, "") + event.text
        if event.done:
            assert event.index not in done
            assert event.stats is not None
            done[event.index] = (list(event.generated_ids), event.answer, event.stats.finish_reason)
            assert streamed[event.index] == event.answer
    return [done[i] for i in range(len(requests))]


def test_rows_forward_equals_the_batch_one_forward():
    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                         sliding_window=8, max_seq_len=64)
    model = random_model(config)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 8, 30, 11, 2, 40, 41]])
    model.setup_cache(64, prefill_chunk=4)
    expected = [model(ids[:, :4], 0)[:, -1]]
    for pos in range(4, 12):
        expected.append(model(ids[:, pos:pos + 1], pos)[:, -1])
    model.setup_row_cache(64, batch=3, prefill_chunk=4)
    row = slice(1, 2)
    got = [model.forward_rows(ids[:, :4], torch.tensor([0]), row, 4)]
    for pos in range(4, 12):
        got.append(model.forward_rows(ids[:, pos:pos + 1], torch.tensor([pos]), row,
                                      min(model.row_positions.capacity, pos + 1)))
    torch.testing.assert_close(torch.cat(got), torch.cat(expected), rtol=1e-4, atol=1e-4)


def test_rows_admitted_together_are_prefilled_together(mistral, monkeypatch):
    """Requests admitted at once prefill in one call where their rows are consecutive and their chunks of one
    length (at most prefill_chunk tokens a call); prompts of several chunks too, with a window shorter than them
    (16): the same greedy answers as one at a time."""
    lengths = [12, 12, 12, 20, 40, 40, 7, 12, 12]
    requests = [BatchRequest(p, SamplingParams(max_tokens=n))
                for p, n in zip(prompts(lengths, seed=4), [6, 9, 4, 8, 5, 7, 3, 10, 2])]
    expected = one_at_a_time(mistral, requests, context_length=128, prefill_chunk=32)
    generator = BatchGenerator(mistral, 4, context_length=128, prefill_chunk=32)
    calls: list[tuple[int, int]] = []
    forward_rows = generator._forward_rows

    def spy(tokens, starts, rows, key_len):
        assert rows.stop - rows.start == len(tokens) and len(set(map(len, tokens))) == 1
        calls.append((len(tokens), len(tokens[0])))
        return forward_rows(tokens, starts, rows, key_len)

    monkeypatch.setattr(generator, "_forward_rows", spy)
    done = {e.index: e for e in generator.generate(requests) if e.done}
    assert [(list(done[i].generated_ids), done[i].answer, done[i].stats.finish_reason)
            for i in range(len(requests))] == expected
    assert calls[0] == (2, 12)  # the first wave: rows 0-1 (12 + 12 tokens), then row 2 alone (a third is > 32)
    assert all(n * t <= 32 for n, t in calls if t > 1)


def test_a_call_of_rows_may_hold_more_tokens_than_a_row_caches(mistral, monkeypatch):
    """A row's cache of 40 positions caps the tokens written into one row a call, not the call: four 12-token
    prompts (48 tokens, within the 64-token prefill chunk) go in one call, with the answers of one at a time."""
    requests = [BatchRequest(p, SamplingParams(max_tokens=4)) for p in prompts([12, 12, 12, 12], seed=5)]
    expected = one_at_a_time(mistral, requests, context_length=40, prefill_chunk=64)
    generator = BatchGenerator(mistral, 4, context_length=40, prefill_chunk=64)
    assert generator.prefill_chunk == 40
    calls: list[int] = []
    forward_rows = generator._forward_rows

    def spy(tokens, starts, rows, key_len):
        calls.append(len(tokens) * len(tokens[0]))
        return forward_rows(tokens, starts, rows, key_len)

    monkeypatch.setattr(generator, "_forward_rows", spy)
    done = {e.index: e for e in generator.generate(requests) if e.done}
    assert [(list(done[i].generated_ids), done[i].answer, done[i].stats.finish_reason)
            for i in range(len(requests))] == expected
    assert calls[0] == 48


@pytest.mark.slow
def test_greedy_batch_equals_one_at_a_time_with_rows_reused_and_a_wrapping_window(mistral):
    # window 16, chunk 16: 31 slots a row, so every sequence here wraps; prompts longer than a chunk prefill in
    # several; 5 requests through 2 rows
    requests = [BatchRequest(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts([3, 17, 40, 8, 33]),
                                                                               [20, 12, 24, 6, 16])]
    expected = one_at_a_time(mistral, requests, context_length=128, prefill_chunk=16)
    got = together(mistral, requests, 2, context_length=128, prefill_chunk=16)
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert got == expected
    assert mistral.model.row_positions is not None and mistral.model.row_positions.wraps


class _Replay:
    """Stands in for a CUDA graph on the CPU: a replay runs the captured call again into the same output."""

    def __init__(self, run, out: torch.Tensor) -> None:
        self.run, self.out = run, out

    def replay(self) -> None:
        self.out.copy_(self.run())

    def pool(self) -> None:
        return None


def _plain_capture(run, device, pool=None):
    """decode.capture on the CPU: the warm-up call, then each replay a plain call again."""
    out = run()
    return out, _Replay(run, out)


@pytest.mark.parametrize("kind", ["mistral", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_greedy_batch_with_the_step_in_graphs_equals_one_at_a_time(kind, mistral, mixtral, monkeypatch):
    """The plan's batch_graphs path (decode.GraphedRows: every row each step, static inputs, a cache bucket per
    graph), its capture replaced by plain calls on the CPU: the same greedy answers as one at a time."""
    from mistral_chat.engine import batch as batch_module
    from mistral_chat.engine import decode

    monkeypatch.setattr(decode, "capture", _plain_capture)
    monkeypatch.setattr(batch_module, "rows_in_graphs", lambda model, batch_size: True)
    loaded = mistral if kind == "mistral" else mixtral
    requests = [BatchRequest(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts([3, 17, 40, 8, 33], seed=2),
                                                                               [20, 12, 24, 6, 16])]
    expected = one_at_a_time(loaded, requests, context_length=128, prefill_chunk=16)
    generator = BatchGenerator(loaded, 3, context_length=128, prefill_chunk=16)
    assert isinstance(generator._graphed, decode.GraphedRows)
    done = {e.index: e for e in generator.generate(requests) if e.done}
    assert [(list(done[i].generated_ids), done[i].answer, done[i].stats.finish_reason)
            for i in range(len(requests))] == expected
    assert len(generator._graphed._graphs) >= 1


def test_in_graphs_each_step_goes_ahead_while_the_last_tokens_are_accepted(mistral, monkeypatch):
    """In graphs the next step is launched before the host accepts this step's tokens, and used: as many steps
    run as tokens are decoded, none twice; with admissions in between (a launched step then runs again) the answers
    stay those of one at a time."""
    from mistral_chat.engine import batch as batch_module
    from mistral_chat.engine import decode

    monkeypatch.setattr(decode, "capture", _plain_capture)
    monkeypatch.setattr(batch_module, "rows_in_graphs", lambda model, batch_size: True)
    requests = [BatchRequest(p, SamplingParams(max_tokens=10)) for p in prompts([5, 9, 7, 12], seed=5)]
    expected = one_at_a_time(mistral, requests, context_length=128)
    generator = BatchGenerator(mistral, 4, context_length=128)
    steps = []
    graphed = generator._graphed
    monkeypatch.setattr(generator, "_graphed", lambda *args: steps.append(1) or graphed(*args))
    take_ahead, taken = generator._take_ahead, []
    monkeypatch.setattr(generator, "_take_ahead", lambda: taken.append(take_ahead()) or taken[-1])
    done = {e.index: e for e in generator.generate(requests) if e.done}
    assert [(list(done[i].generated_ids), done[i].answer, done[i].stats.finish_reason)
            for i in range(len(requests))] == expected
    assert len(steps) == max(len(done[i].generated_ids) for i in done) - 1  # the first token comes from prefill
    assert taken[0] is None and all(t is not None for t in taken[1:])  # each later step was launched ahead
    more = requests + [BatchRequest(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts([4, 8], seed=6), [3, 7])]
    assert together(mistral, more, 3, context_length=128) == one_at_a_time(mistral, more, context_length=128)


@pytest.mark.slow
def test_greedy_batch_equals_one_at_a_time_mixtral(mixtral):
    requests = [BatchRequest(p, SamplingParams(max_tokens=8)) for p in prompts([4, 11, 7, 19], seed=1)]
    expected = one_at_a_time(mixtral, requests, context_length=64)
    assert together(mixtral, requests, 2, context_length=64) == expected


def test_each_row_samples_with_its_own_parameters(mistral):
    """Greedy, seeded sampling, penalties and max tokens side by side, each as it would be alone."""
    ids = prompts([6, 12, 9, 15], seed=2)
    requests = [BatchRequest(ids[0], SamplingParams(max_tokens=10)),
                BatchRequest(ids[1], SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=7)),
                BatchRequest(ids[2], SamplingParams(max_tokens=3, repetition_penalty=1.3, presence_penalty=0.5)),
                BatchRequest(ids[3], SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, min_p=0.01, seed=3))]
    expected = one_at_a_time(mistral, requests, context_length=128)
    assert together(mistral, requests, 4, context_length=128) == expected


def test_stop_strings_and_eos_end_a_row(mistral, monkeypatch):
    ids = prompts([5, 9], seed=3)
    reference = one_at_a_time(mistral, [BatchRequest(ids[0], GREEDY)], context_length=128)[0][1]
    stop = reference[len(reference) // 2:len(reference) // 2 + 3]
    requests = [BatchRequest(ids[0], SamplingParams(max_tokens=24, stop=(stop,))), BatchRequest(ids[1], GREEDY)]
    got = together(mistral, requests, 2, context_length=128)
    assert got[0][1] == reference[:reference.find(stop)] and got[0][2] == "stop"
    assert got == one_at_a_time(mistral, requests, context_length=128)
    # the model's third greedy token taken as EOS: that row stops there, the other goes on
    eos = got[1][0][2]
    monkeypatch.setattr(mistral.tokenizer, "eos_id", eos)
    ended = together(mistral, [BatchRequest(ids[1], GREEDY), BatchRequest(ids[0], SamplingParams(max_tokens=5))], 2,
                     context_length=128)
    assert ended[0][0] == got[1][0][:2] and ended[0][2] == "stop"
    assert len(ended[1][0]) == 5 and ended[1][2] == "length"


def test_bad_requests_get_errors_and_the_others_go_on(mistral):
    ids = prompts([5, 200, 7], seed=4)
    requests = [BatchRequest(ids[0], SamplingParams(max_tokens=4)), BatchRequest([], GREEDY),
                BatchRequest(ids[1], GREEDY), BatchRequest(ids[2], SamplingParams(max_tokens=4))]
    events = [e for e in BatchGenerator(mistral, 2, context_length=64).generate(requests) if e.done]
    by_index = {e.index: e for e in events}
    assert "empty" in by_index[1].error and "context holds 64" in by_index[2].error
    assert len(by_index[0].generated_ids) == 4 and len(by_index[3].generated_ids) == 4


def test_a_session_after_a_batch_and_a_batch_after_a_session(mistral):
    """Both use the model's one cache: each takes it back and answers as on a fresh one."""
    ids = prompts([9], seed=5)[0]
    first = one_at_a_time(mistral, [BatchRequest(ids, GREEDY)], context_length=128)
    session = Session(mistral, context_length=128)
    assert together(mistral, [BatchRequest(ids, GREEDY)], 2, context_length=128) == first
    assert "".join(session.generate(ids, GREEDY)) == first[0][1]
    assert together(mistral, [BatchRequest(ids, GREEDY)], 2, context_length=128) == first


def test_batch_size_for_memory(mistral, monkeypatch):
    import mistral_chat.engine.batch as batch

    per_row = batch.estimate_memory(mistral.config, mistral.dtype, 100).kv_cache
    monkeypatch.setattr(batch, "free_memory", lambda device: int(per_row * 10 / 0.9) + 1)
    assert batch_size_for_memory(mistral, 100) == 10
    assert batch_size_for_memory(mistral, 100, most=4) == 4
    monkeypatch.setattr(batch, "free_memory", lambda device: 0)
    assert batch_size_for_memory(mistral, 100) == 1


# ---- the command ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    from mistral_chat.cli.batch import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def run(tiny_path: Path, *args: str, stdin: str | None = None):
        return runner.invoke(app, [*args, "-m", str(tiny_path), "--device", "cpu", "--dtype", "float32"],
                             input=stdin, catch_exceptions=False)

    return run


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


REQUESTS = [
    {"id": "a", "prompt": "Hello there", "max_tokens": 6},
    {"id": 2, "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]},
    "this line is not JSON",
    {"id": "c", "prompt": "x", "bogus": 1},
    {"id": "d", "messages": [{"role": "wizard", "content": "?"}]},
    {"prompt": "a line without an id", "temperature": 0.7, "seed": 1, "stop": ["zz"]},
    {"id": "a", "prompt": "the same id again"},
]


def write_requests(path: Path) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in REQUESTS) + "\n")
    return path


def test_batch_command_answers_in_input_order_with_error_lines(tiny, mistral, cli, tmp_path):
    result = cli(tiny["mistral"], str(write_requests(tmp_path / "in.jsonl")), "-n", "5", "-b", "2")
    assert result.exit_code == 0, result.output
    lines = jsonl(result.stdout)
    assert [line["id"] for line in lines] == ["a", 2, None, "c", "d", 6, "a"]
    ok = [line for line in lines if "error" not in line]
    assert [line["id"] for line in ok] == ["a", 2, 6]
    assert lines[2]["line"] == 3 and "not valid JSON" in lines[2]["error"]
    assert "bogus" in lines[3]["error"] and "role" in lines[4]["error"] and "twice" in lines[6]["error"]
    assert ok[0]["usage"]["generated_tokens"] == 6 and ok[1]["usage"]["generated_tokens"] == 5
    assert ok[0]["finish_reason"] == "length" and ok[0]["tool_calls"] == []
    # the same answer as the API gives one at a time
    from mistral_chat.api import Model
    from mistral_chat.engine.options import LoadOptions

    model = Model(mistral, LoadOptions(device="cpu"))
    assert ok[0]["text"] == model.chat([{"role": "user", "content": "Hello there"}], max_tokens=6).text


def test_batch_command_resumes_its_output(tiny, cli, tmp_path):
    source = write_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    answered = {"id": "a", "text": "kept from before", "tool_calls": [], "finish_reason": "stop", "usage": {}}
    out.write_text(json.dumps(answered) + "\n" + json.dumps({"id": 2, "error": "out of memory"}) + "\n{\"id\": 6, \"te")
    result = cli(tiny["mistral"], str(source), "-o", str(out), "-n", "4")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "2 request(s) already answered" in result.stderr  # "a", and the line that repeats its id
    lines = jsonl(out.read_text())
    assert lines[0] == answered  # kept; the error line and the torn line are gone, their ids answered again
    assert [line["id"] for line in lines] == ["a", 2, None, "c", "d", 6]
    assert "error" not in lines[1] and "error" not in lines[5]
    again = cli(tiny["mistral"], str(source), "-o", str(out), "-n", "4")
    assert again.exit_code == 0 and "4 request(s) already answered" in again.stderr
    assert len(jsonl(out.read_text())) == 6


def test_batch_command_reads_stdin(tiny, cli):
    stdin = "\n".join(json.dumps({"id": i, "prompt": f"question {i}", "max_tokens": 3}) for i in range(5))
    result = cli(tiny["mistral"], "-", "-b", "2", stdin=stdin)
    assert result.exit_code == 0, result.output
    assert [line["id"] for line in jsonl(result.stdout)] == [0, 1, 2, 3, 4]
    assert "answered 5 of 5" in result.stderr


@pytest.mark.slow
def test_mistral_chat_batch_as_a_command(tiny):
    """The installed command: `mistral-chat batch` with requests on stdin and answers on stdout."""
    stdin = json.dumps({"id": "x", "prompt": "Hi", "max_tokens": 3}) + "\n" + "{broken\n"
    proc = subprocess.run([sys.executable, "-m", "mistral_chat.cli.main", "batch", "-m", str(tiny["mistral"]),
                           "--device", "cpu"], input=stdin, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = jsonl(proc.stdout)
    assert lines[0]["id"] == "x" and lines[0]["usage"]["generated_tokens"] == 3
    assert lines[1]["id"] is None and "not valid JSON" in lines[1]["error"]
