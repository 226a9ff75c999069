"""The command line's own mistakes, as a user makes them: typos, bad values, missing values, unknown commands,
Ctrl-C and the end of input at a question. Each is one line on stderr that names the option or value (with click's
"did you mean" hint where it has one), exit status 2 for a usage error and 130 for Ctrl-C, never "internal error".

Most cases run `mistral_chat.cli.main.main([...])` in this process (real typer, real parser); the ones that need a
terminal run the command in a subprocess on a pty."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from mistral_chat.cli.main import main
from mistral_chat.cli.models import human_context
from tiny_models import write_tiny_model


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MISTRAL_CHAT_HOME", str(tmp_path / "app"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MISTRAL_CHAT_DEBUG", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_native(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cli-errors"), "mistral")["native"]


# ---- parser errors: exit 2, one line naming the option or value ------------------------------------------------

USAGE_ERRORS = {
    "typo": (["--modle", "x"], ["--modle", "Possible options: --model"]),
    "negative temperature": (["-t", "-1"], ["'--temperature' / '-t'", "greater than or equal to 0"]),
    "not a number": (["-n", "abc"], ["'--max-tokens' / '-n'", "valid integer"]),
    "missing value": (["--model"], ["'--model' requires an argument"]),
    "missing value at the end": (["--json", "--prompt"], ["'--prompt' requires an argument"]),
    "unknown command": (["frobnicate"], ["No such command 'frobnicate'"]),
    "command typo": (["lst"], ["No such command 'lst'", "Did you mean 'list'"]),
    "show without a model": (["show"], ["Missing argument", "mistral-chat show --help"]),
    "rm without a model": (["rm"], ["Missing argument", "mistral-chat rm --help"]),
    "seed below range": (["-p", "x", "--seed", "-1"], ["'--seed'"]),
    "seed above range": (["-p", "x", "--seed", str(2**64)], ["'--seed'", str(2**64 - 1)]),
    "list option typo": (["list", "--catalog"], ["--catalog", "--catalogue"]),
    "bench shape": (["bench", "--shape", "mistral-9b"], ["'--shape'", "mistral-9b"]),
    "bench option typo": (["bench", "--step", "3"], ["--step", "--steps"]),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line_and_exit_2(case, home, capsys):
    args, needles = USAGE_ERRORS[case]
    code = main(args)
    out, err = capsys.readouterr()
    line = one_line(err)
    assert code == 2, err
    assert line.startswith("mistral-chat: error: "), line
    for needle in needles:
        assert needle in line, line
    assert out == ""


def test_python_m_bench_reports_usage_errors_the_same_way(capsys):
    from mistral_chat.bench.command import main as bench_main

    code = bench_main(["--batch", "1,x"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "'--batch'" in line and "1,x" in line, line


# ---- help: flags show no value type; bench is a typer command like the rest -------------------------------------


@pytest.mark.parametrize("command", [[], ["bench"], ["list"], ["rm"]])
def test_help_shows_no_type_for_flags(command, home, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "BOOLEAN" not in out, out
    for flag in {(): ("--json", "--verbose", "--debug", "--no-compile"), ("bench",): ("--json", "--no-compile"),
                 ("list",): ("--catalogue",), ("rm",): ("--yes",)}[tuple(command)]:
        line = next(line for line in out.splitlines() if flag in line)
        assert "<" not in line, line


def test_bench_help_is_typer_with_every_option(home, capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: mistral-chat bench [OPTIONS]" in out
    assert "[-h]" not in out  # argparse's usage line
    for option in ("--shape", "--layers", "--window", "--device", "--dtype", "--quantize", "--prompt", "--steps",
                   "--batch", "--prefill", "--no-compile", "--vs-hf", "--plan", "--json", "--json-file", "--tp",
                   "--tp-checkpoint"):
        assert option in out, option


# ---- empty prompts: one line, exit 1 ----------------------------------------------------------------------------


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


@pytest.mark.parametrize("args, piped", [(["-p", ""], b""), (["-p", "   \n\t"], b""), ([], b""), ([], b"  \n\n"),
                                         (["-p", " "], b"\n")])
def test_empty_prompt_is_refused(args, piped, home, monkeypatch, capsys, tiny_native):
    _stdin(monkeypatch, piped)
    code = main(["--model", str(tiny_native), "--device", "cpu", "-n", "2", *args])
    line = one_line(capsys.readouterr().err)
    assert code == 1
    assert line.startswith("mistral-chat: error: empty prompt"), line


# ---- --tools: bounded reads, bounded nesting --------------------------------------------------------------------


def test_tools_nested_too_deep_is_one_line(home, tmp_path, monkeypatch, capsys, tiny_native):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    _stdin(monkeypatch, b"")
    code = main(["--model", str(tiny_native), "-p", "hi", "--tools", str(deep)])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and str(deep) in line and "nests too deeply" in line, line


def test_tools_from_an_endless_file_is_capped(home, monkeypatch, capsys, tiny_native):
    _stdin(monkeypatch, b"")
    start = time.monotonic()
    code = main(["--model", str(tiny_native), "-p", "hi", "--tools", "/dev/zero"])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "/dev/zero" in line and "larger than" in line, line
    assert time.monotonic() - start < 10


# ---- model names are data, never Rich markup --------------------------------------------------------------------

MARKUP_NAMES = ["[bold red]RED", "x[link=https:evil.example]y"]


@pytest.mark.parametrize("name", MARKUP_NAMES)
def test_names_with_markup_are_printed_as_text(name, home, tmp_path, capsys, tiny_native):
    folder = tmp_path / name
    shutil.copytree(tiny_native, folder)
    assert main(["pull", str(folder)]) == 0
    pulled = capsys.readouterr().out
    assert f"registered {name} " in pulled and f"--model {name}" in pulled, pulled
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert name in listed and str(folder) in listed, listed
    assert main(["show", name]) == 0
    shown = capsys.readouterr().out
    assert name in shown and str(folder) in shown, shown


def test_markup_in_names_sends_no_escape_sequences_to_a_terminal(home, tmp_path, tiny_native):
    """On a terminal, `x[link=...]y` must not become an OSC 8 hyperlink (or any other escape but colours)."""
    folder = tmp_path / MARKUP_NAMES[1]
    shutil.copytree(tiny_native, folder)
    env = {**os.environ, "MISTRAL_CHAT_HOME": str(home / "app"), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1",
           "COLUMNS": "200", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    subprocess.run([sys.executable, "-m", "mistral_chat.cli.main", "pull", str(folder)], env=env, check=True,
                   capture_output=True)
    code, output = run_on_pty(["list"], env)
    assert code == 0, output
    assert "\x1b]8;" not in output and MARKUP_NAMES[1] in output, repr(output)


# ---- list and rm ------------------------------------------------------------------------------------------------


def test_context_lengths_are_shown_as_written():
    assert [human_context(n) for n in (512, 4096, 8192, 32768, 131072, 1 << 20, 100_000, None)] == \
        ["512", "4096", "8192", "32K", "128K", "1M", "100.0K", "?"]


def test_list_shows_a_context_of_4096_exactly(home, tmp_path, capsys, tiny_native):
    folder = tmp_path / "ctx4096"
    shutil.copytree(tiny_native, folder)
    params = json.loads((folder / "params.json").read_text())
    params["max_seq_len"] = 4096
    (folder / "params.json").write_text(json.dumps(params))
    assert main(["pull", str(folder)]) == 0
    capsys.readouterr()
    assert main(["list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "ctx4096" in line)
    assert " 4096 " in row and "4.1K" not in row, row


def _register(folder_name: str, tmp_path: Path, tiny_native: Path, capsys) -> Path:
    folder = tmp_path / folder_name
    shutil.copytree(tiny_native, folder)
    assert main(["pull", str(folder)]) == 0
    capsys.readouterr()
    return folder


@pytest.mark.parametrize("typed", ["as listed", "with a slash", "relative"])
def test_rm_by_the_path_that_list_shows(typed, home, tmp_path, monkeypatch, capsys, tiny_native):
    folder = _register("by-path", tmp_path, tiny_native, capsys)
    assert main(["list"]) == 0
    assert str(folder) in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    path = {"as listed": str(folder), "with a slash": f"{folder}/", "relative": "./by-path"}[typed]
    assert main(["rm", "--yes", path]) == 0, capsys.readouterr().err
    assert "removed by-path" in capsys.readouterr().out
    assert main(["list"]) == 0
    assert "by-path" not in capsys.readouterr().out
    assert folder.is_dir()  # a registered folder is forgotten, its files stay


def test_rm_question_says_what_happens_and_no_keeps_everything(home, tmp_path, monkeypatch, capsys, tiny_native):
    _register("asked", tmp_path, tiny_native, capsys)
    _stdin(monkeypatch, b"n\n")
    assert main(["rm", "asked"]) == 1
    out = capsys.readouterr().out
    assert "Remove asked: forget asked (" in out and "its files are kept. Go ahead? [y/N]" in out, out
    assert "nothing removed" in out
    _stdin(monkeypatch, b"y\n")
    assert main(["rm", "asked"]) == 0
    assert "removed asked" in capsys.readouterr().out


def test_rm_at_the_end_of_input_removes_nothing(home, tmp_path, monkeypatch, capsys, tiny_native):
    _register("eof", tmp_path, tiny_native, capsys)
    _stdin(monkeypatch, b"")
    code = main(["rm", "eof"])
    out, err = capsys.readouterr()
    assert code == 1 and "nothing removed" in out, (out, err)
    assert "internal error" not in err and "Traceback" not in err
    assert main(["list"]) == 0 and "eof" in capsys.readouterr().out


def run_on_pty(args: list[str], env: dict[str, str], send: bytes = b"", after: bytes = b"",
               timeout: float = 60) -> tuple[int, str]:
    """The command with stdin, stdout and stderr on a new pty; `send` is typed once `after` has been shown."""
    master, slave = pty.openpty()
    def controlling_terminal() -> None:  # the pty is the child's terminal: Ctrl-C there is its SIGINT
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "mistral_chat.cli.main", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True, preexec_fn=controlling_terminal)
    os.close(slave)
    output = b""
    sent = not send
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the pty
                    break
                if not chunk:
                    break
                output += chunk
            if not sent and after in output:
                os.write(master, send)
                sent = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, output.decode("utf-8", "replace")


@pytest.mark.slow
def test_ctrl_c_at_rm_question_exits_130(home, tmp_path, capsys, tiny_native):
    folder = _register("interrupted", tmp_path, tiny_native, capsys)
    env = {**os.environ, "MISTRAL_CHAT_HOME": str(home / "app"), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1"}
    code, output = run_on_pty(["rm", "interrupted"], env, send=b"\x03", after=b"[y/N]")
    assert code == 130, output
    assert "interrupted" in output.splitlines()[-1] and "Traceback" not in output, output
    assert "internal error" not in output and "Aborted" not in output
    assert main(["list"]) == 0 and str(folder) in capsys.readouterr().out  # nothing was removed
