"""Incremental detokenization: text deltas as tokens arrive, never half a UTF-8 character.

Joining every `push` result and the final `flush` gives exactly `tokenizer.decode(all_ids)`. Each push costs
O(1): the decoder keeps only the few bytes of an unfinished character and a flag for the leading space.
"""

from __future__ import annotations

from mistral_chat.text.base import Tokenizer


class StreamDecoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = tokenizer.incremental_decoder()

    def push(self, token_id: int) -> str:
        """The text this token completes; "" while a character is still incomplete or for special tokens."""
        return self._decoder.push(int(token_id))

    def flush(self) -> str:
        """Text still held back (an unfinished character becomes U+FFFD); call when the stream ends."""
        return self._decoder.flush()
