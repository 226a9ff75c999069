"""The options the chat, one-shot and batch commands share, declared once (typer), and their values as the
engine's `SamplingParams` and `LoadOptions`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mistral_chat.engine.options import MAX_SPECULATE, LoadOptions, SamplingParams
from mistral_chat.errors import MistralChatError

SEED_MAX = 2**64 - 1  # torch's generator takes a 64-bit seed

MODEL = typer.Option(None, "--model", "-m", help="Model folder, alias or repo id (default: the last used).")
MAX_TOKENS = typer.Option(1024, "--max-tokens", "-n", min=1, help="Most tokens to generate.")
TEMPERATURE = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 is greedy.")
TOP_P = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
TOP_K = typer.Option(0, "--top-k", min=0, help="Sample among the k likeliest tokens (0: all).")
SEED = typer.Option(None, "--seed", min=0, max=SEED_MAX, help="Seed for sampling.")
MIN_P = typer.Option(0.0, "--min-p", min=0.0, max=0.99,
                     help="Drop tokens less likely than this fraction of the likeliest.")
REPETITION_PENALTY = typer.Option(1.0, "--repetition-penalty", min=0.01,
                                  help="> 1 discourages tokens already in the prompt or answer.")
PRESENCE_PENALTY = typer.Option(0.0, "--presence-penalty",
                                help="Subtracted from the logits of tokens already in the answer.")
STOP = typer.Option(None, "--stop", help="End the answer before this text (repeat for several).")
SPECULATE = typer.Option(None, "--speculate", min=0, max=MAX_SPECULATE, show_default=False,
                         help="Draft up to N tokens by finding the answer's last words earlier in the conversation "
                              "and check them in one step (0: off): faster where text repeats. Default: 4 on one "
                              "GPU for dense models, off elsewhere. Off with penalties and under --tp; `batch` "
                              "ignores it.")
LORA = typer.Option(None, "--lora", help="Merge a LoRA adapter (lora.safetensors or its folder) at load time.")
LORA_SCALE = typer.Option(1.0, "--lora-scale", help="Multiplies the adapter's own scaling.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DTYPE = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32.")
CONTEXT = typer.Option(None, "--context", min=16,
                       help="Context length in tokens (default: the model's, at most 32768).")
QUANTIZE = typer.Option(None, "--quantize", "-q", help="int8 or int4: weight-only quantization at load time (int8: "
                                                        "half the weight memory; int4: about a quarter).")


def sampling_params(temperature: float, top_p: float, top_k: int, max_tokens: int, seed: Optional[int],
                    min_p: float, repetition_penalty: float, presence_penalty: float,
                    stop: Optional[list[str]], speculate: Optional[int] = None) -> SamplingParams:
    """The sampling options as the engine's parameters; one line for a value their ranges let through."""
    try:
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
                              min_p=min_p, repetition_penalty=repetition_penalty,
                              presence_penalty=presence_penalty, stop=tuple(stop or ()), speculate=speculate)
    except ValueError as exc:  # e.g. --top-p 0
        raise MistralChatError(f"{exc}: change that option") from None


def load_options(device: str, dtype: str, context: Optional[int], quantize: Optional[str], lora: Optional[Path],
                 lora_scale: float, tp: int, compile: bool = True) -> LoadOptions:
    return LoadOptions(device=device, dtype=dtype, context_length=context, quantize=quantize, compile=compile,
                       lora=lora, lora_scale=lora_scale, tp=tp)
