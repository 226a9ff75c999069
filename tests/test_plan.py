"""The kernel plan (engine/plan.py): which implementation each piece of the model runs, chosen once at load from
the device, the dtype, the tensor-parallel world, int8 and --no-compile; the benchmark's overrides; the loader
handing it to the model; and no other MISTRAL_CHAT_* variable left to read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mistral_chat.engine import plan as plan_module
from mistral_chat.engine.int4 import packed_matmul_available
from mistral_chat.engine.plan import KernelPlan, choose_plan

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a CUDA device object needs no GPU
PLAIN = KernelPlan()


@pytest.fixture
def triton_here(monkeypatch):
    """Triton importable (the plan only asks whether it is), no MISTRAL_CHAT_KERNELS, not interpreted."""
    monkeypatch.setattr(plan_module, "triton", object())
    monkeypatch.setattr(plan_module, "INTERPRETED", False)
    monkeypatch.delenv("MISTRAL_CHAT_KERNELS", raising=False)


def test_the_default_plan_is_plain_pytorch():
    assert PLAIN == KernelPlan(fused=False, attention="torch", gemv="torch", int8="torch", moe="torch",
                               norms_in_products=False, all_reduce="none", compile_decode=False)


def test_on_the_cpu_the_kernels_run_only_in_tritons_interpreter(triton_here, monkeypatch):
    for world in (1, 2):
        for dtype in (torch.float32, torch.bfloat16):
            got = choose_plan(CPU, dtype, world, compile=True)  # never compiled on the CPU
            # int8 and int4 with bf16: torch's CPU int8 / packed int4 matmuls where this torch has them
            int4 = "packed" if dtype == torch.bfloat16 and packed_matmul_available() else "torch"
            int8 = "packed" if dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int8pack_mm") else "torch"
            assert got == KernelPlan(all_reduce="c10d" if world > 1 else "none", int8=int8, int4=int4), (world, got)
    monkeypatch.setattr(plan_module, "INTERPRETED", True)  # TRITON_INTERPRET=1, as the kernel tests run
    kernels = dict(fused=True, attention="triton", int8="triton", int4="triton", int4_experts="triton")
    assert choose_plan(CPU, torch.float32) == KernelPlan(**kernels)
    assert choose_plan(CPU, torch.float32, 2) == KernelPlan(
        **kernels, gemv="triton", moe="triton", norms_in_products=True,
        all_reduce="c10d")  # no symmetric memory off the GPU
    monkeypatch.setenv("MISTRAL_CHAT_KERNELS", "0")  # the escape hatch wins
    assert choose_plan(CPU, torch.float32) == PLAIN
    assert choose_plan(CPU, torch.float32, 2) == KernelPlan(all_reduce="c10d")
    monkeypatch.delenv("MISTRAL_CHAT_KERNELS")
    monkeypatch.setattr(plan_module, "triton", None)  # a CPU-only torch without Triton
    assert choose_plan(CPU, torch.float32) == PLAIN


def test_one_gpu_runs_every_kernel_and_graphs_the_eager_decode_step(triton_here):
    """One GPU: the --tp kernels (GEMV, experts, norms inside the products; not for quantized products) and decode
    captured in CUDA graphs (one sequence's and continuous batching's), never compiled (compile matters only under
    --tp)."""
    rows = dict(fused=True, attention="triton", gemv="triton", int8="triton", int4="triton", moe="triton",
                int4_experts="triton", decode_graphs=True, batch_graphs=True)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for compile in (True, False):
            got = choose_plan(CUDA, dtype, 1, compile=compile)
            assert got == KernelPlan(**rows, norms_in_products=True), (dtype, got)
    for quantize in ("int8", "int4"):
        assert choose_plan(CUDA, torch.bfloat16, 1, quantize) == KernelPlan(**rows)


def test_tensor_parallel_gpus_take_the_row_kernels_and_the_fast_all_reduce(triton_here, monkeypatch):
    rows = dict(fused=True, attention="triton", gemv="triton", int8="triton", int4="triton", moe="triton",
                int4_experts="triton")
    assert choose_plan(CUDA, torch.bfloat16, 2) == KernelPlan(**rows, norms_in_products=True, all_reduce="lamport")
    assert choose_plan(CUDA, torch.float32, 2) == KernelPlan(**rows, norms_in_products=True, all_reduce="symmetric")
    assert choose_plan(CUDA, torch.float16, 2) == KernelPlan(**rows, norms_in_products=True, all_reduce="c10d")
    # int8: the norms stay outside the (int8) products
    assert choose_plan(CUDA, torch.bfloat16, 4, "int8") == KernelPlan(**rows, all_reduce="lamport")
    assert choose_plan(CUDA, torch.bfloat16, 2, compile=True).compile_decode
    assert not choose_plan(CUDA, torch.bfloat16, 2, compile=False).compile_decode
    monkeypatch.setenv("MISTRAL_CHAT_KERNELS", "0")  # plain PyTorch, all-reduces through c10d (NCCL)
    assert choose_plan(CUDA, torch.bfloat16, 2, compile=True) == KernelPlan(all_reduce="c10d", compile_decode=True)
    assert choose_plan(CUDA, torch.float32, 2) == KernelPlan(all_reduce="c10d")
    # plain PyTorch, in CUDA graphs
    assert choose_plan(CUDA, torch.bfloat16, 1) == KernelPlan(decode_graphs=True, batch_graphs=True)


def test_overrides_replace_fields_from_strings(triton_here, monkeypatch):
    base = KernelPlan(fused=True, attention="triton")
    got = base.with_overrides({"gemv": "triton", "fused": "0", "norms_in_products": "true", "all_reduce": "c10d"},
                              CUDA)
    assert got == KernelPlan(attention="triton", gemv="triton", norms_in_products=True, all_reduce="c10d")
    assert base == KernelPlan(fused=True, attention="triton")  # frozen: a new plan
    assert base.with_overrides({}, CUDA) == base
    assert base.with_overrides({"compile_decode": "1"}, CUDA).compile_decode
    assert not base.with_overrides({"fused": "false"}, CUDA).fused
    with pytest.raises(ValueError, match="unknown plan field 'kernel': use one of fused, attention"):
        base.with_overrides({"kernel": "triton"}, CUDA)
    with pytest.raises(ValueError, match="plan attention=cuda is not one of triton, torch"):
        base.with_overrides({"attention": "cuda"}, CUDA)
    with pytest.raises(ValueError, match="plan fused takes 0/1 or true/false, not 'yes'"):
        base.with_overrides({"fused": "yes"}, CUDA)
    with pytest.raises(ValueError, match="plan all_reduce=nccl is not one of none, lamport, symmetric, c10d"):
        base.with_overrides({"all_reduce": "nccl"}, CUDA)
    with pytest.raises(ValueError, match="norms_in_products needs gemv=triton"):
        base.with_overrides({"norms_in_products": "1"}, CUDA)
    # taking the kernel away takes the norms out of the products too, unless they are asked for
    assert KernelPlan(gemv="triton", norms_in_products=True).with_overrides({"gemv": "torch"}, CUDA) == KernelPlan()
    with pytest.raises(ValueError, match="norms_in_products needs gemv=triton"):
        KernelPlan(gemv="triton").with_overrides({"gemv": "torch", "norms_in_products": "1"}, CUDA)


def test_a_plan_the_model_cannot_run_is_refused():
    """norms_in_products needs the experts' kernels in a Mixtral model, and float weights."""
    from mistral_chat.engine.config import ModelConfig
    from mistral_chat.engine.model import Transformer
    from mistral_chat.engine.quant import prepare_int8

    moe = ModelConfig(dim=64, n_layers=1, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                      num_experts=4, num_experts_per_tok=2)
    fused = KernelPlan(gemv="triton", moe="triton", norms_in_products=True)
    with torch.device("meta"):
        Transformer(moe, plan=fused)
        with pytest.raises(ValueError, match="needs moe=triton"):
            Transformer(moe, plan=KernelPlan(gemv="triton", norms_in_products=True))
        with pytest.raises(ValueError, match="needs float weights"):
            prepare_int8(Transformer(moe.with_(num_experts=0, num_experts_per_tok=0), plan=fused), torch.bfloat16)


def test_overrides_give_kernels_only_where_they_run(triton_here, monkeypatch):
    assert PLAIN.with_overrides({"all_reduce": "c10d", "compile_decode": "1"}, CPU).all_reduce == "c10d"
    for overrides in ({"fused": "1"}, {"attention": "triton"}, {"gemv": "triton"}, {"int8": "triton"},
                      {"int4": "triton"}, {"moe": "triton"}):
        with pytest.raises(ValueError, match="the plan's Triton kernels cannot run on cpu"):
            PLAIN.with_overrides(overrides, CPU)
        assert PLAIN.with_overrides(overrides, CUDA) != PLAIN
    # a plan that keeps its kernels is refused too where they cannot run (MISTRAL_CHAT_KERNELS=0)
    gpu = choose_plan(CUDA, torch.bfloat16, 2)
    monkeypatch.setenv("MISTRAL_CHAT_KERNELS", "0")
    with pytest.raises(ValueError, match="cannot run on cuda"):
        gpu.with_overrides({"all_reduce": "c10d"}, CUDA)
    assert PLAIN.with_overrides({"all_reduce": "c10d"}, CUDA).all_reduce == "c10d"
    monkeypatch.delenv("MISTRAL_CHAT_KERNELS")
    monkeypatch.setattr(plan_module, "INTERPRETED", True)  # TRITON_INTERPRET=1: the CPU runs them
    assert PLAIN.with_overrides({"gemv": "triton"}, CPU).gemv == "triton"


def test_int4_packed_runs_only_on_the_cpu_with_torchs_packed_matmul(monkeypatch):
    monkeypatch.setattr(plan_module, "INTERPRETED", False)
    with pytest.raises(ValueError, match="plan int4=packed runs on the CPU only"):
        PLAIN.with_overrides({"int4": "packed"}, CUDA)
    with pytest.raises(ValueError, match="plan int4=int4pack is not one of triton, packed, torch"):
        PLAIN.with_overrides({"int4": "int4pack"}, CPU)
    if packed_matmul_available():
        assert PLAIN.with_overrides({"int4": "packed"}, CPU).int4 == "packed"
    monkeypatch.setattr(plan_module, "packed_matmul_available", lambda: False)  # an older torch
    with pytest.raises(ValueError, match="plan int4=packed runs on the CPU only, with torch's packed int4 matmul"):
        PLAIN.with_overrides({"int4": "packed"}, CPU)
    assert choose_plan(CPU, torch.bfloat16).int4 == "torch"
    with pytest.raises(ValueError, match="plan int8=packed runs on the CPU only"):
        PLAIN.with_overrides({"int8": "packed"}, CUDA)


def test_describe_names_every_field():
    assert PLAIN.describe() == ("kernel plan: fused=False attention=torch gemv=torch int8=torch int4=torch "
                                "moe=torch int4_experts=torch norms_in_products=False all_reduce=none "
                                "compile_decode=False decode_graphs=False batch_graphs=False")
    assert "gemv=triton" in KernelPlan(gemv="triton").describe()
    assert PLAIN.with_overrides({"batch_graphs": "1"}, CUDA).batch_graphs
    with pytest.raises(ValueError, match="plan batch_graphs needs a CUDA GPU"):
        PLAIN.with_overrides({"batch_graphs": "1"}, CPU)


def test_the_model_hands_the_plan_to_its_modules():
    from mistral_chat.engine.config import ModelConfig
    from mistral_chat.engine.kernels.gemv import Linear
    from mistral_chat.engine.model import Attention, RMSNorm, Transformer
    from mistral_chat.engine.moe import MoEFeedForward

    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=200,
                         num_experts=4, num_experts_per_tok=2)
    for plan in (PLAIN, KernelPlan(fused=True, attention="triton", gemv="triton", moe="triton")):
        with torch.device("meta"):
            model = Transformer(config, plan=plan)
        assert model.plan is plan
        modules = list(model.modules())
        assert all(m.kernel == plan.fused for m in modules if isinstance(m, RMSNorm))
        assert all(m.plan is plan for m in modules if isinstance(m, Attention))
        assert all(m.row_kernel == (plan.gemv == "triton") and m.fused == plan.fused
                   for m in modules if isinstance(m, Linear))
        assert all(m.row_kernel == (plan.moe == "triton") and m.fused == plan.fused
                   for m in modules if isinstance(m, MoEFeedForward))


def test_random_models_take_the_loaders_plan_by_default(monkeypatch):
    from mistral_chat.engine.config import ModelConfig
    from mistral_chat.engine.loader import random_model

    config = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=100)
    monkeypatch.setattr(plan_module, "INTERPRETED", True)
    monkeypatch.delenv("MISTRAL_CHAT_KERNELS", raising=False)
    model = random_model(config, CPU, torch.float32)
    assert model.plan == choose_plan(CPU, torch.float32) and model.plan.fused == (plan_module.triton is not None)
    assert random_model(config, CPU, torch.float32, plan=PLAIN).plan is PLAIN


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("plan"), "mistral")["native"]


def test_load_model_chooses_the_plan_and_takes_overrides(tiny, monkeypatch):
    from mistral_chat.engine.loader import load_model
    from mistral_chat.engine.quant import Int8Linear
    from mistral_chat.errors import MistralChatError

    monkeypatch.setattr(plan_module, "INTERPRETED", False)
    monkeypatch.delenv("MISTRAL_CHAT_KERNELS", raising=False)
    loaded = load_model(tiny, device="cpu", dtype="float32", compile=True)
    assert loaded.plan == PLAIN and loaded.model.plan is loaded.plan and not loaded.compile
    loaded = load_model(tiny, device="cpu", dtype="float32", plan_overrides={"all_reduce": "none"})
    assert loaded.plan == PLAIN
    with pytest.raises(MistralChatError, match="unknown plan field 'gemm'.*docs/engine.md"):
        load_model(tiny, device="cpu", dtype="float32", plan_overrides={"gemm": "triton"})
    with pytest.raises(MistralChatError, match="Triton kernels cannot run on cpu"):
        load_model(tiny, device="cpu", dtype="float32", plan_overrides={"fused": "1"})
    monkeypatch.setattr(plan_module, "INTERPRETED", True)  # as under TRITON_INTERPRET=1 (nothing runs here)
    if plan_module.triton is None:
        pytest.skip("no Triton here")
    loaded = load_model(tiny, device="cpu", dtype="float32", quantize="int8",
                        plan_overrides={"int8": "torch", "attention": "torch"})
    assert loaded.plan == KernelPlan(fused=True, int4="triton", int4_experts="triton")
    assert loaded.model.plan is loaded.plan
    int8 = [m for m in loaded.model.modules() if isinstance(m, Int8Linear)]
    assert int8 and all(m.fused and not m.kernel for m in int8)
    assert loaded.model.norm.kernel and loaded.model.layers[0].attention.plan is loaded.plan


# the variables the package may read: the data folder, tracebacks, the kernels' escape hatch, and the device rank 0
# tells the followers it spawns
ALLOWED = {"MISTRAL_CHAT_HOME", "MISTRAL_CHAT_DEBUG", "MISTRAL_CHAT_KERNELS", "MISTRAL_CHAT_TP_DEVICE"}


def test_no_other_mistral_chat_variable_is_read():
    package = Path(__file__).resolve().parent.parent / "mistral_chat"
    found: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for name in re.findall(r"MISTRAL_CHAT_[A-Z_]+", text):
            found.setdefault(name, set()).add(str(path.relative_to(package)))
    assert "MISTRAL_CHAT_HOME" in found and "MISTRAL_CHAT_KERNELS" in found  # the scan sees the package
    assert {name: files for name, files in found.items() if name not in ALLOWED} == {}
