"""The kernel warm-up (engine/warmup.py): a throwaway one-layer model's first-answer steps compiled while the
weights load. Triton's interpreter compiles nothing, so these check the mechanism on the CPU: the steps launch the
same kernels with the same specialization keys as a session's first answer; the launches of a thread in
`compile_only` become compiles (every configuration of an autotuned kernel, none timed) and no other thread's do;
a failure never breaks loading; nothing runs on the CPU; nothing is left running or held."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tiny_models import checks_env, copy_tokenizer, write_tiny_model

triton = pytest.importorskip("triton")

SAME_KEYS = r"""
import dataclasses
import sys
from pathlib import Path

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

from mistral_chat.engine import decode, speculate, warmup
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.generate import Session
from mistral_chat.engine.loader import LoadedModel, random_model
from mistral_chat.engine.options import SamplingParams
from mistral_chat.engine.plan import choose_plan
from mistral_chat.text.tokenizer import load_tokenizer

# every launch's kernel and its specialization key as Triton computes it for an H100 (constexprs, each integer's
# divisibility by 16 and equality to 1, each pointer's 16-byte alignment), with its launch options
backend = make_backend(GPUTarget("cuda", 90, 32))
binders, seen, interpret = {}, set(), InterpretedFunction.run


def recording(self, *args, grid, warmup, **kwargs):
    binder = binders.get(self.fn)
    if binder is None:
        # the kernel's own jit options (do_not_specialize: integers that take no divisibility or 1 specialization)
        jit = JITFunction(self.fn, **{k: v for k, v in self.kwargs.items() if k.startswith("do_not_specialize")})
        binder = binders[self.fn] = create_function_from_signature(jit.signature, jit.params, backend)
    _, specialization, options = binder(*args, **kwargs)
    seen.add((self.fn.__name__, repr(specialization), repr(sorted(options.items()))))
    return interpret(self, *args, grid=grid, warmup=warmup, **kwargs)


def eager_capture(run, device, pool=None):  # decode.capture without CUDA: the step runs again at every replay
    out = run()

    class Graph:
        def replay(self):
            out.copy_(run())

        def pool(self):
            return None

    return out, Graph()


InterpretedFunction.run = recording
decode.capture = eager_capture
speculate.verify_graphs = lambda model: not model.parallel.enabled and not model.config.num_experts  # one GPU's

kind, quantize, folder = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3])
CONTEXT = 1024  # cache buckets of 256, 512 and 1024 slots: the decode attention's ranges combined by another kernel
cpu = torch.device("cpu")
experts = {"num_experts": 4, "num_experts_per_tok": 2} if kind == "mixtral" else {"sliding_window": 16}
config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=256,
                     **experts)
plan = dataclasses.replace(choose_plan(torch.device("cuda"), torch.float32, 1, quantize), batch_graphs=False)
model = random_model(config, cpu, torch.float32, quantize, plan)  # tensors of their own, as the GPU loader's
loaded = LoadedModel(model=model, tokenizer=load_tokenizer(folder), config=config, path=folder, device=cpu,
                     dtype=torch.float32, quantize=quantize, plan=plan)
session = Session(loaded, context_length=CONTEXT)
session.decode._graphed = decode.GraphedStep(model, session.decode._position)  # as DecodeStep on a GPU
text = "".join(session.generate([1, 5, 9, 14, 3, 22, 7, 5, 9, 14, 3, 22, 7], SamplingParams(max_tokens=10)))
with torch.no_grad():  # decode steps in later cache buckets, a verify step as the answer's speculation runs it
    for position in (len(session.tokens), 300, 700):
        session.decode(torch.tensor([[5]]), position)
    drafts = speculate.automatic_drafts(model, SamplingParams())
    if drafts:
        speculate.VerifyStep(model)(torch.tensor([[5] * (drafts + 1)]), len(session.tokens))
answer = set(seen)

seen.clear()
throwaway = warmup.throwaway_model(config, plan, cpu, torch.float32, quantize, CONTEXT)
steps = warmup.first_answer_steps(throwaway)
with torch.no_grad():
    for step in steps:
        step()
missing = answer - seen
assert not missing, sorted(missing)
print(sorted({name for name, _, _ in answer}), len(answer), len(seen), len(steps), drafts)
print("ok")
"""


@pytest.mark.parametrize("kind,quantize", [("mistral", ""), pytest.param("mistral", "int8", marks=pytest.mark.slow),
                                           pytest.param("mixtral", "", marks=pytest.mark.slow)])
def test_the_steps_launch_every_kernel_of_a_first_answer_with_its_keys(tmp_path, kind, quantize):
    """On one GPU's plan (its kernels run by Triton's interpreter, its CUDA graphs replaced by the eager steps they
    capture), a session's first answer (a 13-token prompt, decode steps, speculation's verify step) launches no
    kernel, nor any specialization of one, that the warm-up's steps on a one-layer throwaway model do not."""
    copy_tokenizer(tmp_path, "v3")
    proc = subprocess.run([sys.executable, "-c", SAME_KEYS, kind, quantize, str(tmp_path)], capture_output=True,
                          text=True, env=checks_env(TRITON_INTERPRET="1"), timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


COMPILES = r"""
import dataclasses
from pathlib import Path
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class Hopper:  # no GPU here: the kernels compile for an H100 (with Triton's own ptxas) and are never launched
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


driver.set_active(Hopper())
from mistral_chat.engine import warmup
from mistral_chat.engine.config import ModelConfig
from mistral_chat.engine.kernels import decode_attention, fused, gemv
from mistral_chat.engine.plan import choose_plan

gemv._gemv_kernel.configs = gemv._gemv_kernel.configs[:2]  # an autotuned kernel, in fewer configurations
cpu = torch.device("cpu")
config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=256,
                     sliding_window=16)
plan = dataclasses.replace(choose_plan(torch.device("cuda"), torch.float32, 1), batch_graphs=False)
steps = warmup.first_answer_steps(warmup.throwaway_model(config, plan, cpu, torch.float32, None, 1024))
counts = []
for _ in range(2):
    with warmup._CountingPool(2) as pool:
        with torch.no_grad(), warmup.compile_only(pool):
            for step in steps:
                step()
    counts.append(pool.submitted)
kernels = (fused._rms_norm_kernel, fused._rope_and_cache_kernel, fused._swiglu_kernel, gemv._gemv_kernel.fn,
           decode_attention._attention_kernel, decode_attention._combine_kernel)
held = {k.fn.__name__: len(k.device_caches[0][0]) for k in kernels}  # Triton's in-process cache of each
cubins = len(list(Path(sys.argv[1]).rglob("*.cubin")))
assert all(held.values()) and sum(held.values()) == counts[0] == cubins, (held, counts, cubins)
assert counts[1] == 0, counts  # the second time every kernel is found compiled
assert not gemv._gemv_kernel.cache  # compiled in both configurations, timed in none
compilers = [m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor"))]
assert not compilers, compilers  # seconds of a start-up (tests/test_start_imports.py)
print(held, counts)
print("ok")
"""


def test_the_warmup_compiles_each_kernel_once_into_tritons_caches(tmp_path):
    """The steps of a one-GPU plan in `compile_only` on a pool (Triton's AsyncCompileMode), compiled for an H100 by
    Triton's own passes and ptxas (a stand-in driver: no GPU here): every kernel, each autotuned configuration
    included, lands in Triton's in-process cache and on disk once; a second pass compiles nothing; neither
    imports torch's compiler."""
    cache = tmp_path / "triton"
    proc = subprocess.run([sys.executable, "-c", COMPILES, str(cache)], capture_output=True, text=True,
                          env=checks_env(TRITON_CACHE_DIR=str(cache)), timeout=600)
    if "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas here")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


@triton.jit
def _plain_kernel(x_ptr, n, B: triton.language.constexpr):
    pass


@triton.autotune(configs=[triton.Config({"B": 16}, num_warps=4), triton.Config({"B": 32}, num_warps=8)], key=["n"])
@triton.jit
def _tuned_kernel(x_ptr, n, B: triton.language.constexpr):
    pass


def test_compile_only_turns_this_threads_launches_into_compiles(monkeypatch):
    """In `compile_only`, a launch from the thread inside it compiles (warmup=True) and an autotuned launch compiles
    each configuration, timing none (its tuning cache stays empty); launches from other threads, and after it,
    run as before, and Triton's own methods are back once no thread is inside."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from mistral_chat.engine import warmup

    if not isinstance(_plain_kernel, JITFunction):
        pytest.skip("Triton's interpreter is on: its kernels are not JITFunctions")
    launches = []

    def launch(self, *args, grid, warmup, **kwargs):  # stands in for Triton's: records the launch
        launches.append((threading.current_thread().name, warmup, kwargs.get("B"), kwargs.get("num_warps")))

    monkeypatch.setattr(JITFunction, "run", launch)
    tuner_run = Autotuner.run
    x = torch.zeros(4)

    def other_thread() -> None:
        _plain_kernel[(1,)](x, 3, B=16)

    with ThreadPoolExecutor(1) as pool, warmup.compile_only(pool):
        _plain_kernel[(1,)](x, 3, B=16)
        _tuned_kernel[(1,)](x, 3)
        helper = threading.Thread(target=other_thread, name="other")
        helper.start()
        helper.join()
    _plain_kernel[(1,)](x, 3, B=16)
    me = threading.current_thread().name
    assert launches == [(me, True, 16, None), (me, True, 16, 4), (me, True, 32, 8), ("other", False, 16, None),
                        (me, False, 16, None)]
    assert not _tuned_kernel.cache  # nothing was timed
    assert JITFunction.run is launch and Autotuner.run is tuner_run


def test_compile_only_stays_installed_while_any_thread_is_inside(monkeypatch):
    from triton.runtime.jit import JITFunction

    from mistral_chat.engine import warmup

    original = JITFunction.run
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with ThreadPoolExecutor(1) as pool, warmup.compile_only(pool):
            inside.set()
            leave.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(30)
    with ThreadPoolExecutor(1) as pool, warmup.compile_only(pool):
        assert JITFunction.run is not original and warmup._REDIRECT.redirected()
    assert JITFunction.run is not original and not warmup._REDIRECT.redirected()  # the other thread is inside
    leave.set()
    holder.join()
    assert JITFunction.run is original


def _tiny_folder(tmp_path):
    return write_tiny_model(tmp_path, "mistral")["native"]


def _warmup_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("kernel-warmup", "kernel-compile"))]


def _logits(loaded) -> torch.Tensor:
    loaded.model.setup_cache(64)
    with torch.no_grad():
        return loaded.model(torch.tensor([[1, 5, 9, 14, 3, 22, 7, 8]]), 0)


def test_a_warmup_runs_its_steps_then_leaves_nothing_behind(tmp_path, monkeypatch):
    """Where it applies (here forced on the CPU), the throwaway model's steps run twice: on the warm-up's thread
    in `compile_only` while the weights load, then for real on the loading thread; afterwards no thread of it
    runs, the throwaway model is freed, and the loaded model computes what it computes without a warm-up."""
    from mistral_chat.engine import warmup
    from mistral_chat.engine.loader import load_model

    folder = _tiny_folder(tmp_path)
    expected = _logits(load_model(folder, device="cpu", dtype="float32"))
    monkeypatch.setattr(warmup, "applies", lambda device, plan, world: True)
    built, runs = [], []
    make, steps_of = warmup.throwaway_model, warmup.first_answer_steps

    def throwaway(*args, **kwargs):
        model = make(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    def steps(model):
        def traced(step):
            def run():
                runs.append((threading.current_thread().name, warmup._REDIRECT.redirected()))
                return step()
            return run
        return [traced(step) for step in steps_of(model)]

    monkeypatch.setattr(warmup, "throwaway_model", throwaway)
    monkeypatch.setattr(warmup, "first_answer_steps", steps)
    loaded = load_model(folder, device="cpu", dtype="float32")
    assert len(runs) == 2 * len(warmup.PREFILL_LENGTHS)  # the CPU's plan decodes eagerly: its prefills alone
    assert runs[0] == ("kernel-warmup", True)
    assert runs[-1] == (threading.current_thread().name, False)
    gc.collect()
    assert len(built) == 1 and built[0]() is None
    assert not _warmup_threads()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["building", "compiling", "running"])
def test_a_failed_warmup_never_breaks_loading(tmp_path, monkeypatch, caplog, where):
    """A warm-up that fails building its model, compiling (its steps on its thread) or running its steps for real
    costs only its time: the model loads and answers, --debug's log says what failed, and no thread of it is
    left."""
    from mistral_chat.engine import warmup
    from mistral_chat.engine.generate import Session
    from mistral_chat.engine.loader import load_model
    from mistral_chat.engine.options import SamplingParams

    monkeypatch.setattr(warmup, "applies", lambda device, plan, world: True)

    def broken(*args, **kwargs):
        if where != "running" or not warmup._REDIRECT.redirected():
            raise RuntimeError("no throwaway model today")

    if where == "building":
        monkeypatch.setattr(warmup, "throwaway_model", broken)
    else:
        monkeypatch.setattr(warmup, "first_answer_steps", lambda model: [broken])
    caplog.set_level(logging.DEBUG, logger="mistral_chat.engine.warmup")
    loaded = load_model(_tiny_folder(tmp_path), device="cpu", dtype="float32")
    assert f"kernel warm-up: {where}" in caplog.text and "no throwaway model today" in caplog.text
    assert not _warmup_threads()
    session = Session(loaded, context_length=64)
    assert "".join(session.generate([1, 5, 9, 14], SamplingParams(max_tokens=4))) is not None
    assert len(session.generated_ids) >= 1


def test_nothing_warms_up_on_the_cpu_or_where_it_cannot(tmp_path, monkeypatch):
    """The CPU (whatever the plan), --tp, a plan without Triton kernels, and a GPU without room for the throwaway
    model beside the weights start no warm-up."""
    from mistral_chat.engine import warmup
    from mistral_chat.engine.config import ModelConfig
    from mistral_chat.engine.loader import load_model
    from mistral_chat.engine.plan import KernelPlan, choose_plan

    started = []
    monkeypatch.setattr(warmup.KernelWarmup, "start", lambda self: started.append(self) or self)
    load_model(_tiny_folder(tmp_path), device="cpu", dtype="float32")
    assert not started
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gpu_plan = choose_plan(cuda, torch.bfloat16, 1)
    assert warmup.applies(cuda, gpu_plan, 1) and not warmup.applies(cpu, gpu_plan, 1)
    assert not warmup.applies(cuda, choose_plan(cuda, torch.bfloat16, 2), 2)
    assert not warmup.applies(cuda, KernelPlan(), 1)
    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=256)
    monkeypatch.setattr(warmup, "applies", lambda device, plan, world: True)
    monkeypatch.setattr(warmup, "free_memory", lambda device: warmup.MARGIN)  # the weights would leave too little
    assert warmup.start_warmup(config, gpu_plan, cpu, torch.float32, None, 64, 1, 1000) is None
    assert not started


def test_the_bench_can_leave_the_warmup_out():
    """bench --startup --no-warmup's run: the loader finds a stand-in that starts nothing, and setting it up
    imports no torch (the run's timeline stays the CLI's)."""
    check = ("import sys\n"
             "from mistral_chat.bench.unwarmed import leave_out_warmup\n"
             "leave_out_warmup()\n"
             "assert 'torch' not in sys.modules\n"
             "from mistral_chat.engine.warmup import start_warmup\n"
             "assert start_warmup(None, None, None, None, None, 0, 1, 0) is None\n"
             "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
