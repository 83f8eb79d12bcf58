"""Bad-sample handling: one exception type that names a reason, and one counter that records every skip.

Every stage of the loading pipeline that rejects a sample raises :class:`SkipSample` with a short reason string.
Exactly one place (:meth:`SkipCounter.skip`, called by the pipeline driver in ``loader.py``) catches it, counts it per
reason and logs it with the shard and key. Errors that are clearly bugs (``TypeError``, ``AttributeError`` ...)
are never caught, so they stop the job instead of being silently counted.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("data_pipelines")

# Reasons used across the package. Filters add "filter:<name>".
EMPTY_IMAGE = "empty_image"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
DECODE_ERROR = "decode_error"
TOO_MANY_PIXELS = "too_many_pixels"
TRUNCATED_TAR = "truncated_tar"
UNREADABLE_SHARD = "unreadable_shard"
SHARD_NOT_FOUND = "shard_not_found"  # HTTP 404 / 410
SHARD_TIMEOUT = "shard_timeout"  # a remote shard (http(s) or pipe:) sent nothing for data.remote.timeout_s
SHARD_CONNECTION_LOST = "shard_connection_lost"  # dropped / refused connections or 5xx, retries used up
BAD_LABEL = "bad_label"
BAD_METADATA = "bad_metadata"


class SkipSample(Exception):
    """Raised by a pipeline stage to drop one sample (or the rest of a shard) for a named ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Counts skipped samples per reason and logs each one with shard and key.

    Logging is rate-limited per reason (the first ``log_first_n`` skips, then every ``log_every_n``-th) so that a
    badly broken source cannot flood the log; the counts are always exact.
    """

    def __init__(self, log_first_n: int = 10, log_every_n: int = 1000):
        self.counts: Counter[str] = Counter()
        self.log_first_n = log_first_n
        self.log_every_n = log_every_n

    def skip(self, error: SkipSample, *, shard: str, key: str | None) -> None:
        """Record one skip of ``key`` in ``shard`` for ``error.reason``."""
        self.counts[error.reason] += 1
        n_reason = self.counts[error.reason]
        if n_reason <= self.log_first_n or n_reason % self.log_every_n == 0:
            log.warning("skipped sample (%s, total %d): shard=%s key=%s %s", error.reason, n_reason, shard, key,
                        error.detail)

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = Counter({str(k): int(v) for k, v in state.items()})
