"""What one answer cost: plain data, no torch (the TUI and the service read it before the engine loads)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    """What one answer cost."""

    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens run through the model; the rest came from the cache
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    host_wait_seconds: float = 0.0  # of decode_seconds, the host waited for the GPU's tokens (all of it: GPU-bound)
    finish_reason: str = "stop"  # stop (EOS) | length (max tokens or context) | cancelled
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and of those, accepted by the model
    accepted_tokens: int = 0

    @property
    def acceptance(self) -> float:
        """The share of drafted tokens the model accepted (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time since the first."""
        if self.generated_tokens < 2 or self.decode_seconds <= 0:
            return 0.0
        return (self.generated_tokens - 1) / self.decode_seconds
