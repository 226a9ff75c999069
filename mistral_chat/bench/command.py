"""`mistral-chat bench` and `python -m mistral_chat.bench`: the command line (typer), without torch until it runs."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

import typer

from mistral_chat.bench.shapes import SHAPES

Shape = Enum("Shape", {name: name for name in sorted(SHAPES)}, type=str)  # what --shape takes


class Dtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Quantize(str, Enum):
    int8 = "int8"
    int4 = "int4"


@dataclass
class BenchArgs:
    """The command's options, as `main_parallel` and `run` read them."""

    shape: str = "mistral-7b"
    layers: int | None = None
    window: int | None = None
    device: str = "auto"
    dtype: str = "bfloat16"
    quantize: str | None = None
    prompt: int = 512
    steps: int = 128
    batch: str = "1,8"
    prefill: str | None = None
    no_compile: bool = False
    vs_hf: bool = False
    plan: str = ""
    json: bool = False
    json_file: str | None = None
    tp: str | None = None
    tp_checkpoint: str | None = None
    startup: bool = False
    no_warmup: bool = False
    batch_mode: bool = False
    requests: int = 256


def _flag(*names: str, help: str) -> Any:
    return typer.Option(False, *names, help=help, metavar="")


def bench_command(
    shape: Shape = typer.Option("mistral-7b", "--shape", metavar="<name>",
                               help=f"The real model shape to build random weights of: {', '.join(sorted(SHAPES))}."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1,
                                         help="Keep only this many layers (e.g. 16 for Mixtral-8x7B on one H100)."),
    window: Optional[int] = typer.Option(None, "--window", min=1, help="Override the sliding window."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: Dtype = typer.Option("bfloat16", "--dtype", help="Weights' dtype."),
    quantize: Optional[Quantize] = typer.Option(None, "--quantize", help="Weight-only int8 or int4."),
    prompt: int = typer.Option(512, "--prompt", min=1, help="Prompt tokens before decoding."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, show_default=False,
                                        help="Decode steps timed (default 128; --batch-mode: tokens an answer, 256)."),
    batch: Optional[str] = typer.Option(None, "--batch", show_default=False,
                                        help="Comma-separated decode batch sizes (default 1,8; --batch-mode: 32,64)."),
    prefill: Optional[str] = typer.Option(None, "--prefill",
                                          help="Comma-separated prefill lengths (default: prompt,2048; empty: none)."),
    no_compile: bool = _flag("--no-compile", help="Time eager decode."),
    vs_hf: bool = _flag("--vs-hf", help="Also time HF transformers on the same shape."),
    plan: str = typer.Option("", "--plan", help="Override the kernel plan to compare implementations, e.g. "
                                                "gemv=triton,attention=torch (fields: see docs/engine.md)."),
    json_output: bool = _flag("--json", help="Print JSON instead of a table."),
    json_file: Optional[str] = typer.Option(None, "--json-file", help="Also write the JSON to this file."),
    tp: Optional[str] = typer.Option(None, "--tp", help="Comma-separated world sizes, e.g. 1,2,4: write one random "
                                                        "checkpoint and compare greedy tokens and decode speed of "
                                                        "single-GPU and tensor-parallel runs (uses --shape --layers "
                                                        "--window --dtype --quantize --prompt --steps --device)."),
    tp_checkpoint: Optional[str] = typer.Option(None, "--tp-checkpoint",
                                                help="With --tp, --startup or --batch-mode: keep the random checkpoint "
                                                     "in this folder (reused by a later run of the same shape) instead "
                                                     "of a temporary one."),
    startup: bool = _flag("--startup", help="Time launch -> first token and launch -> full speed of `mistral-chat "
                                            "--prompt` in fresh processes, with an empty and a warm compile cache "
                                            "(and --no-compile too if given); --steps tokens an answer."),
    no_warmup: bool = _flag("--no-warmup", help="With --startup: also a run with an empty compile cache and the "
                                                "engine's kernel warm-up left out (what the warm-up saves)."),
    batch_mode: bool = _flag("--batch-mode", help="Answer --requests chat requests end to end as `mistral-chat batch` "
                                                  "does at each --batch size (and as `serve` does, from as many "
                                                  "clients as the first size), next to raw decode (and --vs-hf)."),
    requests: int = typer.Option(256, "--requests", min=1, help="With --batch-mode: requests to answer."),
) -> int:
    """Time prefill and decode on random weights of a real model shape, next to the bandwidth floor."""
    args = BenchArgs(shape=shape.value, layers=layers, window=window, device=device, dtype=dtype.value,
                     quantize=quantize.value if quantize else None, prompt=prompt,
                     steps=steps or (256 if batch_mode else 128), batch=batch or ("32,64" if batch_mode else "1,8"),
                     prefill=prefill, no_compile=no_compile, vs_hf=vs_hf, plan=plan, json=json_output,
                     json_file=json_file, tp=tp, tp_checkpoint=tp_checkpoint, startup=startup,
                     no_warmup=no_warmup, batch_mode=batch_mode, requests=requests)
    if batch_mode:
        from mistral_chat.bench.batch_mode import run_batch_mode

        return run_batch_mode(args)
    if startup:
        from mistral_chat.bench.startup import run_startup

        return run_startup(args)
    from mistral_chat.bench.run import run

    return run(args)


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = [0]
    if any(v < 1 for v in values):
        raise typer.BadParameter(f"{text!r}: give positive whole numbers separated by commas, e.g. 1,8",
                                 param_hint=f"'{option}'")
    return values


def parse_plan(text: str) -> dict[str, str]:
    """--plan KEY=VALUE,KEY=VALUE as a dict."""
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{text!r}: give KEY=VALUE pairs, e.g. gemv=triton", param_hint="'--plan'")
        overrides[key.strip()] = value.strip()
    return overrides


def parse_worlds(text: str) -> tuple[int, ...]:
    try:
        worlds = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        worlds = ()
    if not worlds or min(worlds) < 1:
        raise typer.BadParameter(f"{text!r}: give world sizes like 1,2,4", param_hint="'--tp'")
    return worlds


def main(argv: list[str] | None = None) -> int:
    """`python -m mistral_chat.bench [OPTIONS]`: the same command as `mistral-chat bench`, with the same errors."""
    from mistral_chat.cli.runner import Command, run_app

    app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
    app.command(cls=Command)(bench_command)
    args = sys.argv[1:] if argv is None else argv
    return run_app(app, list(args), "mistral-chat bench", debug="--debug" in args)
