"""Metadata filters: each takes the selected fields of a sample and raises SkipSample("filter:<name>") to drop it.

The fields are ``{"image": bytes, "caption": str | None, "label": int, "meta": dict}`` where ``meta`` is the
sample's .json (img2dataset writes ``width``, ``height``, ``original_width`` ...). Image sizes come from the
metadata when present and otherwise from the image header (no full decode).
"""

from __future__ import annotations

import io
import operator
import re
from collections.abc import Callable

from PIL import Image

from data_pipelines.errors import DECODE_ERROR, SkipSample

SampleFilter = Callable[[dict], None]

_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le, ">": operator.gt,
        "<": operator.lt}
_CONDITION = re.compile(r"^\s*([\w.]+)\s*(==|!=|>=|<=|>|<)\s*(.+?)\s*$")


def image_size(fields: dict) -> tuple[int, int]:
    """(width, height) from the metadata, or from the image header."""
    meta = fields["meta"]
    if isinstance(meta.get("width"), int) and isinstance(meta.get("height"), int):
        return meta["width"], meta["height"]
    try:
        return Image.open(io.BytesIO(fields["image"])).size
    except (OSError, ValueError, SyntaxError) as e:
        raise SkipSample(DECODE_ERROR, f"header: {e}") from e


def min_image_side(min_side_px: int) -> SampleFilter:
    """Drop images whose shorter side is below ``min_side_px``."""

    def check(fields: dict) -> None:
        if min(image_size(fields)) < min_side_px:
            raise SkipSample("filter:min_image_side")

    return check


def max_aspect_ratio(max_ratio: float) -> SampleFilter:
    """Drop images whose long/short side ratio exceeds ``max_ratio``."""

    def check(fields: dict) -> None:
        width, height = image_size(fields)
        if max(width, height) > max_ratio * max(min(width, height), 1):
            raise SkipSample("filter:max_aspect_ratio")

    return check


def caption_length(min_chars: int = 0, max_chars: int | None = None) -> SampleFilter:
    """Drop samples whose cleaned caption is shorter than ``min_chars`` or longer than ``max_chars`` characters."""

    def check(fields: dict) -> None:
        n = len(fields["caption"] or "")
        if n < min_chars or (max_chars is not None and n > max_chars):
            raise SkipSample("filter:caption_length")

    return check


def field_condition(condition: str) -> SampleFilter:
    """Keep samples whose metadata satisfies ``"field OP value"`` (OP in == != >= <= > <; dotted fields reach into
    nested dicts; the value is compared as a number when it parses as one), e.g. ``"status == success"``,
    ``"original_width >= 512"``. A sample without the field is dropped."""
    match = _CONDITION.match(condition)
    if match is None:
        raise ValueError(f"cannot parse condition {condition!r}; expected 'field OP value'")
    path, op_name, raw_value = match.groups()
    op = _OPS[op_name]
    try:
        value: object = float(raw_value)
    except ValueError:
        value = raw_value.strip("'\"")
    name = f"filter:{path}{op_name}{raw_value}"

    def check(fields: dict) -> None:
        current: object = fields["meta"]
        for part in path.split("."):
            if not isinstance(current, dict) or part not in current:
                raise SkipSample(name, "field missing")
            current = current[part]
        try:
            ok = op(float(current), value) if isinstance(value, float) else op(str(current), value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise SkipSample(name)

    return check
