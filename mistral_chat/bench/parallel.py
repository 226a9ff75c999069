"""`mistral-chat bench --tp 1,2,4`: greedy agreement and batch-1 decode speed of tensor-parallel runs.

A random checkpoint of a real model shape is written once to disk in the native layout (params.json, safetensors
shards, and a synthetic tekken.json whose vocabulary covers every id the model can produce), then loaded as a
plain one-process run (world 1) and as tensor-parallel runs of 2, 4, ... ranks (`start_parallel_session`, the
path `mistral-chat --tp N` takes). Each run decodes the same random prompt greedily; the table shows tokens/s,
time to first token, the per-GPU bandwidth floor (weight bytes rank 0 reads per token / copy bandwidth of
cuda:0), and how far each world's tokens agree with the reference run (world 1 when it ran).

Each tensor-parallel world's rank 0 runs in a process of its own (`python -m mistral_chat.bench.parallel DIR`), as
a `mistral-chat --tp N` run does: only the first tensor-parallel run of a process may use symmetric memory.

The output rows of the special tokens are zero, so EOS (logit 0 among ~N(0, 1) logits) never wins and every run
produces its full `steps` tokens; a run that stopped early anyway says so.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mistral_chat.bench.checkpoint import clear_checkpoint, reusable, special_count, write_random_checkpoint
from mistral_chat.errors import MistralChatError

# ---- one run per world size ------------------------------------------------------------------------------------


@dataclass
class WorldRun:
    """One world size's load, greedy generation and agreement with the reference run."""

    world: int
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    load_s: float = 0.0
    warmup_s: float = 0.0  # the first (untimed) greedy run: compiles prefill and decode when compiling
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    ms_per_token: float = 0.0  # the median timed run's
    timed_ms: list[float] = field(default_factory=list)  # ms/token of each timed run
    # of the median run's decode time, rank 0's host waited for the GPU's tokens (~100: GPU-bound; on GPUs only,
    # where the host queues each step before it reads the token before)
    host_wait_pct: float | None = None
    generated: int = 0
    finish_reason: str = ""
    repeatable: bool = True  # the timed run produced the ids of the first (warm-up) run
    all_reduce: str = ""  # what carried the all-reduces of decode: NCCL or symmetric memory (world > 1)
    weight_bytes_per_gpu: int = 0  # weights rank 0 reads per decode step
    floor_ms_per_token: float = 0.0
    floor_tokens_per_s: float = 0.0
    floor_pct: float = 0.0
    same_leading: int = 0  # leading tokens identical to the reference run's
    same_fraction: float = 0.0  # positions with the reference run's token
    first_logits_max_diff: float = 0.0  # max |logit difference| after the prompt, vs the reference
    margin_at_divergence: float | None = None  # reference's top-1 minus top-2 logit where the tokens first differ
    forced_same_fraction: float | None = None  # fed the reference's tokens: positions whose argmax is the reference's
    forced_worst_gap: float = 0.0  # at those that differ: own top logit minus own logit of the reference's token
    ids: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit at each generated token


@dataclass
class ParallelBenchResult:
    shape: str
    device: str
    dtype: str
    quantize: str | None
    layers: int
    prompt: int
    steps: int
    gpus: int = 0
    compiled: bool = False  # decode compiled into CUDA graphs (GPUs, unless --no-compile)
    copy_bandwidth_gbs: float = 0.0
    checkpoint_gb: float = 0.0
    write_s: float = 0.0
    checkpoint_reused: bool = False
    reference_world: int | None = None
    runs: list[WorldRun] = field(default_factory=list)


class _LogitRecorder:
    """Wraps a session's prefill and decode step to keep the top-2 gap of every logits it returns (on device,
    read after the run) and the prompt's last logits."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.prefill, self.decode = session.prefill, session.decode
        self.first: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        session.prefill = self._prefill
        session.decode = self._decode

    def _prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        out = self.prefill(tokens, start)
        self.first = out
        return out

    def _decode(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        out = self.decode(tokens, position)
        self.steps.append(out.float().topk(2, dim=-1).values[0])
        return out

    def detach(self) -> tuple[torch.Tensor, list[float]]:
        """(the prompt's last logits on the CPU, the margins of all generated tokens); restores the session."""
        self.session.prefill, self.session.decode = self.prefill, self.decode
        assert self.first is not None
        first = self.first.float()[0]
        tops = [first.topk(2).values] + self.steps
        margins = (torch.stack(tops)[:, 0] - torch.stack(tops)[:, 1]).cpu().tolist()
        return first.cpu(), margins


def _release(device_type: str) -> None:
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()


def _measure(session: Any, prompt_ids: list[int], steps: int, run: WorldRun, timed_runs: int = 3) -> torch.Tensor:
    """Greedy runs of the prompt: the first warms up and records logits, the next `timed_runs` are timed (the
    median run's figures are kept: one run of a few hundred milliseconds can catch a hiccup of the host)."""
    from mistral_chat.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=steps)
    session.reset()
    recorder = _LogitRecorder(session)
    started = time.perf_counter()
    try:
        for _ in session.generate(prompt_ids, params):
            pass
    finally:
        first_logits, margins = recorder.detach()
    run.warmup_s = time.perf_counter() - started
    warm_ids = list(session.generated_ids)
    timed = []
    for _ in range(timed_runs):
        session.reset()
        for _ in session.generate(prompt_ids, params):
            pass
        timed.append((session.stats, list(session.generated_ids)))
    run.timed_ms = [1000 / stats.tokens_per_second if stats.tokens_per_second else 0.0 for stats, _ in timed]
    stats, run.ids = sorted(timed, key=lambda t: -t[0].tokens_per_second)[len(timed) // 2]
    run.margins = margins[:len(run.ids)]
    run.repeatable = all(ids == warm_ids for _, ids in timed)
    run.generated = stats.generated_tokens
    run.finish_reason = stats.finish_reason
    run.ttft_ms = stats.time_to_first_token * 1000
    run.tokens_per_s = stats.tokens_per_second
    run.ms_per_token = 1000 / run.tokens_per_s if run.tokens_per_s else 0.0
    if session.run_ahead and stats.decode_seconds > 0:
        run.host_wait_pct = 100 * stats.host_wait_seconds / stats.decode_seconds
    if run.generated < steps:
        run.note = f"stopped after {run.generated} of {steps} tokens ({run.finish_reason})"
    return first_logits


def _teacher_forced(session: Any, prompt_ids: list[int], ref_ids: list[int], run: WorldRun) -> None:
    """Feed the reference run's tokens: at each position, does this world's argmax pick the reference's token?

    Unlike comparing two free greedy runs, one near-tie does not make every later token differ."""
    session.reset()
    with torch.no_grad():
        logits = session._feed(prompt_ids)[0].float()  # (_feed records the tokens it ran; decode does not)
        agree, worst = 0, 0.0
        for i, token in enumerate(ref_ids):
            top = int(logits.argmax())
            if top == token:
                agree += 1
            else:
                worst = max(worst, float(logits[top] - logits[token]))
            if i + 1 < len(ref_ids):
                position = len(session.tokens)
                logits = session.decode(torch.tensor([[token]], device=session.loaded.device), position)[0].float()
                session.tokens.append(token)
    run.forced_same_fraction = agree / max(len(ref_ids), 1)
    run.forced_worst_gap = worst


def _run_world(path: Path, world: int, dev_type: str, dtype: str, quantize: str | None, context: int,
               prompt_ids: list[int], steps: int, compile: bool,
               ref_ids: list[int] | None = None) -> tuple[WorldRun, torch.Tensor | None]:
    from mistral_chat.bench.run import weight_bytes_per_token
    from mistral_chat.engine.generate import Session
    from mistral_chat.engine.options import LoadOptions
    from mistral_chat.engine.parallel.launcher import RankOptions, start_parallel_session
    from mistral_chat.engine.loader import load_model
    from mistral_chat.engine.parallel.collectives import fast_all_reduce_kernel

    run = WorldRun(world=world)
    first_logits = None
    started = time.perf_counter()
    try:
        with ExitStack() as stack:
            if world == 1:
                loaded = load_model(path, device="cuda:0" if dev_type == "cuda" else "cpu", dtype=dtype,
                                    quantize=quantize, context_length=context, compile=compile)
                session: Any = Session(loaded, context_length=context)
            else:
                options = RankOptions(str(path), LoadOptions(device=dev_type, dtype=dtype, context_length=context,
                                                             quantize=quantize, compile=compile))
                started_run = start_parallel_session(options, world)
                assert started_run is not None, "not under torchrun: rank 0 always gets a session"
                loaded, session = started_run
                stack.enter_context(session)
                kernel = fast_all_reduce_kernel()
                run.all_reduce = f"symmetric memory, {kernel} kernel" if kernel else "NCCL"
            run.load_s = time.perf_counter() - started
            run.weight_bytes_per_gpu = weight_bytes_per_token(loaded.model, loaded.config)
            first_logits = _measure(session, prompt_ids, steps, run)
            if ref_ids:
                _teacher_forced(session, prompt_ids, ref_ids, run)
            del loaded, session
    except MistralChatError as exc:
        run.status, run.note = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - one world failing must not lose the others' numbers
        run.status, run.note = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        _release(dev_type)
    return run, first_logits


def _run_world_apart(path: Path, world: int, dev_type: str, dtype: str, quantize: str | None, context: int,
                     prompt_ids: list[int], steps: int, compile: bool,
                     ref_ids: list[int] | None = None) -> tuple[WorldRun, torch.Tensor | None]:
    """`_run_world` with rank 0 in a child process (its output goes to this one's terminal)."""
    from mistral_chat.engine.parallel.launcher import child_environment

    args = {"path": str(path), "world": world, "dev_type": dev_type, "dtype": dtype, "quantize": quantize,
            "context": context, "prompt_ids": prompt_ids, "steps": steps, "compile": compile, "ref_ids": ref_ids}
    with tempfile.TemporaryDirectory(prefix="mistral-chat-tp-world-") as tmp:
        (Path(tmp) / "args.json").write_text(json.dumps(args))
        code = subprocess.run([sys.executable, "-m", "mistral_chat.bench.parallel", tmp],
                              env=child_environment()).returncode
        result = Path(tmp) / "result.pt"
        if code != 0 or not result.exists():
            return WorldRun(world=world, status="failed", note=f"its process exited with code {code}"), None
        saved = torch.load(result)
    return WorldRun(**saved["run"]), saved["first"]


def _child_main(folder: str) -> None:
    """`python -m mistral_chat.bench.parallel DIR`: one world as `_run_world_apart` asked, result in DIR."""
    args = json.loads((Path(folder) / "args.json").read_text())
    args["path"] = Path(args["path"])
    run, first = _run_world(**args)
    torch.save({"run": asdict(run), "first": None if first is None else first.cpu()}, Path(folder) / "result.pt")


def _compare(run: WorldRun, ref: WorldRun, first: torch.Tensor | None, ref_first: torch.Tensor | None) -> None:
    from mistral_chat.engine.generate import common_prefix

    run.same_leading = common_prefix(run.ids, ref.ids)
    length = max(len(run.ids), len(ref.ids), 1)
    run.same_fraction = sum(a == b for a, b in zip(run.ids, ref.ids)) / length
    if run.same_leading < min(len(run.ids), len(ref.ids)):
        run.margin_at_divergence = ref.margins[run.same_leading]
    if first is not None and ref_first is not None:
        run.first_logits_max_diff = float((first.cpu() - ref_first.cpu()).abs().max())


def prompt_ids(vocab_size: int, n: int, seed: int = 0, first_ordinary: int = 0) -> list[int]:
    """`n` random ordinary (non-special) token ids, the same for every run."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(first_ordinary, vocab_size, (n,), generator=gen).tolist()


def run_parallel_bench(shape: str, worlds: Sequence[int] = (1, 2, 4), dtype: str = "bfloat16",
                       quantize: str | None = None, layers: int | None = None, prompt: int = 512,
                       steps: int = 64, device: str = "auto", checkpoint_dir: str | Path | None = None,
                       window: int | None = None, seed: int = 0, compile: bool = True,
                       on_run: Callable[[WorldRun], None] | None = None) -> ParallelBenchResult:
    """Greedy decode of one random checkpoint at each world size in `worlds` (see the module's doc).

    The checkpoint goes to a temporary folder (deleted at the end), or to `checkpoint_dir`, which is kept and
    reused by a later call for the same shape (e.g. the int8 run after the bf16 one). `on_run(run)` is told of
    each world as it ends (a long run killed midway still shows the worlds it finished).
    """
    from mistral_chat.bench.run import bench_shape, copy_bandwidth
    from mistral_chat.engine.parallel.launcher import device_type
    from mistral_chat.engine.loader import DTYPES

    config = bench_shape(shape, layers, window)
    dev_type = device_type(device)
    gpus = torch.cuda.device_count() if dev_type == "cuda" else 0
    result = ParallelBenchResult(shape=shape, dtype=dtype, quantize=quantize, layers=config.n_layers,
                                 prompt=prompt, steps=steps, gpus=gpus, compiled=compile and gpus > 0,
                                 device=f"{torch.cuda.get_device_name(0)} x{gpus}" if gpus else "cpu")
    bench_device = torch.device("cuda:0" if dev_type == "cuda" else "cpu")
    result.copy_bandwidth_gbs = copy_bandwidth(bench_device, 1.0 if gpus else 0.05) / 1e9
    context = min(prompt + steps + 8, config.max_seq_len)
    torch_dtype = DTYPES[dtype]
    with ExitStack() as stack:
        if checkpoint_dir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mistral-chat-tp-bench-")))
        else:
            folder = Path(checkpoint_dir)
        started = time.perf_counter()
        result.checkpoint_reused = reusable(folder, config)
        if not result.checkpoint_reused:
            clear_checkpoint(folder)
            write_random_checkpoint(folder, config, torch_dtype, seed, device=bench_device)
        result.write_s = time.perf_counter() - started
        result.checkpoint_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
        num_special = special_count(config.vocab_size)
        ids = prompt_ids(config.vocab_size, prompt, seed, first_ordinary=num_special)
        firsts: dict[int, torch.Tensor | None] = {}
        ref_ids: list[int] | None = None  # the first world that ran is the reference (world 1 when asked for first)
        for world in worlds:
            if gpus and world > gpus:
                result.runs.append(WorldRun(world=world, status="skipped",
                                            note=f"needs {world} GPUs, {gpus} visible"))
                continue
            run_world = _run_world if world == 1 else _run_world_apart
            run, firsts[world] = run_world(folder, world, dev_type, dtype, quantize, context, ids, steps, compile,
                                           ref_ids)
            result.runs.append(run)
            if ref_ids is None and run.status == "ok":
                ref_ids, result.reference_world = run.ids, run.world
            if on_run is not None:
                on_run(run)
    _finish(result, firsts)
    return result


def _finish(result: ParallelBenchResult, firsts: dict[int, torch.Tensor | None]) -> None:
    """Floors from the copy bandwidth; agreement with the reference run (the first world that ran)."""
    bandwidth = result.copy_bandwidth_gbs * 1e9
    for run in result.runs:
        if run.status == "ok" and run.weight_bytes_per_gpu and bandwidth:
            run.floor_ms_per_token = run.weight_bytes_per_gpu / bandwidth * 1000
            run.floor_tokens_per_s = 1000 / run.floor_ms_per_token
            if run.ms_per_token:
                run.floor_pct = 100 * run.floor_ms_per_token / run.ms_per_token
    done = [run for run in result.runs if run.status == "ok"]
    if not done:
        return
    ref = next(run for run in done if run.world == result.reference_world)
    for run in done:
        _compare(run, ref, firsts.get(run.world), firsts.get(ref.world))


# ---- output ----------------------------------------------------------------------------------------------------


def describe_run(run: WorldRun) -> str:
    """One line for a world as soon as it ends (before the table, which needs every world)."""
    if run.status != "ok":
        return f"world {run.world}: {run.status}: {run.note}"
    return (f"world {run.world}: loaded in {run.load_s:.1f} s, warm-up run {run.warmup_s:.1f} s, "
            f"{run.ms_per_token:.2f} ms/token ({run.tokens_per_s:.1f} tokens/s; median of "
            f"{' / '.join(f'{ms:.2f}' for ms in run.timed_ms)}), {run.generated} tokens"
            + (f", the host waiting for the GPU {run.host_wait_pct:.0f}% of the time" if run.host_wait_pct is not None
               else "")
            + (f", all-reduces through {run.all_reduce}" if run.all_reduce else "")
            + (f", reference's argmax at {_percent(run.forced_same_fraction)} of its tokens (at most "
               f"{run.forced_worst_gap:.3g} below this world's top logit)" if run.forced_same_fraction is not None
               else "")
            + ("" if run.repeatable else "; its greedy runs gave different tokens"))


def format_parallel_table(result: ParallelBenchResult) -> str:
    """The result as text, in the manner of bench.format_table."""
    lines = [f"{result.shape} ({result.layers} layers, {result.dtype}"
             f"{', ' + result.quantize if result.quantize else ''}) greedy, {result.steps} tokens after a "
             f"{result.prompt}-token prompt, {'compiled (CUDA graphs)' if result.compiled else 'eager'} decode, "
             f"on {result.device}",
             f"copy bandwidth {result.copy_bandwidth_gbs:.0f} GB/s (one device); checkpoint "
             f"{result.checkpoint_gb:.1f} GB " + ("reused" if result.checkpoint_reused else
                                                  f"written in {result.write_s:.0f} s")
             + f"; tokens compared with world {result.reference_world}",
             f"{'world':>5} {'load s':>7} {'warm s':>6} {'TTFT ms':>8} {'ms/tok':>8} {'tokens/s':>9} "
             f"{'GB/GPU/tok':>10} {'floor ms':>8} {'% floor':>7} {'tokens':>6} {'same lead':>9} {'same %':>6} "
             f"{'forced %':>8} {'logit diff':>10}"]
    notes = []
    for r in result.runs:
        if r.status != "ok":
            lines.append(f"{r.world:>5} {r.status}: {r.note}")
            continue
        lines.append(f"{r.world:>5} {r.load_s:>7.1f} {r.warmup_s:>6.1f} {r.ttft_ms:>8.1f} {r.ms_per_token:>8.2f} "
                     f"{r.tokens_per_s:>9.1f} {r.weight_bytes_per_gpu / 1e9:>10.2f} {r.floor_ms_per_token:>8.2f} "
                     f"{r.floor_pct:>6.0f}% {r.generated:>6} {r.same_leading:>9} {100 * r.same_fraction:>5.0f}% "
                     f"{_percent(r.forced_same_fraction):>8} {r.first_logits_max_diff:>10.2e}")
        if r.note:
            notes.append(f"world {r.world}: {r.note}")
        if r.forced_same_fraction is not None and r.forced_same_fraction < 1:
            notes.append(f"world {r.world}: fed world {result.reference_world}'s tokens, its argmax differs at "
                         f"{round((1 - r.forced_same_fraction) * len(r.ids))} of {len(r.ids)} positions; its own "
                         f"top logit beats the reference's token by at most {r.forced_worst_gap:.3g} there")
        if not r.repeatable:
            notes.append(f"world {r.world}: two greedy runs of the same prompt gave different tokens")
        if r.margin_at_divergence is not None:
            own = r.margins[r.same_leading] if r.same_leading < len(r.margins) else float("nan")
            smallest = min(_reference(result).margins, default=float("nan"))
            notes.append(f"world {r.world}: first token unlike world {result.reference_world}'s is number "
                         f"{r.same_leading}; top-1 minus top-2 logit there {r.margin_at_divergence:.3g} in the "
                         f"reference run, {own:.3g} in this one (smallest gap of the reference run {smallest:.3g})")
    return "\n".join(lines + notes)


def _percent(fraction: float | None) -> str:
    return "ref" if fraction is None else f"{100 * fraction:.0f}%"


def _reference(result: ParallelBenchResult) -> WorldRun:
    return next(r for r in result.runs if r.world == result.reference_world and r.status == "ok")


def result_json(result: ParallelBenchResult) -> str:
    return json.dumps(asdict(result), indent=2)


if __name__ == "__main__":
    _child_main(sys.argv[1])
