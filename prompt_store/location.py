"""Where prompts live: a plain directory (watched) or an fsspec URL (a shared store, polled); one factory for both.

``--prompts`` accepts:

* a path (``/srv/prompts``, ``prompts``): :class:`prompt_store.store.PromptStore`, the watched directory;
* ``s3://bucket/prefix`` (s3fs), ``file:///abs/dir`` or ``memory://name`` (tests):
  :class:`prompt_store.remote.RemoteStore`, shared by replicas and polled.

S3 endpoint, region and credentials come from botocore's standard environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, or a profile / instance role), which
botocore >= 1.31 reads itself, so MinIO, moto and AWS all work without extra settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from prompt_store.registry import PromptRegistry, SoftPrompt
from prompt_store.tensors import Limits

#: URL schemes a shared store may use.
URL_SCHEMES: tuple[str, ...] = ("s3", "file", "memory")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.S)
EXPECTED = "a directory path or an s3://bucket/prefix, file:///dir or memory://name URL"


def normalize_location(value: str | Path | None) -> str | Path | None:
    """Check a ``--prompts`` value: a ``Path`` for a directory, the URL string for a shared store, or ``None``.

    Raises:
        ValueError: an empty value, a URL of another scheme, or a URL with nothing after ``://`` (an S3 URL
            without a bucket); the one-line message names what was expected.
    """
    if value is None or isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"prompts: expected {EXPECTED}, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError(f"prompts: expected {EXPECTED}, got an empty string")
    m = _SCHEME_RE.fullmatch(text)
    if m is None:
        return Path(text)
    scheme, rest = m.group(1).lower(), m.group(2).strip("/")
    if scheme not in URL_SCHEMES:
        raise ValueError(f"prompts: unsupported URL scheme {scheme!r} in {text!r}; expected {EXPECTED}")
    if not rest or "\n" in rest:
        raise ValueError(f"prompts: {text!r} names no {'bucket' if scheme == 's3' else 'location'}; "
                         f"expected {EXPECTED}")
    return f"{scheme}://{m.group(2)}"


def open_blobs(url: str):
    """The :class:`prompt_store.blobs.Blobs` of a shared-store URL (listing caches off).

    Raises:
        ValueError: the URL is not one of :data:`URL_SCHEMES`.
        ImportError: ``s3fs`` is not installed (an ``s3://`` URL).
    """
    import fsspec

    from prompt_store.blobs import Blobs

    checked = normalize_location(url)
    if not isinstance(checked, str):
        raise ValueError(f"prompts: expected an s3://, file:// or memory:// URL, got {url!r}")
    fs, root = fsspec.url_to_fs(checked, use_listings_cache=False, skip_instance_cache=True)
    return Blobs(fs, root, checked)


def open_store(
    location: str | Path | None,
    registry: PromptRegistry,
    limits: Limits,
    *,
    on_load: Callable[[SoftPrompt, str], None] | None = None,
    on_error: Callable[[str, Exception], None] | None = None,
    on_remove: Callable[[str], None] | None = None,
    poll_interval: float = 2.0,
):
    """The store for ``location``: a :class:`~prompt_store.store.PromptStore` for a directory path or ``None``
    (memory-only), a :class:`~prompt_store.remote.RemoteStore` polled every ``poll_interval`` seconds for a URL.

    Raises:
        ValueError: an unsupported URL scheme or a ``poll_interval`` not above 0.
        ImportError: ``s3fs`` is missing for an ``s3://`` URL.
    """
    checked = normalize_location(location)
    callbacks = {"on_load": on_load, "on_error": on_error, "on_remove": on_remove}
    if checked is None or isinstance(checked, Path):
        from prompt_store.store import PromptStore

        return PromptStore(checked, registry, limits, **callbacks)
    from prompt_store.remote import RemoteStore

    return RemoteStore(open_blobs(checked), registry, limits, poll_interval=poll_interval, **callbacks)
