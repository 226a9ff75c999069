"""`mistral-chat serve`: the OpenAI chat API on 127.0.0.1 (or --host), answered by one model with continuous
batching. Needs the `serve` extra (`pip install 'mistral-chat[serve]'`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from mistral_chat.cli import options as opt
from mistral_chat.errors import MistralChatError

INSTALL_HINT = "the server needs starlette and uvicorn: install mistral-chat[serve] (pip install 'mistral-chat[serve]')"


def serve_command(
    model: Optional[str] = opt.MODEL,
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on (0.0.0.0: every interface; then set --api-key)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key",
                                          help="Require 'Authorization: Bearer KEY' on every request."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1,
                                             help="Requests answered at once (default: as many as memory allows, "
                                                  "at most 64)."),
    max_tokens: int = opt.MAX_TOKENS,
    temperature: float = opt.TEMPERATURE,
    top_p: float = opt.TOP_P,
    top_k: int = opt.TOP_K,
    seed: Optional[int] = opt.SEED,
    min_p: float = opt.MIN_P,
    repetition_penalty: float = opt.REPETITION_PENALTY,
    presence_penalty: float = opt.PRESENCE_PENALTY,
    stop: Optional[list[str]] = opt.STOP,
    device: str = opt.DEVICE,
    dtype: str = opt.DTYPE,
    context: Optional[int] = opt.CONTEXT,
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel processes, one per GPU."),
    quantize: Optional[str] = opt.QUANTIZE,
    lora: Optional[Path] = opt.LORA,
    lora_scale: float = opt.LORA_SCALE,
) -> None:
    """Serve the OpenAI chat API (/v1/chat/completions, /v1/completions, /v1/models) on 127.0.0.1:8000."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise MistralChatError(INSTALL_HINT) from None
    defaults = opt.sampling_params(temperature, top_p, top_k, max_tokens, seed, min_p, repetition_penalty,
                                   presence_penalty, stop)
    from mistral_chat.api import Model
    from mistral_chat.serve.app import create_app

    _say("loading the model...")
    with Model.load(model, device=device, dtype=dtype, quantize=quantize, context=context, tp=tp, lora=lora,
                    lora_scale=lora_scale, compile=tp > 1) as loaded:
        app = create_app(loaded, api_key=api_key, defaults=defaults, batch_size=batch_size)
        shown = f"[{host}]" if ":" in host else host
        _say(f"serving {loaded.name} at http://{shown}:{port}/v1 ({loaded.device}, {loaded.dtype})"
             + ("" if api_key else ", no API key") + "; Ctrl-C finishes the requests in flight and stops")
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=None,
                                lifespan="on")
        server = uvicorn.Server(config)
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            server.started = False
        if not server.started:
            raise MistralChatError(f"cannot listen on {host}:{port} (in use, or not an address of this machine): "
                                   "pick another --port or --host")
    _say("stopped")


def _say(text: str) -> None:
    print(f"mistral-chat: {text}", file=sys.stderr, flush=True)


def register(app: Any) -> None:
    app.command("serve")(serve_command)
