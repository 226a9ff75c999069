"""`python -m mistral_chat.bench.unwarmed ARGS`: `mistral-chat ARGS` with the engine's kernel warm-up left out, for
`bench --startup --no-warmup`'s comparison run and `benchmarks/gpu/startup_timeline.py --no-warmup`: what an
empty Triton cache costs a first answer without engine/warmup.py (and for the harnesses that time the loader's
reads alone: load_speed.py, load_profile.py). Not a product setting: the loader imports the warm-up when it
loads, and finds here a stand-in whose `start_warmup` starts nothing. Imports no torch itself."""

from __future__ import annotations

import runpy
import sys
import types


def leave_out_warmup() -> None:
    """From now on in this process, loading a model warms no kernel up (call before the first load)."""
    stand_in = types.ModuleType("mistral_chat.engine.warmup", "the kernel warm-up, left out (bench/unwarmed.py)")
    stand_in.start_warmup = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    sys.modules[stand_in.__name__] = stand_in


if __name__ == "__main__":
    leave_out_warmup()
    runpy.run_module("mistral_chat.cli.main", run_name="__main__", alter_sys=True)
