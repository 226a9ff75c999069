"""mistral-chat: chat with Mistral-family models from the terminal."""

__version__ = "0.1.0"
