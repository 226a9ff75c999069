"""`mistral-chat bench --batch-mode`: many requests answered end to end, as `mistral-chat batch` and
`mistral-chat serve` answer them, on random weights of a real model shape.

It writes a random checkpoint of the shape (bench/checkpoint.py: native layout, a synthetic tekken tokenizer) and
loads it with `Model.load`, as `mistral-chat batch --model DIR` does. Then, at each --batch size, it answers
--requests chat requests whose prompts encode to --prompt tokens, each generating --steps tokens, through the batch
command's own path: JSON lines read by `cli/batch.parse_line`, `Model.chat_requests` (continuous batching, prompt
encoding and detokenization included) and the replies written as JSON lines. Next to each: the raw batched decode
rate of `bench/run.py` at the same batch size on the same model.

Random weights never choose EOS here: the checkpoint zeroes the output rows of the special tokens and decoding is
greedy, so the likeliest ordinary token always wins. Every answer is therefore --steps tokens long, which the bench
checks (a shorter answer is an error, not a silent discount).

Also, in the same process: greedy agreement of a few requests answered in the batch and one at a time
(`Model.chat`), free-running and with the batch's answers fed to the one-sequence path (`fed_agreement`); the
server (`serve/app.py` under uvicorn on 127.0.0.1) answering the same requests from as many concurrent HTTP
clients as the first --batch size, at that batch size; and with --vs-hf, HF transformers' batched
`generate` (eager) on the same prompt ids, min(--requests, largest batch) of them at the largest batch size.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import random
import socket
import string
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mistral_chat.bench.checkpoint import clear_checkpoint, reusable, write_random_checkpoint
from mistral_chat.bench.command import BenchArgs, int_list, parse_plan
from mistral_chat.bench.shapes import bench_shape
from mistral_chat.errors import MistralChatError

AGREEMENT_REQUESTS = 3


@dataclass
class BatchModeResult:
    shape: str
    device: str
    dtype: str
    layers: int
    requests: int
    prompt_tokens: int  # each request's prompt, chat-encoded
    generated_tokens: int  # each request's answer
    checkpoint_s: float = 0.0
    load_s: float = 0.0
    rows: list[dict] = field(default_factory=list)
    agreement: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def prompt_texts(tokenizer: Any, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` different user messages, each encoding (as a one-message chat) to `length` tokens where the
    tokenizer allows it (else the nearest length below)."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase + "     "
    texts = []
    for _ in range(count):
        text = "".join(rng.choices(letters, k=length))
        best = ""
        for _ in range(40):
            size = len(tokenizer.encode_chat([{"role": "user", "content": text}]))
            if size <= length and len(text) > len(best):
                best = text
            if size == length:
                break
            text = text[:len(text) - (size - length)] if size > length else \
                text + "".join(rng.choices(letters, k=length - size))
        texts.append(best or "x")
    return texts


def batch_lines(texts: list[str], max_tokens: int) -> list[str]:
    """The requests as `mistral-chat batch` reads them: one JSON line each."""
    return [json.dumps({"id": i, "messages": [{"role": "user", "content": t}], "max_tokens": max_tokens,
                        "temperature": 0}) for i, t in enumerate(texts)]


def answer_as_batch_command(model: Any, lines: list[str], batch_size: int) -> tuple[float, list[Any], str]:
    """Answer JSON lines through the batch command's path; (seconds, replies in input order, the output text)."""
    from mistral_chat.cli.batch import parse_line
    from mistral_chat.engine.options import SamplingParams

    out = io.StringIO()
    started = time.perf_counter()
    parsed = [parse_line(n, text, SamplingParams(), None, None) for n, text in enumerate(lines, 1)]
    bad = [p.error for p in parsed if p.request is None]
    if bad:
        raise MistralChatError(f"bench request refused: {bad[0]}")
    replies: list[Any] = [None] * len(parsed)
    for index, outcome in model.chat_requests([p.request for p in parsed], batch_size=batch_size):
        if isinstance(outcome, MistralChatError):
            raise MistralChatError(f"bench request {index} failed: {outcome}")
        replies[index] = outcome
        out.write(json.dumps({"id": parsed[index].id, **outcome.to_json()}, ensure_ascii=False) + "\n")
    _sync(model)
    return time.perf_counter() - started, replies, out.getvalue()


def check_lengths(replies: list[Any], steps: int, what: str) -> int:
    """Generated tokens of all replies; MistralChatError if one is not `steps` long (an EOS the bench did not
    expect would make the comparison unfair)."""
    short = [r.usage.generated_tokens for r in replies if r.usage.generated_tokens != steps]
    if short:
        raise MistralChatError(f"{what}: {len(short)} answer(s) not {steps} tokens long (e.g. {short[0]}): the random "
                               "weights chose EOS; rerun with another shape or fewer --steps")
    return sum(r.usage.generated_tokens for r in replies)


def _sync(model: Any) -> None:
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_decode_rates(model: Any, prompt: int, steps: int, batches: list[int]) -> dict[int, float]:
    """bench/run.py's batched decode timing on the loaded model: tokens/s by batch size."""
    from mistral_chat.bench.run import bench_ours

    loaded = model.loaded
    rows = bench_ours(loaded.model, loaded.config, loaded.device, prompt, steps, batches, None, [])
    loaded.model.cache_owner = None  # the next batch (or chat) sets its own cache up again
    return {r["batch"]: r["tokens_per_s"] for r in rows if r["what"].startswith("decode after")}


def greedy_agreement(model: Any, texts: list[str], batch_replies: list[Any], steps: int) -> dict[str, Any]:
    """The first few requests answered one at a time (`Model.chat`), token by token against the batch's answers."""
    agreeing = total = identical = 0
    first_differences = []
    for text, batched in zip(texts, batch_replies):
        alone = model.chat([{"role": "user", "content": text}], max_tokens=steps, temperature=0)
        a, b = list(alone.token_ids), list(batched.token_ids)
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreeing += same
        total += max(len(a), len(b))
        identical += a == b
        first_differences.append(None if a == b else same)
    return {"requests": len(first_differences), "identical": identical, "agreeing_tokens": agreeing,
            "tokens": total, "first_difference": first_differences}


def fed_agreement(model: Any, prompts: list[list[int]], batch_replies: list[Any]) -> dict[str, Any]:
    """Each batch answer fed to the one-sequence path (one prefill of prompt + answer, every position's logits):
    at how many positions that path's own pick is the batch's token, the most the batch's token falls below its
    top logit, and its top-2 margin where they differ (small margins: near-ties, not a wrong path). Free-running
    answers part at the first near-tie and say little after it; this compares every position."""
    loaded = model.loaded
    transformer = loaded.model
    picks = positions = 0
    largest_gap = 0.0
    margins: list[float] = []
    for prompt, batched in zip(prompts, batch_replies):
        prompt = list(prompt)
        answer = list(batched.token_ids)
        if not answer:
            continue
        ids = prompt + answer
        transformer.setup_cache(len(ids), prefill_chunk=len(ids))
        with torch.no_grad():
            logits = transformer(torch.tensor([ids], device=loaded.device), 0, all_logits=True)
        logits = logits[0, len(prompt) - 1:len(ids) - 1].float()  # the logits that chose each answer token
        want = torch.tensor(answer, device=logits.device)
        top = logits.topk(2, dim=-1)
        agree = top.indices[:, 0] == want
        picks += int(agree.sum())
        positions += len(answer)
        largest_gap = max(largest_gap, float((top.values[:, 0] - logits.gather(-1, want[:, None])[:, 0]).max()))
        margins += (top.values[:, 0] - top.values[:, 1])[~agree].tolist()
    transformer.cache_owner = None  # the next batch (or chat) sets its own cache up again
    return {"fed_picks": picks, "fed_positions": positions, "largest_gap": round(largest_gap, 4),
            "largest_margin_where_not": round(max(margins), 4) if margins else None}


# ---- the server -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _clients(url: str, texts: list[str], steps: int, clients: int) -> list[int]:
    import httpx

    todo = list(enumerate(texts))
    counts = [0] * len(texts)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: Any) -> None:
        while todo:
            index, text = todo.pop(0)
            response = await http.post(f"{url}/v1/chat/completions", json={
                "model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": steps,
                "temperature": 0})
            if response.status_code != 200:
                raise MistralChatError(f"the server answered {response.status_code}: {response.text[:200]}")
            counts[index] = response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return counts


def serve_requests(model: Any, texts: list[str], steps: int, clients: int) -> tuple[float, int]:
    """The server on 127.0.0.1 (uvicorn in a thread) at batch size `clients`, answering `texts` sent by `clients`
    concurrent HTTP clients; (seconds from the first request to the last answer, generated tokens)."""
    import uvicorn

    from mistral_chat.serve.app import create_app

    app = create_app(model, batch_size=clients)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="bench-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise MistralChatError("the bench's server did not start")
        time.sleep(0.02)
    try:
        started = time.perf_counter()
        counts = asyncio.run(_clients(f"http://127.0.0.1:{port}", texts, steps, clients))
        seconds = time.perf_counter() - started
    finally:
        server.should_exit = True
        thread.join(60)
    short = [c for c in counts if c != steps]
    if short:
        raise MistralChatError(f"server: {len(short)} answer(s) not {steps} tokens long (e.g. {short[0]})")
    return seconds, sum(counts)


# ---- HF transformers ----------------------------------------------------------------------------------------------


def hf_generate(config: Any, device: torch.device, dtype: torch.dtype, prompts: list[list[int]], steps: int,
                batch: int, tokenizer: Any) -> tuple[float, int]:
    """HF transformers' batched `generate` (eager, greedy, exactly `steps` new tokens) on `prompts` (left-padded),
    `batch` at a time, detokenized as ours are; (seconds, generated tokens). Weights: HF's own random ones."""
    from mistral_chat.bench.run import hf_model

    model = hf_model(config, device, dtype)
    model.generation_config.cache_implementation = None

    def run(group: list[list[int]], new: int) -> int:
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
        answers = out[:, width:].tolist()
        for answer in answers:
            tokenizer.decode(answer)
        return sum(len(a) for a in answers)

    run(prompts[:min(2, len(prompts))], 2)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    tokens = sum(run(prompts[i:i + batch], steps) for i in range(0, len(prompts), batch))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, tokens


# ---- the whole run ------------------------------------------------------------------------------------------------


def _row(engine: str, batch: int, requests: int, seconds: float, tokens: int, **more: Any) -> dict[str, Any]:
    return {"engine": engine, "batch": batch, "requests": requests, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, **more}


def run_batch_mode_bench(a: BenchArgs, say: Any = None) -> BatchModeResult:
    from mistral_chat.api import Model
    from mistral_chat.engine.loader import DTYPES, load_model, resolve_device
    from mistral_chat.engine.options import LoadOptions

    say = say or (lambda text: None)
    config = bench_shape(a.shape, a.layers, a.window)
    batches = int_list(a.batch, "--batch")
    dev = resolve_device(a.device)
    torch_dtype = DTYPES[a.dtype]
    prompt, steps, count = a.prompt, a.steps, a.requests
    context = prompt + steps + 16
    result = BatchModeResult(shape=a.shape, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                             dtype=a.dtype, layers=config.n_layers, requests=count, prompt_tokens=prompt,
                             generated_tokens=steps)
    with ExitStack() as stack:
        if a.tp_checkpoint is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mistral-chat-batch-bench-")))
        else:
            folder = Path(a.tp_checkpoint)
        started = time.perf_counter()
        if not reusable(folder, config):
            say(f"writing a random {a.shape} checkpoint to {folder}")
            clear_checkpoint(folder)
            write_random_checkpoint(folder, config, torch_dtype, device=dev)
        result.checkpoint_s = time.perf_counter() - started
        started = time.perf_counter()
        if a.plan:  # an implementation to compare (the kernel plan's fields, e.g. batch_graphs=1)
            options = LoadOptions(device=a.device, dtype=a.dtype, context_length=context, quantize=a.quantize,
                                  compile=False)
            loaded = load_model(folder, plan_overrides=parse_plan(a.plan), **options.load_kwargs())
            model = stack.enter_context(Model(loaded, options))
            say(loaded.plan.describe())
        else:
            model = stack.enter_context(Model.load(folder, device=a.device, dtype=a.dtype, quantize=a.quantize,
                                                   context=context, compile=False))  # as `mistral-chat batch` loads
        result.load_s = time.perf_counter() - started
        texts = prompt_texts(model.tokenizer, count, prompt)
        ids = [model.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
        result.prompt_tokens = round(sum(map(len, ids)) / len(ids))
        if any(len(i) != prompt for i in ids):
            result.notes.append(f"prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens (asked {prompt})")
        lines = batch_lines(texts, steps)
        replies_by_batch: dict[int, list[Any]] = {}
        for batch in batches:
            answer_as_batch_command(model, batch_lines(texts[:batch], 4), batch)  # warm-up at this size
            say(f"batch {batch}: {count} requests")
            seconds, replies, _ = answer_as_batch_command(model, lines, batch)
            tokens = check_lengths(replies, steps, f"batch {batch}")
            replies_by_batch[batch] = replies
            result.rows.append(_row("mistral-chat batch", batch, count, seconds, tokens))
            say(f"batch {batch}: {seconds:.2f} s, {tokens / seconds:.1f} tok/s")
        say("raw batched decode (bench/run.py)")
        raw = raw_decode_rates(model, prompt, steps, batches)  # decode as the plan says (one GPU: graphs)
        say("raw batched decode: " + ", ".join(f"batch {b} {rate:.1f} tok/s" for b, rate in raw.items()))
        for row in result.rows:
            row["raw_decode_tokens_per_s"] = raw.get(row["batch"], 0.0)
            row["vs_raw"] = row["tokens_per_s"] / row["raw_decode_tokens_per_s"] if row["batch"] in raw else 0.0
        say("greedy agreement: batch vs one at a time, free-running and fed the batch's tokens")
        few = min(AGREEMENT_REQUESTS, count)
        compared = replies_by_batch[batches[0]][:few]
        result.agreement = greedy_agreement(model, texts[:few], compared, steps)
        result.agreement["batch"] = batches[0]
        result.agreement.update(fed_agreement(model, ids[:few], compared))
        say(f"greedy agreement: {result.agreement}")
        try:
            import httpx  # noqa: F401
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            result.notes.append("server skipped: install mistral-chat[serve] and httpx")
        else:
            clients = batches[0]
            say(f"server: {count} requests from {clients} concurrent clients")
            seconds, tokens = serve_requests(model, texts, steps, clients)
            ours = next(r for r in result.rows if r["batch"] == clients)
            result.rows.append(_row("mistral-chat serve", clients, count, seconds, tokens,
                                    vs_batch=tokens / seconds / ours["tokens_per_s"]))
            say(f"server: {seconds:.2f} s, {tokens / seconds:.1f} tok/s")
        loaded_config = model.loaded.config
        raw_tokenizer = model.loaded.tokenizer
        model.close()
    if a.vs_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            result.notes.append("HF transformers skipped: not installed")
        else:
            batch = max(batches)
            subset = ids[:min(count, batch)]
            say(f"HF transformers generate: {len(subset)} requests at batch {batch}")
            seconds, tokens = hf_generate(loaded_config, dev, torch_dtype, subset, steps, batch, raw_tokenizer)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            ours = next(r for r in result.rows if r["batch"] == batch and r["engine"] == "mistral-chat batch")
            hf = _row("transformers eager generate", batch, len(subset), seconds, tokens)
            say(f"HF transformers: {seconds:.2f} s, {tokens / seconds:.1f} tok/s")
            ours["vs_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
            result.rows.append(hf)
    return result


def format_batch_table(r: BatchModeResult) -> str:
    lines = [f"{r.shape} ({r.layers} layers, {r.dtype}) on {r.device}: {r.requests} requests, {r.prompt_tokens}-token "
             f"prompts, {r.generated_tokens} generated tokens each (checkpoint {r.checkpoint_s:.1f} s, "
             f"load {r.load_s:.1f} s)",
             f"{'engine':28} {'batch':>5} {'requests':>8} {'all done s':>10} {'tokens/s':>10} {'raw decode':>10} "
             f"{'vs raw':>7} {'vs HF':>7} {'vs batch':>8}"]
    for row in r.rows:
        raw = f"{row['raw_decode_tokens_per_s']:.0f}" if row.get("raw_decode_tokens_per_s") else ""
        vs_raw = f"{100 * row['vs_raw']:.0f}%" if row.get("vs_raw") else ""
        vs_hf = f"{row['vs_hf']:.1f}x" if row.get("vs_hf") else ""
        vs_batch = f"{100 * row['vs_batch']:.0f}%" if row.get("vs_batch") else ""
        lines.append(f"{row['engine']:28} {row['batch']:>5} {row['requests']:>8} {row['seconds']:>10.2f} "
                     f"{row['tokens_per_s']:>10.1f} {raw:>10} {vs_raw:>7} {vs_hf:>7} {vs_batch:>8}")
    g = r.agreement
    if g:
        lines.append(f"greedy agreement ({r.dtype}, batch {g['batch']} vs one at a time): {g['identical']} of "
                     f"{g['requests']} answers identical, {g['agreeing_tokens']} of {g['tokens']} tokens agree "
                     f"before the first difference (first differences at {g['first_difference']})")
        if g.get("fed_positions"):
            where_not = g["largest_margin_where_not"]
            lines.append(f"fed the batch's answers, the one-sequence path picks the same token at {g['fed_picks']} of "
                         f"{g['fed_positions']} positions; the batch's token at most {g['largest_gap']} below its top "
                         "logit" + (f"; its top-2 margin where they differ at most {where_not}"
                                    if where_not is not None else ""))
    lines += [f"note: {note}" for note in r.notes]
    return "\n".join(lines)


def run_batch_mode(a: BenchArgs) -> int:
    """The batch-mode benchmark: the table (or JSON) on stdout, progress on stderr; 0 when it ran."""
    result = run_batch_mode_bench(a, lambda text: print(f"bench: {text}", file=sys.stderr, flush=True))
    text = json.dumps(asdict(result), indent=2)
    if a.json_file:
        with open(a.json_file, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text if a.json else format_batch_table(result))
    return 0
