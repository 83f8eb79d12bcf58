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


class CaptionTokenizer:
    """open_clip's tokenizer for one model as ``str -> LongTensor[context_length]``; picklable (the loader ships it
    to forkserver/spawn workers), the open_clip tokenizer itself is rebuilt on first use in each process."""

    worker_preload_modules = ("open_clip",)  # what a forkserver loader worker should import once, not per worker

    def __init__(self, model_name: str, context_length: int):
        self.model_name, self.context_length = model_name, context_length
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {"model_name": self.model_name, "context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_name"], state["context_length"])

    def __call__(self, caption: str) -> torch.Tensor:
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name, context_length=self.context_length)
        return self._tokenizer([caption])[0]


def build_tokenizer(model_name: str = "ViT-B-32",
                    context_length: int = CONTEXT_LENGTH_TOKENS) -> Callable[[str], torch.Tensor]:
    """open_clip tokenizer for ``model_name``: ``str -> LongTensor[context_length]`` (start/end tokens, zero
    padded, truncated to the context length). Built here once so that a bad model name fails in the caller."""
    tokenizer = CaptionTokenizer(model_name, context_length)
    tokenizer("")
    return tokenizer
