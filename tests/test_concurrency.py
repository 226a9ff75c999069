"""Many processes on one data folder at once: pulls (through the real huggingface_hub client, against the local
hub of tests/hub_server.py), registry writers and chat writers. Nothing may be lost, nothing interleaved."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_server import HubServer
from tiny_models import write_tiny_model

WORKER = r'''
import json, sys, time
from pathlib import Path

role, go, arg = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if role == "pull":
    from mistral_chat.models.pull import pull_model
    from mistral_chat.models.store import mark_used
elif role == "register":
    from mistral_chat.models.pull import register_local
    from mistral_chat.models.store import mark_used
else:
    from mistral_chat.chat.store import ChatStore, ConversationBusyError
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)

if role == "pull":
    result = pull_model(arg)
    mark_used(arg)
    print(json.dumps({"path": str(result.path)}))
elif role == "register":
    for folder in arg.split(","):
        register_local(Path(folder))
        mark_used(folder)
    print(json.dumps({}))
else:  # a chat writer: its own conversation, and a try at the shared one
    shared_id, name, count = arg.split(",")
    store = ChatStore(Path(sys.argv[4]))
    own = store.create_conversation(name)
    shared = int(shared_id)
    held = store.claim(shared)
    refused = 0
    for i in range(int(count)):
        store.add_message(own.id, "user", f"{name} {i}")
        try:
            store.add_message(shared, "user", f"{name} {i}")
        except ConversationBusyError:
            refused += 1
    (go.parent / f"done-{name}").touch()  # hold on until every writer has tried the shared conversation
    while len(list(go.parent.glob("done-writer-*"))) < int(sys.argv[5]):
        time.sleep(0.002)
    print(json.dumps({"own": own.id, "held": held, "refused": refused}))
    store.close()
'''

PULLS = {"tiny/stress-native": 3, "tiny/stress-hf": 3}  # repo -> concurrent pulls of it
REGISTER_PROCESSES, FOLDERS_EACH = 4, 2
CHAT_WRITERS, MESSAGES = 3, 40


@pytest.mark.slow
def test_concurrent_pulls_registry_and_chat_writers_lose_nothing(tmp_path: Path) -> None:
    tiny = write_tiny_model(tmp_path / "tiny", "mistral")
    app, hf = tmp_path / "app", tmp_path / "hf"
    env = {**os.environ, "MISTRAL_CHAT_HOME": str(app), "HF_HOME": str(hf), "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.getcwd()}
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(key, None)
    folders = []
    for i in range(REGISTER_PROCESSES * FOLDERS_EACH):
        folder = tmp_path / "folders" / f"local-{i}"
        folder.mkdir(parents=True)
        for f in tiny["native"].iterdir():
            (folder / f.name).symlink_to(f)
        folders.append(folder)

    from mistral_chat.chat.store import ChatStore

    db = app / "conversations.db"
    setup = ChatStore(db)
    shared = setup.create_conversation("shared")
    setup.close()  # nobody holds it now: the writers race for it

    with HubServer() as hub:
        hub.add_folders("tiny/stress-native", tiny["native"])
        hub.add_folders("tiny/stress-hf", tiny["hf"])
        hub.throttle(0.02)  # so that the pulls of one repo overlap
        env["HF_ENDPOINT"] = hub.endpoint
        go = tmp_path / "go"
        jobs: list[tuple[str, str, subprocess.Popen]] = []

        def spawn(role: str, arg: str, *extra: str) -> None:
            proc = subprocess.Popen([sys.executable, "-c", WORKER, role, str(go), arg, *extra], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            jobs.append((role, arg, proc))

        for repo, n in PULLS.items():
            for _ in range(n):
                spawn("pull", repo)
        for i in range(REGISTER_PROCESSES):
            spawn("register", ",".join(str(f) for f in folders[i * FOLDERS_EACH:(i + 1) * FOLDERS_EACH]))
        for i in range(CHAT_WRITERS):
            spawn("chat", f"{shared.id},writer-{i},{MESSAGES}", str(db), str(CHAT_WRITERS))
        for _, _, proc in jobs:  # all imported and waiting, then all start at once
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        started = time.monotonic()
        go.touch()
        results = []
        for role, arg, proc in jobs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"{role} {arg}: {err}"
            results.append((role, arg, json.loads(out.strip().splitlines()[-1])))
        assert time.monotonic() - started < 90

        # every file a pull needs came over the network once, however many pulls asked for it
        paths = {arg: Path(r["path"]) for role, arg, r in results if role == "pull"}
        for repo, snapshot in paths.items():
            names = sorted(p.name for p in snapshot.iterdir())
            assert "tokenizer.model.v3" in names and len(names) >= 3
            for name in names:
                gets = [r for r in hub.downloads(name) if r.path.startswith(f"/{repo}/")]
                assert len(gets) == 1, (repo, name, [(g.range, g.status) for g in gets])
                assert (snapshot / name).read_bytes() == hub.repos[repo].files[name].data

    # the cache: complete blobs named by their hashes, no partial left
    for repo in PULLS:
        storage = hf / "hub" / ("models--" + repo.replace("/", "--"))
        assert not list((storage / "blobs").glob("*.incomplete"))
        for blob in (storage / "blobs").iterdir():
            data = blob.read_bytes()
            assert blob.name in (hashlib.sha256(data).hexdigest(),
                                 hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest())

    # the registry: every pull and every folder recorded, ready
    registry = json.loads((app / "models.json").read_text())
    models = registry["models"]
    for repo in PULLS:
        assert models[repo]["ready"] is True and models[repo]["source"] == "hub"
    for folder in folders:
        assert models[folder.name]["source"] == "local" and models[folder.name]["path"] == str(folder)
    assert set(registry["used"]) == set(PULLS) | {f.name for f in folders}

    # the conversations: each writer's own chat complete and in order; the shared one written by one writer only
    store = ChatStore(db)
    chats = [r for role, _, r in results if role == "chat"]
    for i, r in enumerate(chats):
        messages = [m.content for m in store.load(r["own"]).messages]
        assert messages == [f"writer-{i} {k}" for k in range(MESSAGES)]
    holders = [i for i, r in enumerate(chats) if r["held"]]
    assert len(holders) == 1, chats
    assert [r["refused"] for r in chats] == [0 if r["held"] else MESSAGES for r in chats]
    shared_messages = [m.content for m in store.load(shared.id).messages]
    assert shared_messages == [f"writer-{holders[0]} {k}" for k in range(MESSAGES)]
    assert len(store.list_conversations()) == 1 + CHAT_WRITERS
    store.close()
