"""The `mistral-chat` command end to end, as a user runs it: a subprocess on tiny random checkpoints.

Answers are checked against real references (HF transformers' greedy generation of mistral-common's
`encode_chat_completion`, decoded by mistral-common). Every bad input must end with one line on stderr that names
the file or value, a non-zero exit and no traceback. The subprocesses run a few at a time from one module-scoped
fixture: each costs seconds (importing torch), the machine has two cores.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tiny_models import write_tiny_model

PROMPT = "Write a haiku about the sea"
SYSTEM = "You answer in French."
PIPED = "The sea is wide.\nThe sky is blue.\n"
STEPS = 12
LONG_PROMPT = "hello world " * 30  # about 60 tokens: more than --context 32
HUGE_CONTEXT = 2**40  # a rope table of 2**40 positions can never be allocated: a real out-of-memory


@dataclass
class Run:
    args: list[str]
    stdin: str = ""
    memory_limit: int | None = None  # RLIMIT_AS in bytes, to make a huge allocation fail at once
    python: tuple[str, ...] = ()  # options of the interpreter itself (-X importtime)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MISTRAL_CHAT_HOME=str(home / "app"), HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("MISTRAL_CHAT_DEBUG", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def run_cli(run: Run, env: dict[str, str], cwd: Path) -> Result:
    limit = run.memory_limit

    def limit_memory() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, *run.python, "-m", "mistral_chat.cli.main", *run.args], input=run.stdin,
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
                          preexec_fn=limit_memory if limit is not None else None)
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ---- models and broken copies of them --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny(workdir) -> dict[str, Path]:
    return write_tiny_model(workdir / "mistral", "mistral")


def broken_models(root: Path, native: Path, hf: Path) -> dict[str, Path]:
    """One folder per way a model folder can be wrong."""
    bad: dict[str, Path] = {"missing": root / "does-not-exist"}

    bad["empty"] = root / "empty"
    bad["empty"].mkdir()
    (bad["empty"] / "README.md").write_text("not a model\n")

    bad["llama"] = root / "llama"
    shutil.copytree(hf, bad["llama"])
    config = json.loads((bad["llama"] / "config.json").read_text())
    config["model_type"] = "llama"
    (bad["llama"] / "config.json").write_text(json.dumps(config))

    bad["truncated"] = root / "truncated"
    shutil.copytree(native, bad["truncated"])
    weights = bad["truncated"] / "consolidated.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)

    bad["shape"] = root / "shape"
    shutil.copytree(native, bad["shape"])
    params = json.loads((bad["shape"] / "params.json").read_text())
    params["dim"] = params["dim"] * 2
    (bad["shape"] / "params.json").write_text(json.dumps(params))

    bad["no-tokenizer"] = root / "no-tokenizer"
    shutil.copytree(native, bad["no-tokenizer"])
    for f in bad["no-tokenizer"].glob("tokenizer.model*"):
        f.unlink()

    bad["long-context"] = root / "long-context"  # a model that claims a context no memory can hold
    shutil.copytree(native, bad["long-context"])
    params = json.loads((bad["long-context"] / "params.json").read_text())
    params["max_seq_len"] = HUGE_CONTEXT
    (bad["long-context"] / "params.json").write_text(json.dumps(params))
    return bad


def answer_args(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--max-tokens", str(STEPS), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def bad(workdir, tiny) -> dict[str, Path]:
    root = workdir / "bad"
    root.mkdir()
    return broken_models(root, tiny["native"], tiny["hf"])


# run name -> (the broken folder the line must name, or None; another text the line must hold)
ERROR_CASES: dict[str, tuple[str | None, str]] = {
    "missing": ("missing", "no folder"),
    "empty": ("empty", "neither params.json"),
    "llama": ("llama", "model_type 'llama'"),
    "truncated": ("truncated", "consolidated.safetensors is truncated"),
    "shape": ("shape", "params.json says"),
    "no-tokenizer": ("no-tokenizer", "no tokenizer"),
    "bad-dtype": (None, "dtype 'int3'"),
    "cuda": (None, "device 'cuda'"),
    "context": (None, "context holds 32"),
    "out-of-memory": (None, "out of memory on cpu"),
}


def planned_runs(tiny: dict[str, Path], bad: dict[str, Path]) -> dict[str, Run]:
    native, hf = tiny["native"], tiny["hf"]
    runs = {
        "native": Run(answer_args(native, "--prompt", PROMPT, "--verbose")),
        "system": Run(answer_args(native, "--prompt", PROMPT, "--system", SYSTEM)),
        "imports": Run(answer_args(native, "--prompt", PROMPT), python=("-X", "importtime")),
        "stdin": Run(answer_args(hf), stdin=PROMPT),  # also the Hugging Face folder's answer
        "prompt+stdin": Run(answer_args(native, "--prompt", PROMPT), stdin=PIPED),
        "bad-dtype": Run(answer_args(native, "--prompt", PROMPT, "--dtype", "int3")),
        "context": Run(answer_args(native, "--prompt", LONG_PROMPT, "--context", "32")),
        "debug": Run(answer_args(bad["shape"], "--prompt", PROMPT, "--debug")),
        "out-of-memory": Run(answer_args(bad["long-context"], "--prompt", PROMPT, "--context", str(HUGE_CONTEXT)),
                             memory_limit=32 << 30),
    }
    runs["cuda"] = Run(["--model", str(native), "--prompt", PROMPT, "--device", "cuda"])
    for name in ("missing", "empty", "llama", "truncated", "shape", "no-tokenizer"):
        runs[name] = Run(answer_args(bad[name], "--prompt", PROMPT))
    return runs


def reference_answer(model_dir: Path, messages: list[tuple[str, str]], steps: int = STEPS) -> str:
    """HF transformers' greedy completion of mistral-common's encoding, decoded by mistral-common."""
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = MistralTokenizer.from_file(str(next(model_dir.glob("tokenizer.model*"))))
    request = ChatCompletionRequest(messages=[SystemMessage(content=text) if role == "system"
                                              else UserMessage(content=text) for role, text in messages])
    ids = torch.tensor([tokenizer.encode_chat_completion(request).tokens])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, attention_mask=torch.ones_like(ids))
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def printed(answer: str) -> str:
    """What the CLI writes for an answer: the answer, ending with a newline."""
    return answer if answer.endswith("\n") else answer + "\n"


@pytest.fixture(scope="module")
def results(workdir, tiny, bad) -> dict[str, Result]:
    """Every planned run's result; the runs go two at a time (each mostly imports torch)."""
    env = cli_env(workdir)
    runs = planned_runs(tiny, bad)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, run, env, workdir) for name, run in runs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def references(tiny) -> dict[str, str]:
    hf = tiny["hf"]
    return {
        "plain": reference_answer(hf, [("user", PROMPT)]),
        "system": reference_answer(hf, [("system", SYSTEM), ("user", PROMPT)]),
        "joined": reference_answer(hf, [("user", f"{PROMPT}\n\n{PIPED}")]),
    }


# ---- answers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["native", "stdin"])
def test_greedy_answer_equals_transformers_and_mistral_common(results, references, run):
    """The native folder with --prompt, the Hugging Face folder with the prompt piped in."""
    result = results[run]
    assert result.returncode == 0, result.stderr
    assert references["plain"].strip()  # a non-empty answer, so that the comparison means something
    assert result.stdout == printed(references["plain"])


def test_system_prompt(results, references):
    result = results["system"]
    assert result.returncode == 0, result.stderr
    assert references["system"] != references["plain"]  # the system prompt reached the model
    assert result.stdout == printed(references["system"])


def test_piped_stdin_is_the_prompt(results, references):
    result = results["stdin"]
    assert result.returncode == 0, result.stderr
    assert result.stdout == results["native"].stdout == printed(references["plain"])  # as with --prompt


def test_prompt_and_piped_stdin_are_joined_by_a_blank_line(results, references):
    result = results["prompt+stdin"]
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed(references["joined"])  # the answer to --prompt "PROMPT\n\nSTDIN"
    assert result.stdout != results["native"].stdout


def test_verbose_statistics_go_to_stderr_only(results, references):
    result = results["native"]
    assert result.stdout == printed(references["plain"])  # nothing but the completion on stdout
    assert "tokens/s" in result.stderr and f"generated {STEPS}" in result.stderr
    assert "finish: length" in result.stderr
    assert results["stdin"].stderr == ""  # and without --verbose, nothing at all


# ---- start-up ------------------------------------------------------------------------------------------------


def imported_modules(importtime_log: str) -> list[str]:
    return [line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")]


def test_one_shot_on_a_folder_never_imports_huggingface_hub(results):
    """A model folder needs nothing from the hub: huggingface_hub (0.2 s to import here, up to 1 s on a GPU
    machine) is imported only by what talks to the hub or reads its cache."""
    result = results["imports"]
    assert result.returncode == 0, result.stderr
    assert result.stdout == results["native"].stdout
    imported = imported_modules(result.stderr)
    assert "torch" in imported and "mistral_chat.cli.models" in imported  # the log covers the whole run
    assert [m for m in imported if m.split(".")[0] == "huggingface_hub"] == []


def test_chat_start_on_a_folder_never_imports_huggingface_hub(tiny, tmp_path):
    """What runs before and as the chat opens on a folder (a stand-in for the chat itself, which needs a real
    terminal, finds and remembers the model as the chat does), then the same with no --model: the last one used."""
    code = textwrap.dedent("""
        import io, sys
        import mistral_chat.tui.app as tui
        from mistral_chat.cli.main import main
        from mistral_chat.tui.model_choices import remember_model, start_model

        class Terminal(io.StringIO):
            def isatty(self):
                return True

        def chat(options):
            path, name = start_model(options.model)
            remember_model(name)
            print(path)

        sys.stdin = Terminal()
        tui.run_tui = chat
        assert main(["--model", sys.argv[1]]) == 0 and main([]) == 0
        print(sorted(m for m in sys.modules if m.split(".")[0] == "huggingface_hub"))
    """)
    env = cli_env(tmp_path)
    del env["HF_HUB_OFFLINE"]  # online, as most start: the bare command then looks for what to offer to pull
    proc = subprocess.run([sys.executable, "-c", code, str(tiny["native"])], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(tiny["native"].resolve())] * 2 + ["[]"]


# ---- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_gives_one_line_and_a_non_zero_exit(results, bad, case):
    result = results[case]
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("mistral-chat: error: "), line
    assert "internal error" not in line
    folder, text = ERROR_CASES[case]
    assert text in line, line
    if folder is not None:
        assert str(bad[folder]) in line, line


def test_debug_shows_the_traceback(results):
    result = results["debug"]
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert result.stderr_lines[-1].startswith("mistral-chat: error: tensor ")


def test_closed_stdout_ends_quietly(workdir, tiny):
    """`mistral-chat ... | head -c 1`: the reader goes away while tokens still come."""
    proc = subprocess.Popen([sys.executable, "-m", "mistral_chat.cli.main",
                             *answer_args(tiny["native"], "--prompt", PROMPT, "--max-tokens", "300")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(workdir), cwd=workdir)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.read(1)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert first
    assert stderr == ""
    assert code in (0, 141, -13)  # quiet success, or killed by SIGPIPE as `cat` would be
