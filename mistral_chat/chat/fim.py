"""Fill-in-the-middle (Codestral): the code before and after the cursor as the ids a FIM model completes.

The layout is mistral-common's `encode_fim`: <s> [SUFFIX] suffix [PREFIX] prefix, and the model writes the middle
next, ending with </s>. The suffix is encoded without a leading space of its own: mistral-common encodes
"\u263a" + suffix and drops the first two ids (sentencepiece's dummy-prefix space and the smiley; for tekken the
smiley's two byte tokens), and so do we, to give the same ids. [MIDDLE] is not used.

Tokenizers with [PREFIX] and [SUFFIX] control tokens support it: sentencepiece v3 and v7 (Codestral-22B-v0.1
ships v3) and every tekken file. v1 has no such tokens; the v2 file has none either (mistral-common would write
<unk> in their place), so both are refused.
"""

from __future__ import annotations

import logging

from mistral_chat.errors import TokenizerError
from mistral_chat.text.base import Tokenizer

log = logging.getLogger(__name__)

PREFIX, SUFFIX = "[PREFIX]", "[SUFFIX]"
_SUFFIX_LEAD = "\u263a"  # mistral-common's marker: encode(lead + suffix)[2:] is the suffix without a dummy space


def supports_fim(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer can lay out a FIM prompt (v2+ with [PREFIX] and [SUFFIX] control tokens)."""
    if tokenizer.version_number < 2:
        return False
    try:
        tokenizer.special_id(PREFIX)
        tokenizer.special_id(SUFFIX)
    except TokenizerError:
        return False
    return True


def encode_fim(tokenizer: Tokenizer, prefix: str, suffix: str) -> list[int]:
    """<s> [SUFFIX] suffix [PREFIX] prefix: the model's answer is the code between prefix and suffix.

    TokenizerError if the model's tokenizer has no FIM tokens (a chat model, not Codestral).
    """
    if not supports_fim(tokenizer):
        raise TokenizerError(
            f"the model does not support fill-in-the-middle: its tokenizer ({tokenizer.version}, {tokenizer.path}) "
            "has no [PREFIX]/[SUFFIX] tokens; use a Codestral model"
        )
    suffix_ids = tokenizer.encode(_SUFFIX_LEAD + suffix)[2:] if suffix else []
    return [
        tokenizer.bos_id,
        tokenizer.special_id(SUFFIX),
        *suffix_ids,
        tokenizer.special_id(PREFIX),
        *tokenizer.encode(prefix),
    ]
