"""Errors a user can cause. Each message names the thing and says what to do."""


class MistralChatError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""

    exit_code = 1


class ModelFilesError(MistralChatError):
    """A model directory is missing, incomplete, corrupt or of an unknown format."""


class TokenizerError(MistralChatError):
    """No usable tokenizer file, or a tokenizer that does not fit the model."""


class ContextLengthError(MistralChatError):
    """A prompt longer than the model's context."""


class DeviceError(MistralChatError):
    """A device that is not there, or not enough memory on it."""


class DownloadError(MistralChatError):
    """A pull that could not complete: network, hub, disk or access."""


class ModelNotFoundError(MistralChatError):
    """A model name that is neither an alias, a local model nor a repo id."""
