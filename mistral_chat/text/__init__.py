"""Tokenizers (sentencepiece, tekken) and UTF-8-safe incremental decoding."""

from mistral_chat.text.base import Tokenizer
from mistral_chat.text.stream import StreamDecoder
from mistral_chat.text.tokenizer import find_tokenizer_file, load_tokenizer

__all__ = ["StreamDecoder", "Tokenizer", "find_tokenizer_file", "load_tokenizer"]
