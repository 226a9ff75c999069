"""Tensor parallelism on CPU: 2 ranks over gloo give the single-process engine's logits and tokens.

Rank 0 runs in the test process (as it does under the UI); rank 1 is a real follower process spawned by
engine/parallel/launcher.py. Models are float32 so the sharded sums agree to 1e-5.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mistral_chat.engine.generate import Session
from mistral_chat.engine.loader import load_model
from mistral_chat.engine.options import LoadOptions, SamplingParams
from mistral_chat.engine.parallel.group import ParallelRunError, RankOptions, check_launch, check_model_splits
from mistral_chat.engine.parallel.launcher import start_parallel_session
from mistral_chat.engine.parallel.sharding import check_tensor_parallel
from mistral_chat.errors import DeviceError, MistralChatError
from mistral_chat.service.tensor_parallel import ParallelModelLoader
from tiny_models import write_tiny_model

CONTEXT, CHUNK = 128, 8  # with the window of 16, the mistral cache holds 16 + 8 slots and wraps often


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    return {
        "mistral": write_tiny_model(root / "mistral", "mistral")["native"],
        "mixtral": write_tiny_model(root / "mixtral", "mixtral", shard_hf=True)["hf"],
        # one KV head for 4 query heads: each of the 2 ranks keeps a copy of it
        "mistral-kv1": write_tiny_model(root / "kv1", "mistral", n_kv_heads=1)["hf"],
    }


def start(path: Path, **kw):
    options = RankOptions(path=str(path), options=LoadOptions(device="cpu", dtype="float32", context_length=CONTEXT),
                          prefill_chunk=CHUNK)
    started = start_parallel_session(options, 2, **kw)
    assert started is not None
    return started


def single_session(path: Path) -> Session:
    return Session(load_model(path, device="cpu", dtype="float32"), context_length=CONTEXT, prefill_chunk=CHUNK)


def decode_next(session: Session, token: int) -> torch.Tensor:
    """The logits after one decode step of `token`, which the session's cache then holds (as the chat loop does)."""
    logits = session.decode(torch.tensor([[token]]), len(session.tokens))
    session.tokens.append(token)
    return logits


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mistral", "mixtral", "mistral-kv1"])
def test_logits_and_greedy_tokens_match_single_process(tiny, kind):
    loaded, parallel = start(tiny[kind])
    with parallel:
        single = single_session(tiny[kind])
        assert parallel.world == 2 and loaded.model.output.weight.shape[0] == loaded.config.vocab_size // 2
        ids = prompt(30, seed=1)
        with torch.no_grad():
            got, expected = parallel._feed(ids), single._feed(ids)  # chunked prefill
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            tokens_p, tokens_s = [], []
            for _ in range(40):  # greedy decode, one token at a time; the mistral buffer wraps
                tp, ts = int(got.argmax()), int(expected.argmax())
                tokens_p.append(tp)
                tokens_s.append(ts)
                got, expected = decode_next(parallel, tp), decode_next(single, ts)
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert tokens_p == tokens_s
        if kind == "mistral":
            assert parallel.model.cache_capacity < len(parallel.tokens)  # the rotating cache wrapped

        # the whole Session interface: a turn, a follow-up that reuses the cache, a cancelled answer, a reset
        params = SamplingParams(max_tokens=24)
        first = prompt(20, seed=2)
        for session in (parallel, single):
            session.reset()
        assert "".join(parallel.generate(first, params)) == "".join(single.generate(first, params))
        assert parallel.tokens == single.tokens
        follow_up = parallel.tokens + prompt(6, seed=3)
        assert "".join(parallel.generate(follow_up, params)) == "".join(single.generate(follow_up, params))
        assert parallel.stats.prefilled_tokens == single.stats.prefilled_tokens < len(follow_up)
        for session in (parallel, single):
            cancel = threading.Event()
            for _ in session.generate(prompt(12, seed=4), params, cancel):
                cancel.set()
            assert session.stats.finish_reason == "cancelled"
        assert parallel.tokens == single.tokens
        sampled = SamplingParams(temperature=0.8, top_k=50, seed=7, max_tokens=16)
        again = prompt(9, seed=5)
        assert "".join(parallel.generate(again, sampled)) == "".join(single.generate(again, sampled))
        assert parallel.tokens == single.tokens

        # decoding ahead of the host, as on GPUs: every rank runs one step past an answer that a stop string
        # ends, and the follow-up turn must not notice (the followers learn from rank 0 what the cache keeps)
        for session in (parallel, single):
            session.run_ahead = True
            session.reset()
        text = "".join(parallel.generate(first, params))
        assert text == "".join(single.generate(first, params)) and len(text) > 8
        stop = SamplingParams(max_tokens=24, stop=[text[len(text) // 2:len(text) // 2 + 3]])
        for session in (parallel, single):
            session.reset()
        assert "".join(parallel.generate(first, stop)) == "".join(single.generate(first, stop))
        assert parallel.stats.finish_reason == "stop" and parallel.stats.generated_tokens < 24
        follow_up = parallel.tokens + prompt(5, seed=6)
        assert "".join(parallel.generate(follow_up, params)) == "".join(single.generate(follow_up, params))
        assert parallel.stats.prefilled_tokens == single.stats.prefilled_tokens < len(follow_up)
        assert parallel.tokens == single.tokens
        for session in (parallel, single):  # cancelled mid-answer, then a follow-up
            cancel = threading.Event()
            for i, _ in enumerate(session.generate(follow_up + prompt(3, seed=7), params, cancel)):
                if i == 2:
                    cancel.set()
            assert session.stats.finish_reason == "cancelled"
        assert parallel.tokens == single.tokens
        last = parallel.tokens + prompt(4, seed=8)
        assert "".join(parallel.generate(last, params)) == "".join(single.generate(last, params))
        assert parallel.stats.prefilled_tokens == single.stats.prefilled_tokens < len(last)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_a_dead_follower_ends_the_run_within_seconds(tiny):
    """Started through the hooks the engine worker takes (loader, session_factory), as the TUI does."""
    from mistral_chat.service.worker import LoadRequest

    hooks = ParallelModelLoader(2)
    progress: list[tuple[int, int]] = []
    options = LoadOptions(device="cpu", dtype="float32", context_length=CONTEXT)
    loaded = hooks.load(LoadRequest(tiny["mistral"], options), lambda done, total: progress.append((done, total)))
    try:
        parallel = hooks.session_factory(loaded, CONTEXT)
        assert progress  # rank 0's loading progress reaches the worker
        follower = parallel.followers.pids[1]
        killed_at = 0.0
        with pytest.raises(ParallelRunError, match="rank 1 was killed by SIGKILL"):
            for i, _ in enumerate(parallel.generate(prompt(20, seed=6), SamplingParams(max_tokens=100))):
                if i == 2:
                    os.kill(follower, signal.SIGKILL)
                    killed_at = time.monotonic()
        assert time.monotonic() - killed_at < 5
        with pytest.raises(ParallelRunError, match="rank 1"):  # and every later use says so at once
            list(parallel.generate(prompt(5, seed=7)))
    finally:
        hooks.close()


@pytest.mark.slow
def test_rank_0_stuck_with_a_dead_follower_is_told_within_seconds(tiny):
    """Where a collective would never return (NCCL), the watcher calls on_stuck instead of hanging."""
    told: list[str] = []
    loaded, parallel = start(tiny["mistral"], on_stuck=told.append)
    with parallel:
        parallel.followers.busy = True  # as if blocked in an all-reduce
        os.kill(parallel.followers.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 8
        while not told and time.monotonic() < deadline:
            time.sleep(0.05)
        parallel.followers.busy = False
        assert told and "rank 1 was killed" in told[0]


RANK0_THEN_DIE = """
import os, signal, sys
from mistral_chat.engine.options import LoadOptions
from mistral_chat.engine.parallel.group import RankOptions
from mistral_chat.engine.parallel.launcher import start_parallel_session
loaded, session = start_parallel_session(RankOptions(sys.argv[1], LoadOptions(device="cpu", dtype="float32")), 2)
print(session.followers.pids[1], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_followers_exit_when_rank_0_dies(tiny):
    proc = subprocess.run([sys.executable, "-c", RANK0_THEN_DIE, str(tiny["mistral"])], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    follower = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10  # typically well under a second; room for a loaded 2-core CI machine
    while _alive(follower) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(follower)


@pytest.mark.slow
def test_one_shot_cli_with_tp_2_equals_without(tiny, tmp_path):
    env = dict(os.environ, MISTRAL_CHAT_HOME=str(tmp_path / "home"))
    base = [sys.executable, "-m", "mistral_chat.cli.main", "--model", str(tiny["mistral"]), "--device", "cpu",
            "--prompt", "hi", "--max-tokens", "8"]
    plain = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    parallel = subprocess.run(base + ["--tp", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert parallel.returncode == 0, parallel.stderr
    assert plain.stdout.strip() and parallel.stdout == plain.stdout


def test_a_tp_that_does_not_split_the_model_fails_before_spawning(tiny):
    with pytest.raises(ParallelRunError, match="--tp 3 does not divide the model's 4 attention heads"):
        start_parallel_session(RankOptions(str(tiny["mistral"]), LoadOptions(device="cpu")), 3)
    check_model_splits(tiny["mistral-kv1"], 2)  # 1 KV head: replicated


def test_kv_head_rule():
    check_tensor_parallel(2, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32768)  # split
    check_tensor_parallel(16, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32768)  # 2 copies each
    with pytest.raises(MistralChatError, match="KV heads"):  # ranks would straddle two KV groups
        check_tensor_parallel(6, n_heads=12, n_kv_heads=4, hidden_dim=600, vocab_size=600)
    with pytest.raises(MistralChatError, match="vocabulary"):
        check_tensor_parallel(4, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32002)


def test_gpu_checks(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    check_launch(2, "cuda")
    with pytest.raises(DeviceError, match="--tp 4 needs 4 GPUs on this machine but 2 are visible"):
        check_launch(4, "cuda")
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(DeviceError, match="no NCCL"):
        check_launch(2, "cuda")


def test_leaving_an_nccl_group_never_waits_forever(monkeypatch):
    """Leaving the NCCL group drops this thread's CUDA graphs first, and when the teardown still hangs (seen on
    H100/H200 hosts after compiled decode) it aborts the communicators after the timeout instead of waiting."""
    import torch._inductor.cudagraph_trees as cudagraph_trees
    import torch.distributed as dist

    from mistral_chat.engine.parallel import group

    hang, calls = threading.Event(), []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(cudagraph_trees, "reset_cudagraph_trees", lambda: calls.append("graphs dropped"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: (calls.append("destroy"), hang.wait(30)))
    monkeypatch.setattr(group, "abort_nccl", lambda: calls.append("abort"))
    started = time.monotonic()
    try:
        group.leave_process_group(timeout=0.5)
    finally:
        hang.set()
    assert time.monotonic() - started < 5
    assert calls == ["graphs dropped", "destroy", "abort"]


@pytest.mark.slow
def test_rank_0_leaves_the_group_with_the_followers_not_after_them(tiny, monkeypatch):
    """Rank 0 leaves the process group as soon as it has told the followers to stop, and only then waits for
    them: waiting first deadlocked NCCL teardown (the followers waited in it for rank 0) on GPUs."""
    from mistral_chat.engine.parallel import session as parallel_session

    order: list[str] = []
    leave = parallel_session.leave_process_group
    monkeypatch.setattr(parallel_session, "leave_process_group", lambda: (order.append("rank 0 leaves"), leave()))
    options = LoadOptions(device="cpu", dtype="float32", context_length=CONTEXT)
    loaded, session = start_parallel_session(RankOptions(str(tiny["mistral"]), options), 2)
    followers = session.followers
    close = followers.close
    monkeypatch.setattr(followers, "close", lambda: (order.append("followers waited for"), close()))
    with session:
        assert "".join(session.generate(prompt(6, seed=8), SamplingParams(max_tokens=4)))
    assert order == ["rank 0 leaves", "followers waited for"]
    assert all(proc.returncode == 0 for proc in followers.procs.values())


def _dequantized(w: torch.Tensor, slices: int = 1) -> torch.Tensor:
    """w after int8 quantization with per-row scales, each of `slices` equal parts of its input dim on its own."""
    from mistral_chat.engine.quant import quantize_rows

    parts = []
    for part in w.chunk(slices, dim=-1):
        q, scale = quantize_rows(part)
        parts.append(q.to(w.dtype) * scale[..., None])
    return torch.cat(parts, dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_int8_ranks_quantize_their_own_slices(tiny, kind):
    """--quantize int8 with --tp 2: every rank quantizes the slices it holds. Column-parallel weights keep the
    single-GPU scales (a row is never split); the row-parallel ones (wo, w2) get one scale per row and rank, so
    the run equals a single-process model whose wo and w2 were quantized in two halves of their input dim."""
    single = single_session(tiny[kind])
    with torch.no_grad():
        for name, p in single.model.named_parameters():
            if name.startswith("tok_embeddings") or name.endswith(("norm.weight", "gate.weight")):
                continue
            row_parallel = name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w2"))
            p.copy_(_dequantized(p, 2 if row_parallel else 1))
    options = RankOptions(path=str(tiny[kind]), prefill_chunk=CHUNK,
                          options=LoadOptions(device="cpu", dtype="float32", context_length=CONTEXT, quantize="int8"))
    started = start_parallel_session(options, 2)
    assert started is not None
    _, parallel = started
    with parallel, torch.no_grad():
        ids = prompt(24, seed=9)
        got, expected = parallel._feed(ids), single._feed(ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        for _ in range(12):
            token = int(expected.argmax())
            assert int(got.argmax()) == token
            got, expected = decode_next(parallel, token), decode_next(single, token)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _listening_sockets(pids: list[int]) -> list[str]:
    """The TCP addresses (hex, as /proc/net/tcp{,6} gives them) the processes `pids` listen on."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN, owned by one of `pids`
                    found.append(fields[1])
    return found


def _is_loopback(address: str) -> bool:
    host = address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian: 127.x.x.x ends in 7F
        return host.endswith("7F")
    return host in ("00000000000000000000000001000000", ) or (  # ::1, or ::ffff:127.x.x.x
        host.startswith("0000000000000000FFFF0000") and host.endswith("7F"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp (Linux)")
def test_rendezvous_listens_on_loopback_only(tiny):
    """The TCP store of a spawned --tp run (and whatever else its ranks listen on) is reachable from this host
    only: torch's TCPStore alone binds every interface (*:PORT) whatever host it is given."""
    loaded, parallel = start(tiny["mistral"])
    with parallel:
        pids = [os.getpid(), *parallel.followers.pids.values()]
        listening = _listening_sockets(pids)
        assert listening, "the run listens on nothing?"
        assert [a for a in listening if not _is_loopback(a)] == []
