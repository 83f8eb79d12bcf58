"""Captions: strict UTF-8 decoding, cleaning, and tokenization with the open_clip tokenizer (77 token ids)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable

import torch

from data_pipelines.errors import CAPTION_NOT_UTF8, SkipSample

CONTEXT_LENGTH_TOKENS = 77
_WHITESPACE = re.compile(r"\s+")


def clean_caption(data: bytes) -> str:
    """Decode caption bytes as UTF-8 (raises SkipSample("caption_not_utf8") otherwise), unescape HTML entities,
    drop a BOM and collapse whitespace. Returns the cleaned string (possibly empty)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample(CAPTION_NOT_UTF8, str(e)) from e
    text = html.unescape(text.lstrip("\ufeff"))
    return _WHITESPACE.sub(" ", text).strip()


def build_tokenizer(model_name: str = "ViT-B-32",
                    context_length: int = CONTEXT_LENGTH_TOKENS) -> Callable[[str], torch.Tensor]:
    """open_clip tokenizer for ``model_name``: ``str -> LongTensor[context_length]`` (start/end tokens, zero
    padded, truncated to the context length)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)

    def tokenize(caption: str) -> torch.Tensor:
        return tokenizer([caption])[0]

    return tokenize
