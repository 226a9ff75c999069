"""One-shot answers for shell pipelines: the completion streams to stdout, everything else to stderr."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from mistral_chat.chat.templates import ChatMessage, encode_conversation
from mistral_chat.engine.generate import GenerationStats, Session
from mistral_chat.engine.sampling import SamplingParams
from mistral_chat.errors import MistralChatError, ModelNotFoundError

if TYPE_CHECKING:
    from mistral_chat.cli import RunOptions


def read_prompt(prompt: str | None, stdin: TextIO) -> str:
    """--prompt, piped stdin, or both (stdin after the prompt, as `llm` and `ollama run` do)."""
    piped = None if stdin.isatty() else stdin.read()
    if prompt is None and piped is None:
        raise MistralChatError("no prompt: pass --prompt TEXT or pipe text into mistral-chat")
    if prompt is None:
        return piped or ""
    if piped:
        return f"{prompt}\n\n{piped}"
    return prompt


def resolve_model_path(name: str | None) -> "str":
    from mistral_chat.models.store import last_used_model, mark_used, resolve_model

    if name is None:
        name = last_used_model()
        if name is None:
            raise ModelNotFoundError("no model given and none used before: pass --model PATH_OR_NAME, "
                                     "or run `mistral-chat pull mistral-7b-instruct` first")
    path = resolve_model(name)
    mark_used(name)
    return str(path)


def sampling_params(opts: "RunOptions") -> SamplingParams:
    return SamplingParams(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
                          max_tokens=opts.max_tokens, seed=opts.seed)


def format_stats(stats: GenerationStats) -> str:
    return (f"prompt {stats.prompt_tokens} tokens ({stats.prefilled_tokens} prefilled), "
            f"generated {stats.generated_tokens}, first token {stats.time_to_first_token * 1000:.0f} ms, "
            f"{stats.tokens_per_second:.1f} tokens/s, finish: {stats.finish_reason}")


def run_one_shot(opts: "RunOptions") -> None:
    text = read_prompt(opts.prompt, sys.stdin)
    if opts.tp > 1:
        from mistral_chat.engine.launch import run_parallel_one_shot

        run_parallel_one_shot(opts, text)
        return
    from mistral_chat.engine.loader import load_model

    path = resolve_model_path(opts.model)
    loaded = load_model(path, device=opts.device, dtype=opts.dtype, quantize=opts.quantize,
                        compile=compile_wanted(opts))
    if opts.verbose:
        print(f"loaded {loaded.name} on {loaded.device} as {str(loaded.dtype).removeprefix('torch.')} "
              f"in {loaded.load_seconds:.1f} s", file=sys.stderr)
    messages = ([ChatMessage("system", opts.system)] if opts.system else []) + [ChatMessage("user", text)]
    ids = encode_conversation(loaded.tokenizer, messages)
    session = Session(loaded, context_length=opts.context)
    stream_answer(session, ids, sampling_params(opts), sys.stdout)
    if opts.verbose:
        print(format_stats(session.stats), file=sys.stderr)


def compile_wanted(opts: "RunOptions") -> bool:
    """Compile decode on CUDA unless --no-compile; say so, since the first run on a machine takes minutes."""
    import torch

    if not opts.compile or opts.device == "cpu" or not torch.cuda.is_available():
        return False
    from mistral_chat.engine.decode import use_compile_cache
    from mistral_chat.paths import app_home

    use_compile_cache(app_home() / "compile-cache")
    print("mistral-chat: compiling the model for this GPU (a few minutes the first time, cached afterwards; "
          "--no-compile skips it)", file=sys.stderr)
    return True


def stream_answer(session: Session, ids: list[int], params: SamplingParams, out: TextIO) -> str:
    """Write the answer to `out` as it arrives, flushing each piece; end with a newline."""
    pieces = []
    for delta in session.generate(ids, params):
        pieces.append(delta)
        out.write(delta)
        out.flush()
    answer = "".join(pieces)
    if not answer.endswith("\n"):
        out.write("\n")
        out.flush()
    return answer
