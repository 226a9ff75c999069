"""What reaches the user's terminal and stdout in one-shot mode: model output without control sequences on a
terminal (exact bytes in a pipe, a file and --json), plain -v lines, stdout that cannot be written, bytes that are
not UTF-8, and a data folder that cannot be written."""

from __future__ import annotations

import io
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_chat.cli.terminal import TerminalText, terminal_safe
from mistral_chat.engine.options import SamplingParams
from mistral_chat.oneshot import read_prompt, stream_answer
from tiny_models import write_tiny_model

HOSTILE = "ok\x1b]0;PWNED\x07 \x1b[31mred\x1b[0m \x1b]52;c;aGk=\x1b\\\x9b2J\x9d8;;http://x\x9c\r\x08done\tend\n"
SAFE = "ok red done\tend\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("terminal"), "mistral")["native"]


def env_for(home: Path) -> dict[str, str]:
    env = {**os.environ, "MISTRAL_CHAT_HOME": str(home / "app"), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("MISTRAL_CHAT_DEBUG", None)
    return env


def cli(*args: str | bytes, home: Path, stdin: bytes = b"", **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistral_chat.cli.main", *args], input=stdin, capture_output=True,
                          env=env_for(home), timeout=120, **kwargs)


# ---- control sequences ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [
    (HOSTILE, SAFE),
    ("plain text, ünïcödé, 日本語, emoji 🙂\n\ttab", "plain text, ünïcödé, 日本語, emoji 🙂\n\ttab"),
    ("\x1b(Bx\x1b7y\x1b8", "xy"),  # charset and cursor save/restore escapes
    ("a\x00b\x7fc\x85d", "abcd"),  # NUL, DEL, C1 NEL
], ids=["hostile", "plain", "escapes", "controls"])
def test_terminal_text_keeps_text_and_drops_sequences(text, shown):
    assert terminal_safe(text) == shown


def test_an_unterminated_sequence_does_not_swallow_the_whole_answer():
    shown = terminal_safe("\x1b]0;" + "t" * 10_000 + "after")
    assert shown.endswith("after") and set(shown[:-5]) == {"t"} and len(shown) < 10_000 - 4000


def test_sequences_split_across_streamed_pieces_are_dropped():
    screen = TerminalText()
    pieces = ["ok\x1b", "]0;PW", "NED", "\x07 \x1b[", "3", "1mred\x1b", "[0m\n"]
    assert "".join(screen.feed(p) for p in pieces) == "ok red\n"


class FakeSession:
    """Stands in for a generating session: yields the pieces of a hostile answer."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def generate(self, ids, params):
        yield from self.pieces


def read_all(fd: int) -> bytes:
    """Everything written to the pty so far: one read may return only part of it (each write is its own piece)."""
    data = b""
    while select.select([fd], [], [], 0.5)[0]:
        piece = os.read(fd, 65536)
        if not piece:
            break
        data += piece
    return data


def test_streamed_answer_on_a_terminal_has_no_control_sequences():
    master, slave = pty.openpty()
    out = io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), encoding="utf-8", write_through=True)
    try:
        assert out.isatty()
        answer = stream_answer(FakeSession(list(HOSTILE)).generate([1], SamplingParams()), out)
        shown = read_all(master).decode().replace("\r\n", "\n")  # the pty's own newline translation
    finally:
        out.close()
        os.close(master)
    assert answer == HOSTILE  # what the program keeps is the model's text
    assert shown == SAFE


def test_streamed_answer_to_a_pipe_keeps_every_byte():
    read_end, write_end = os.pipe()
    out = io.TextIOWrapper(os.fdopen(write_end, "wb", buffering=0), encoding="utf-8", write_through=True)
    stream_answer(FakeSession([HOSTILE[:5], HOSTILE[5:]]).generate([1], SamplingParams()), out)
    out.close()
    with os.fdopen(read_end, "rb") as f:
        assert f.read().decode() == HOSTILE


# ---- stdout that cannot be written ------------------------------------------------------------------------------


def test_stdout_on_dev_full_is_one_line(tiny, tmp_path):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "mistral_chat.cli.main", "--model", str(tiny), "--device", "cpu",
                               "-n", "3", "-p", "hi"], stdout=full, stderr=subprocess.PIPE, text=True,
                              env=env_for(tmp_path), timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("mistral-chat: error: cannot write the output (No space left on device)"), lines[0]


def test_closed_stdout_is_one_line(tiny, tmp_path):
    proc = subprocess.run(["bash", "-c", 'exec "$@" >&-', "bash", sys.executable, "-m", "mistral_chat.cli.main",
                           "--model", str(tiny), "--device", "cpu", "-n", "3", "-p", "hi"],
                          stderr=subprocess.PIPE, text=True, env=env_for(tmp_path), timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0] == ("mistral-chat: error: stdout is closed: redirect it to a file or /dev/null instead of "
                        "closing it")


# ---- -v: plain lines --------------------------------------------------------------------------------------------


def test_verbose_prints_plain_lines_with_the_kernel_plan(tiny, tmp_path):
    proc = cli("--model", str(tiny), "--device", "cpu", "-n", "3", "-p", "hi", "-v", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.decode().splitlines()
    assert any(line.startswith("kernel plan: ") for line in lines), lines
    assert any(line.startswith("loaded ") for line in lines), lines
    assert not any(line.startswith(("INFO", "DEBUG", "WARNING")) or "mistral_chat." in line for line in lines), lines


# ---- text that is not UTF-8 -------------------------------------------------------------------------------------


def test_read_prompt_replaces_bytes_that_are_not_utf8(capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait"), encoding="utf-8")
    assert read_prompt(None, stdin) == "caf\ufffd au lait"
    assert "stdin is not valid UTF-8" in capsys.readouterr().err
    argv_prompt = b"na\xefve".decode("utf-8", "surrogateescape")  # how Python hands over such an argument
    tty = io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8")
    tty.isatty = lambda: True  # type: ignore[method-assign]
    assert read_prompt(argv_prompt, tty) == "na\ufffdve"
    assert "--prompt is not valid UTF-8" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("where", ["stdin", "prompt"])
def test_bytes_that_are_not_utf8_are_answered_with_a_warning(where, tiny, tmp_path):
    """sentencepiece refused the lone surrogates Python makes of such bytes ('internal error')."""
    args: list[str | bytes] = ["--model", str(tiny), "--device", "cpu", "-n", "3"]
    if where == "prompt":
        proc = cli(*args, b"-p", b"caf\xe9 \xff", home=tmp_path, stdin=b"")
    else:
        proc = cli(*args, home=tmp_path, stdin=b"caf\xe9 \xff")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout.strip()
    assert "not valid UTF-8" in err and "internal error" not in err, err


# ---- a data folder that cannot be written -----------------------------------------------------------------------


def read_only_mounts_work(folder: Path) -> bool:
    probe = subprocess.run(["unshare", "-m", "bash", "-c", READ_ONLY + "! touch \"$1/probe\" 2>/dev/null", "bash",
                            str(folder)], capture_output=True)
    return probe.returncode == 0


# mount the data folder ($1) read-only in a mount namespace of the command's own, then run the command
READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && '


@pytest.mark.slow
def test_read_only_data_folder_still_answers(tiny, tmp_path):
    """`last used` is bookkeeping: when the data folder cannot be written (here a read-only mount, which binds root
    too), the answer comes anyway."""
    home = tmp_path / "home"
    first = cli("--model", str(tiny), "--device", "cpu", "-n", "2", "-p", "hi", home=home)  # the folder exists
    assert first.returncode == 0, first.stderr
    app = home / "app"
    registry = sorted(p.name for p in app.iterdir())
    if shutil.which("unshare") is None or not read_only_mounts_work(app):
        pytest.skip("no read-only bind mounts here (unshare -m)")
    proc = subprocess.run(["unshare", "-m", "bash", "-c", READ_ONLY + 'shift; exec "$@"', "bash", str(app),
                           sys.executable, "-m", "mistral_chat.cli.main", "--model", str(tiny), "--device", "cpu",
                           "-n", "2", "-p", "hi"], capture_output=True, env=env_for(home), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == first.stdout and proc.stderr == b"", proc.stderr
    assert sorted(p.name for p in app.iterdir()) == registry
