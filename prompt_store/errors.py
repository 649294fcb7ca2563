"""The one exception type of :mod:`prompt_store`, with a short machine-readable reason code."""

from __future__ import annotations

#: Every reason code :class:`PromptError` is raised with, and what it means.
REASONS: dict[str, str] = {
    "bad_shape": "the tensor is not 2-D [num_virtual_tokens, width] with the model's width (hidden size; for prefix "
    "tuning layers x 2 x KV heads x head size), or its sizes are out of range",
    "bad_dtype": "the tensor dtype is not float16, bfloat16 or float32",
    "non_finite": "the tensor holds NaN or infinite values",
    "too_large": "a file, an upload or an archive's contents exceed the byte limit",
    "empty": "a file or an upload holds zero bytes",
    "bad_name": "a task name does not match the allowed pattern",
    "bad_kind": "a file name or path is of a kind that is not accepted (by its extension or type)",
    "bad_safetensors": "the bytes are not a valid safetensors file, or hold the wrong tensors",
    "bad_config": "adapter_config.json is not a valid JSON object, or disagrees with the tensor",
    "unsupported_peft_type": "the PEFT method (peft_type / task_type) cannot be served",
    "pickle_refused": "a pickle file (.bin, .pt, .pth, .pkl) was offered; pickles are never loaded",
    "missing_file": "a file a PEFT adapter directory needs, or the path itself, does not exist",
    "bad_archive": "an uploaded zip/tar is corrupt, or holds links, unsafe paths or too deep nesting",
    "ambiguous": "a task exists in the prompt directory both as <task>.safetensors and as <task>/",
    "bad_version_book": "the prompt directory's version book (.versions.json) is unreadable or malformed; versions "
    "restart from the files",
}


class PromptError(ValueError):
    """A soft-prompt file, upload or task name was refused.

    ``str(error)`` is the human-readable message, which names the expected and the actual value.
    ``error.reason`` is a short machine code, one of the keys of :data:`REASONS` (for example
    ``"bad_shape"``); the server maps it to an HTTP 4xx and a metric label.

    Subclasses :class:`ValueError`, so callers that only know "bad input" can catch that.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        """Create the error.

        Args:
            message: human-readable explanation naming expected and actual values.
            reason: short machine code; must be a key of :data:`REASONS`.

        Raises:
            KeyError: if ``reason`` is not a known code (a programming error, not an input error).
        """
        if reason not in REASONS:
            raise KeyError(f"unknown PromptError reason {reason!r}; expected one of {sorted(REASONS)}")
        super().__init__(message)
        self.reason: str = reason

    def __repr__(self) -> str:
        return f"PromptError(reason={self.reason!r}, message={str(self)!r})"
