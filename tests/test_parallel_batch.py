"""Continuous batching under tensor parallelism (engine/parallel/batch.py): 2 ranks over gloo on the CPU.

Rank 0 runs in the test process, rank 1 is a real follower process (engine/parallel/launcher.py). Greedy answers
batched on 2 ranks equal the same requests answered one at a time by one process's `Session` (float32): prompts of
different lengths, more requests than rows (rows reused), prompts prefilled in several chunks, a sliding window
the sequences outgrow, Mixtral; and a batch-1 chat between batches on the same run starts on a fresh cache.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from mistral_chat import Model
from mistral_chat.api import ChatRequest
from mistral_chat.engine.batch import BatchRequest
from mistral_chat.engine.generate import Session
from mistral_chat.engine.loader import LoadedModel, load_model
from mistral_chat.engine.options import LoadOptions, SamplingParams
from mistral_chat.engine.parallel.batch import ParallelBatchGenerator, pack_rows, unpack_rows
from mistral_chat.engine.parallel.group import ParallelRunError, RankOptions
from mistral_chat.engine.parallel.launcher import start_parallel_session
from mistral_chat.engine.parallel.session import ParallelSession
from mistral_chat.errors import MistralChatError
from tiny_models import write_tiny_model

CONTEXT, CHUNK = 128, 8  # the tiny mistral's window is 16: its rows hold 16 + 8 slots and wrap


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-batch")
    return {kind: write_tiny_model(root / kind, kind)["native"] for kind in ("mistral", "mixtral")}


def start(path: Path) -> tuple[LoadedModel, ParallelSession]:
    options = RankOptions(path=str(path), options=LoadOptions(device="cpu", dtype="float32", context_length=CONTEXT),
                          prefill_chunk=CHUNK)
    started = start_parallel_session(options, 2)
    assert started is not None
    return started


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 1000) for _ in range(n - 1)] for n in lengths]


def one_at_a_time(session: Session, requests: list[BatchRequest]) -> list[tuple[list[int], str, str]]:
    out = []
    for request in requests:
        session.reset()
        text = "".join(session.generate(request.prompt_ids, request.params))
        out.append((list(session.generated_ids), text, session.stats.finish_reason))
    return out


def together(generator, requests: list[BatchRequest]) -> list[tuple[list[int], str, str]]:
    done: dict[int, tuple[list[int], str, str]] = {}
    streamed: dict[int, str] = {}
    for event in generator.generate(requests):
        streamed[event.index] = streamed.get(event.index, "") + event.text
        if event.done:
            assert event.stats is not None and not event.error
            done[event.index] = (list(event.generated_ids), event.answer, event.stats.finish_reason)
            assert streamed[event.index] == event.answer
    return [done[i] for i in range(len(requests))]


def test_a_batch_step_travels_as_int64_ids():
    ids = pack_rows([[5, 6, 7], [8, 9, 10]], [0, 12], slice(3, 5), 24)
    tokens, starts, rows, key_len = unpack_rows(ids, 3)
    assert tokens.tolist() == [[5, 6, 7], [8, 9, 10]] and starts.tolist() == [0, 12]
    assert rows == slice(3, 5) and key_len == 24
    with pytest.raises(ParallelRunError, match="same mistral-chat"):
        unpack_rows(ids[:-1], 3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_greedy_batch_under_tp_2_equals_one_process_one_at_a_time(tiny, kind):
    # 5 requests through 2 rows; prompts longer than a chunk prefill in several; the mistral rows wrap
    requests = [BatchRequest(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts([3, 17, 40, 8, 33]),
                                                                               [20, 12, 24, 6, 16])]
    single = Session(load_model(tiny[kind], device="cpu", dtype="float32"), context_length=CONTEXT,
                     prefill_chunk=CHUNK)
    expected = one_at_a_time(single, requests)
    loaded, parallel = start(tiny[kind])
    with parallel:
        generator = ParallelBatchGenerator(parallel, 2, context_length=CONTEXT, prefill_chunk=CHUNK)
        assert together(generator, requests) == expected
        if kind == "mistral":
            assert loaded.model.row_positions is not None and loaded.model.row_positions.wraps

        # a batch-1 answer after the batch, then its follow-up (reusing the session's cache), then the batch again
        # and a session answer after it: each side takes the model's one cache back on every rank
        params = SamplingParams(max_tokens=10)
        first = prompts([11], seed=1)[0]
        answer = "".join(parallel.generate(first, params))
        assert answer == "".join(single.generate(first, params)) and parallel.tokens == single.tokens
        follow_up = parallel.tokens + prompts([5], seed=2)[0]
        assert "".join(parallel.generate(follow_up, params)) == "".join(single.generate(follow_up, params))
        assert parallel.stats.prefilled_tokens == single.stats.prefilled_tokens < len(follow_up)
        assert together(generator, requests[:3]) == expected[:3]
        again = follow_up + prompts([4], seed=3)[0]  # the batch took the cache: prefilled from the start
        assert "".join(parallel.generate(again, params)) == "".join(single.generate(again, params))
        assert parallel.stats.prefilled_tokens == len(again)


@pytest.mark.slow
def test_model_batches_and_chats_under_tp_2_as_on_one_process(tiny):
    """Model.chat_batch, chat and chat_requests, and the server's engine thread, on one tp=2 run."""
    from mistral_chat.serve.worker import EngineWorker, Job

    conversations = [[{"role": "user", "content": text}] for text in
                     ("Hi", "Tell me a long story about a lighthouse", "2+2?", "What is the capital of France?")]
    requests = [ChatRequest(conversations[2], params=SamplingParams(max_tokens=5)),
                ChatRequest([{"role": "assistant", "content": "no user turn"}]),
                ChatRequest(conversations[3], params=SamplingParams(max_tokens=9))]

    def follow_up(reply) -> list[dict]:
        return conversations[1] + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "More"}]

    with Model.load(tiny["mistral"], device="cpu", dtype="float32", context=CONTEXT) as one:
        expected = [one.chat(c, max_tokens=12) for c in conversations]
        expected_more = one.chat(follow_up(expected[1]), max_tokens=6)
        expected_requests = {i: r if isinstance(r, Exception) else r.text for i, r in one.chat_requests(requests)}
    with Model.load(tiny["mistral"], device="cpu", dtype="float32", context=CONTEXT, tp=2) as model:
        assert [r.text for r in model.chat_batch(conversations, max_tokens=12, batch_size=2)] == \
            [r.text for r in expected]
        reply = model.chat(conversations[1], max_tokens=12)  # batch-1 chat after a batch
        assert reply.text == expected[1].text and reply.token_ids == expected[1].token_ids
        more = model.chat(follow_up(reply), max_tokens=6)  # its follow-up reuses the session's cache
        assert more.text == expected_more.text and model.session.stats.prefilled_tokens < more.usage.prompt_tokens
        got = {i: r if isinstance(r, Exception) else r.text for i, r in model.chat_requests(requests, batch_size=2)}
        assert got.keys() == expected_requests.keys() == {0, 1, 2}
        assert isinstance(got[1], MistralChatError) and str(got[1]) == str(expected_requests[1])
        assert (got[0], got[2]) == (expected_requests[0], expected_requests[2])

        worker = EngineWorker(model, batch_size=3)  # serve's engine thread: requests batched as they arrive

        async def serve() -> list[str]:
            jobs = [Job(SamplingParams(max_tokens=12), messages=c).bind() for c in conversations]
            worker.start()
            for job in jobs:
                worker.submit(job)
            texts = []
            for job in jobs:
                pieces = []
                while True:
                    kind, value = await asyncio.wait_for(job.events.get(), 60)
                    assert kind != "error", value
                    if kind == "text":
                        pieces.append(value)
                    elif kind == "done":
                        assert value.text == "".join(pieces)
                        texts.append(value.text)
                        break
            return texts

        try:
            assert asyncio.run(serve()) == [r.text for r in expected]
        finally:
            worker.stop(30)
        assert worker.most_together > 1
        assert model.chat(conversations[0], max_tokens=12).text == expected[0].text


@pytest.mark.slow
def test_a_follower_dying_in_a_batch_ends_it_with_a_parallel_run_error(tiny):
    loaded, parallel = start(tiny["mistral"])
    with parallel:
        generator = ParallelBatchGenerator(parallel, 2, context_length=CONTEXT, prefill_chunk=CHUNK)
        requests = [BatchRequest(p, SamplingParams(max_tokens=100)) for p in prompts([6, 9, 12], seed=4)]
        killed_at = 0.0
        with pytest.raises(ParallelRunError, match="rank 1 was killed by SIGKILL"):
            for i, _ in enumerate(generator.generate(requests)):
                if i == 3:
                    os.kill(parallel.followers.pids[1], signal.SIGKILL)
                    killed_at = time.monotonic()
        assert time.monotonic() - killed_at < 5
        with pytest.raises(ParallelRunError, match="rank 1"):  # and every later use says so at once
            list(generator.generate(requests[:1]))
        with pytest.raises(ParallelRunError, match="rank 1"):
            list(parallel.generate(requests[0].prompt_ids))
