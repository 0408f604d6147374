"""The one exception a consumer has to handle when a tensor cannot be had.

A step that cannot read an input fails with a typed, retryable error rather than a transport
traceback, so callers catch `TensorUnavailable` and never `OSError`/`ConnectionError`.
"""

from __future__ import annotations


class TensorUnavailable(Exception):
    """A tensor could not be read: unknown or released key, bad token, expired, or producer gone.

    `key` names the tensor and `reason` says why, so a log line is enough to diagnose it.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"tensor {key!r} unavailable: {reason}")
        self.key = key
        self.reason = reason
