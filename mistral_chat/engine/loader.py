"""Load a model folder: config, tokenizer and weights, on the chosen device and dtype."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mistral_chat.engine.config import ModelConfig, load_config
from mistral_chat.engine.memory import check_fits, estimate_memory, free_memory, session_context
from mistral_chat.engine.model import Transformer
from mistral_chat.engine.parallel.collectives import enable_fast_all_reduce
from mistral_chat.engine.parallel.sharding import Parallel, check_tensor_parallel
from mistral_chat.engine.plan import KernelPlan, choose_plan
from mistral_chat.engine.weights import CheckpointReader, Convert, checkpoint_state, plain_convert
from mistral_chat.errors import DeviceError, MistralChatError, TokenizerError
from mistral_chat.text.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    """A model ready to generate: weights on their device, its tokenizer and its shape."""

    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0
    quantize: str | None = None
    compile: bool = False  # sessions compile decode into CUDA graphs (see decode.py): the plan's compile_decode
    lora: Path | None = None  # the LoRA adapter merged into the weights, if any
    plan: KernelPlan = KernelPlan()  # the implementations the model runs (plan.py)

    @property
    def name(self) -> str:
        return self.path.name

    def enable_fast_all_reduce(self) -> None:
        """Under --tp, set up the plan's all-reduce kernel (every rank, after loading); the plan then says which
        kernel carries the all-reduces (c10d where symmetric memory failed)."""
        used = enable_fast_all_reduce(self.model.parallel, self.device, self.dtype, self.plan.all_reduce)
        self.plan = dataclasses.replace(self.plan, all_reduce=used)


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: torch.OutOfMemoryError on GPUs, a RuntimeError from the CPU allocator, MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{device}' asked for, but no CUDA GPU is usable here: use --device cpu, "
                              "or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} "
                              "GPU(s), numbered from 0")
    elif dev.type != "cpu":
        raise DeviceError(f"device '{device}' is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that have it (float16 on older ones); on CPU, the checkpoint's own dtype."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise DeviceError(f"unknown dtype '{dtype}': use auto, bfloat16, float16 or float32")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def load_model(path: Path | str, device: str = "auto", dtype: str = "auto", parallel: Parallel | None = None,
               progress: Callable[[int, int], None] | None = None, quantize: str | None = None,
               compile: bool = False, context_length: int | None = None, lora: Path | str | None = None,
               lora_scale: float = 1.0, plan_overrides: dict[str, str] | None = None) -> LoadedModel:
    """Read a native or Hugging Face model folder onto `device`; MistralChatError on anything a user can fix.

    The kernel plan is chosen here, once (plan.choose_plan); `plan_overrides` replaces some of its choices (the
    benchmark's --plan KEY=VALUE, to compare implementations).

    `lora`: a mistral-finetune adapter (lora.safetensors, or its folder) merged into the weights while they load,
    its update multiplied by the adapter's own scaling times `lora_scale` (see lora.py).
    """
    started = time.perf_counter()
    path = Path(path).expanduser()
    config = load_config(path)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
                             f"{config.vocab_size}: the tokenizer file belongs to another model")
    parallel = parallel or Parallel()
    _check_parallel(config, parallel)
    if config.quantization == "awq":  # already int4 (awq.py)
        from mistral_chat.engine.awq import check_load

        quantize = check_load(path.name, quantize, parallel.enabled, lora is not None)
    dev = resolve_device(device)
    reader = CheckpointReader(path, config.checkpoint_format, dev)
    target = resolve_dtype(dtype, dev, reader.stored_dtype())
    context = session_context(config, context_length)
    estimate = estimate_memory(config, target, context, quantize=quantize, world=parallel.world)
    check_fits(estimate, free_memory(dev), dev, path.name, quantize, parallel.world, context)
    plan = choose_plan(dev, target, parallel.world, quantize, compile)
    if plan_overrides:
        try:
            plan = plan.with_overrides(plan_overrides, dev)
        except ValueError as exc:
            raise MistralChatError(f"{exc}: see docs/engine.md for the plan's fields") from exc
    log.info("loading %s (%s, %s) on %s as %s", path, config.architecture, config.checkpoint_format, dev, target)
    log.info("%s", plan.describe())
    adapter = None
    if lora is not None:
        from mistral_chat.engine.lora import load_adapter

        adapter = load_adapter(Path(lora), config, scale=lora_scale, device=dev)
    from mistral_chat.engine.warmup import start_warmup  # here: it imports generate, which imports this module

    # the first answer's Triton kernels, compiled on other threads while the weights load (warmup.py)
    warmup = start_warmup(config, plan, dev, target, quantize, context, parallel.world, estimate.weights)
    try:
        convert = plain_convert(dev, target)
        with torch.device("meta"):
            try:
                model = Transformer(config, parallel, plan)
                if config.quantization == "awq":
                    from mistral_chat.engine.awq import AwqReader, prepare_awq

                    convert, reader = prepare_awq(model, dev, target), AwqReader(reader)
                elif quantize is not None:
                    convert = prepare_quantized(model, quantize, dev, target)
            except ValueError as exc:  # a plan override that cannot work for this model
                raise MistralChatError(f"{exc}: see docs/engine.md for the plan's fields") from exc
        try:
            state = checkpoint_state(reader, config, parallel, convert, progress, adapter=adapter)
        finally:
            reader.close()
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model.eval().requires_grad_(False)
        if warmup is not None:
            warmup.finish()  # the autotuned kernels timed, now that the GPU is quiet; the throwaway model freed
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        gb = config.parameter_count() * torch.finfo(target).bits / 8 / parallel.world / 1e9
        raise DeviceError(f"out of memory on {dev} loading {path.name} (~{gb:.1f} GB of weights): "
                          "try --quantize int8, --tp N with more GPUs, or a smaller model") from exc
    finally:
        if warmup is not None:
            warmup.close()  # a failed load: its threads stopped and joined, its memory freed
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, path=path, device=dev, dtype=target,
                       load_seconds=time.perf_counter() - started, quantize=quantize,
                       compile=plan.compile_decode, lora=None if adapter is None else adapter.path, plan=plan)


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, quantize: str | None = None,
                 plan: KernelPlan | None = None, compile: bool = False) -> Transformer:
    """A model of `config`'s shape with random weights made on the device, tensor by tensor (benchmarks and tests:
    no checkpoint to read). `plan`: by default the one `load_model` would choose."""
    plan = plan or choose_plan(device, dtype, 1, quantize, compile)
    with torch.device("meta"):
        model = Transformer(config, plan=plan)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    convert = plain_convert(device, dtype)
    if quantize:
        with torch.device("meta"):
            convert = prepare_quantized(model, quantize, device, dtype)
    load_random(model, shapes, convert, device, dtype)
    return model


def load_random(model: Transformer, shapes: dict[str, torch.Size], convert: Convert, device: torch.device,
                dtype: torch.dtype, embedding_row: bool = False) -> None:
    """Random weights of `shapes` (the skeleton's float shapes) made on the device tensor by tensor (std 0.02,
    norms 1, a generator seeded with 0), converted by `convert` and loaded into the meta skeleton `model`.
    `embedding_row`: the embedding one row broadcast to the vocabulary (a model whose tokens do not matter)."""
    state: dict[str, torch.Tensor] = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes.items():
        if embedding_row and name == "tok_embeddings.weight":
            t = torch.zeros(1, shape[1], device=device, dtype=dtype).expand(shape)
        elif "norm" in name:
            t = torch.ones(shape, device=device, dtype=dtype)
        else:
            t = torch.randn(shape, device=device, dtype=dtype, generator=gen) * 0.02
        state.update(convert(name, t))
        del t
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)


def prepare_quantized(model: Transformer, mode: str, device: torch.device, dtype: torch.dtype) -> Convert:
    """The skeleton `model` (meta) laid out for `mode`'s weights, and the load-time conversion into them."""
    from mistral_chat.engine.quant import QUANT_MODES, int4_convert, int8_convert, prepare_int4, prepare_int8

    if mode not in QUANT_MODES:
        raise MistralChatError(f"unknown --quantize '{mode}': use one of {', '.join(QUANT_MODES)}")
    if mode == "int4":
        return int4_convert(device, dtype, prepare_int4(model, dtype))
    prepare_int8(model, dtype)
    return int8_convert(device, dtype)


def _check_parallel(config: ModelConfig, parallel: Parallel) -> None:
    if parallel.enabled:
        check_tensor_parallel(parallel.world, config.n_heads, config.n_kv_heads, config.hidden_dim,
                              config.vocab_size)
