"""mistral-chat: chat with Mistral-family models from the terminal, or from Python:

    from mistral_chat import Model
    with Model.load("mistral-7b-instruct") as model:
        print(model.chat([{"role": "user", "content": "Hi"}]).text)

`Model` and its types come from `mistral_chat.api` on first use, so `import mistral_chat` imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ChatRequest", "Model", "ModelTokenizer", "Reply", "Usage", "__version__"]

_API_NAMES = frozenset({"ChatRequest", "Model", "ModelTokenizer", "Reply", "Usage"})

if TYPE_CHECKING:
    from mistral_chat.api import ChatRequest, Model, ModelTokenizer, Reply, Usage


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from mistral_chat import api

        return getattr(api, name)
    raise AttributeError(f"module 'mistral_chat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API_NAMES)
