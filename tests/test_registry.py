"""models.json: an unreadable file is kept (and copied), never rewritten; every update holds a file lock."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mistral_chat.models.registry import ModelRecord, Registry, RegistryError
from tiny_models import write_tiny_model

BROKEN = '{\n  "version": 1,\n  "models": {},\n  "used": {},\n  "last_used": null,\n}\n'  # a trailing comma


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MISTRAL_CHAT_HOME", str(tmp_path / "app"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "app").mkdir()
    return tmp_path / "app"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "mistral")


def run_cli(*args: str) -> tuple[int, str, str]:
    from test_models_pull import run_cli as run

    return run(*args)


@pytest.mark.parametrize("content", [BROKEN, '{"models": []}', "[1, 2]", '{"models": {"a": {"source": "hub"}}}',
                                     "\xff\xfe"])
def test_unreadable_registry_is_kept_and_never_overwritten(home: Path, tiny: dict[str, Path], content: str) -> None:
    registry = home / "models.json"
    registry.write_bytes(content.encode("latin-1"))
    before = registry.read_bytes()
    for args in (("pull", str(tiny["native"])), ("list",)):
        code, _, err = run_cli(*args)
        assert code == 1
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert str(registry) in lines[0] and "fix it by hand, or move it away" in lines[0]
        assert registry.read_bytes() == before  # never rewritten
    backups = list(home.glob("models.json.unreadable-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == before
    assert str(backups[0]) in lines[0]


def test_unreadable_registry_fixed_by_hand_works_again(home: Path, tiny: dict[str, Path]) -> None:
    registry = home / "models.json"
    registry.write_text(BROKEN)
    assert run_cli("pull", str(tiny["native"]))[0] == 1
    registry.write_text(BROKEN.replace("null,", "null"))
    code, out, err = run_cli("pull", str(tiny["native"]))
    assert code == 0, err
    assert json.loads(registry.read_text())["models"][tiny["native"].name]["source"] == "local"


def test_registry_updates_from_threads_are_all_kept(home: Path) -> None:
    def add(i: int) -> None:
        for j in range(10):
            with Registry.locked() as registry:
                registry.models[f"m{i}-{j}"] = ModelRecord(name=f"m{i}-{j}", source="local", path=f"/x/{i}/{j}")

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(Registry.load().models) == 80
    assert not list(home.glob("*.tmp"))


def test_nothing_is_saved_when_the_update_raises(home: Path) -> None:
    with Registry.locked() as registry:
        registry.models["a"] = ModelRecord(name="a", source="local", path="/a")
    with pytest.raises(RuntimeError):
        with Registry.locked() as registry:
            registry.models.clear()
            raise RuntimeError("boom")
    assert list(Registry.load().models) == ["a"]


_REGISTER = """
import sys, time
from pathlib import Path
from mistral_chat.models.pull import register_local
print("ready", flush=True)
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.001)
for folder in sys.argv[2:]:
    register_local(Path(folder))
"""


@pytest.mark.slow
def test_eight_concurrent_pull_folder_processes_are_all_recorded(home: Path, tiny: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """The issue's case: 8 `pull FOLDER` at once all exit 0; before the lock only 5-6 were recorded."""
    import shutil

    folders = []
    for i in range(8):
        folder = tmp_path / "models" / f"model-{i}"
        folder.mkdir(parents=True)
        for f in tiny["native"].iterdir():
            (folder / f.name).symlink_to(f)
        folders.append(folder)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _REGISTER, str(go), str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for folder in folders]
    for proc in procs:  # every process imported and waiting, then all register at once
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert sorted(Registry.load().models) == sorted(f.name for f in folders)
    shutil.rmtree(tmp_path / "models")
