"""The application's front to tensor parallelism (`--tp N`, or torchrun): a run started from `LoadOptions` and a
model name, and the hooks that let the engine worker load its models as tensor-parallel runs.

The engine's launcher (engine/parallel/launcher.py) does the work: spawning the followers, the process group,
rank 0's `ParallelSession`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mistral_chat.engine.options import LoadOptions
from mistral_chat.engine.parallel.group import ParallelRunError, RankOptions, is_torchrun_follower
from mistral_chat.engine.parallel.launcher import start_parallel_session
from mistral_chat.service.loading import resolve_model_path

if TYPE_CHECKING:
    from mistral_chat.engine.loader import LoadedModel
    from mistral_chat.engine.parallel.session import ParallelSession
    from mistral_chat.service.worker import LoadRequest


def start_parallel(model: str | None, options: LoadOptions, progress: Callable[[int, int], None] | None = None,
                   on_stuck: Callable[[str], None] | None = None
                   ) -> tuple[LoadedModel, ParallelSession] | None:
    """A run of `options.tp` ranks for the model `model` (a folder, alias or repo id; None: the last used).

    Rank 0 gets (its LoadedModel, a ParallelSession). A torchrun rank other than 0 follows rank 0 inside this
    call, with the model and options rank 0 sends, and gets None once rank 0 shuts the run down.
    """
    path = "" if is_torchrun_follower() else resolve_model_path(model)
    return start_parallel_session(RankOptions(path, options), options.tp, progress, on_stuck)


class ParallelModelLoader:
    """Hooks for `EngineWorker(loader=..., session_factory=...)` that load models as tensor-parallel runs.

    Loading another model shuts the previous run's followers down first; `close()` ends the last run.
    """

    def __init__(self, world: int | None, on_stuck: Callable[[str], None] | None = None) -> None:
        self.world = world
        self.on_stuck = on_stuck
        self.session: ParallelSession | None = None

    def load(self, request: LoadRequest, progress: Callable[[int, int], None]) -> LoadedModel:
        """Start a run of `world` ranks (None: torchrun's) for the request's model and options."""
        self.close()
        started = start_parallel_session(RankOptions(str(request.path), request.options), self.world, progress,
                                         self.on_stuck)
        if started is None:
            raise ParallelRunError("this process is a tensor-parallel follower and hosts no UI")
        loaded, self.session = started
        return loaded

    def session_factory(self, loaded: LoadedModel, context_length: int | None) -> ParallelSession:
        assert self.session is not None and self.session.loaded is loaded, "call load first"
        return self.session

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
