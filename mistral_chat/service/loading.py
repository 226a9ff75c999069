"""What loading a model takes beyond the engine: finding its folder from a name, and preparing compiled decode."""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys

from mistral_chat.engine.options import LoadOptions
from mistral_chat.errors import MistralChatError, ModelFilesError, ModelNotFoundError

log = logging.getLogger(__name__)


def resolve_model_path(name: str | None) -> str:
    """The folder of the model `name` (a folder, an alias or a repo id; None: the last one used), remembered as
    the last used (best-effort: a read-only data folder does not stop the answer); ModelNotFoundError says what to
    do when there is none."""
    from mistral_chat.models.store import last_used_model, mark_used, resolve_model

    if name is None:
        name = last_used_model()
        if name is None:
            raise ModelNotFoundError("no model given and none used before: pass --model PATH_OR_NAME, "
                                     "or run `mistral-chat pull mistral-7b-instruct` first")
    path = resolve_model(name)
    try:
        mark_used(name)
    except (OSError, MistralChatError) as exc:  # bookkeeping: the answer comes anyway
        log.info("cannot record %s as the last used model: %s", name, exc)
    return str(path)


def model_to_pull(name: str | None) -> str | None:
    """The name to pull (an alias or repo id) when `name` is a hub model that is not (completely) on disk, as
    `pull` spells it; with no name, the last used model, or the catalogue's default when nothing is on disk and
    none was used. None when there is nothing to pull: the model is there, or `name` is no hub model (a folder,
    a typo): resolve_model_path then says what is wrong. None too under HF_HUB_OFFLINE (no download to offer)."""
    from mistral_chat.models.catalogue import DEFAULT_ALIAS
    from mistral_chat.models.hub_settings import hub_offline
    from mistral_chat.models.pull import parse_target
    from mistral_chat.models.store import last_used_model, list_models, resolve_model

    if name is None and hub_offline():
        return None
    if name is None:
        name = last_used_model()
        if name is None:
            return None if list_models() else DEFAULT_ALIAS
    try:
        resolve_model(name)
        return None
    except (ModelNotFoundError, ModelFilesError):
        pass
    try:
        target = parse_target(name)
    except MistralChatError:
        return None
    return target.name if target.repo_id is not None else None


def prepare_compile(options: LoadOptions) -> LoadOptions:
    """`options` with `compile` kept only where decode compiles (a CUDA GPU, not --device cpu); when it does,
    inductor's cache goes to the app's home, so that later start-ups skip most of the compiling."""
    import torch

    if not options.compile or options.device == "cpu" or not torch.cuda.is_available():
        return dataclasses.replace(options, compile=False) if options.compile else options
    from mistral_chat.engine.decode import use_compile_cache
    from mistral_chat.paths import app_home

    use_compile_cache(app_home() / "compile-cache")
    return options


def release_memory() -> None:
    """After the last reference to a model is dropped: collect the garbage and hand the GPU's cached blocks back.
    Best effort; torch is used only if it is already imported."""
    gc.collect()
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - freeing memory is best effort
        pass
