"""The adapter directory a training run writes: PEFT's ``save_pretrained`` output (what the server loads), the
training metadata (:data:`META_FILE`), a short model card, and the upload through the admin API."""

from __future__ import annotations

import json
from pathlib import Path

from prompt_store.diskio import apply_plain_modes, plain_file_mode
from server.model_loader import LoadedModel

#: Written next to the adapter: how it was trained (the server ignores it; ``softprompt eval`` reads its template).
META_FILE = "softprompt_training.json"


def save_adapter(peft_model, out: Path, loaded: LoadedModel, meta: dict) -> None:
    """``save_pretrained`` (safetensors) into ``out``, plus :data:`META_FILE` and a model card (README.md).

    Local paths in the PEFT config (``base_model_name_or_path``, and ``tokenizer_name_or_path`` of TEXT init) are
    replaced by the model id, so the adapter names the model and not this machine's cache. PEFT loads adapters
    with ``inference_mode=True``, which skips TEXT initialisation, so the tokenizer path is never needed again.

    Every file written (and ``out`` itself, when this call creates it) gets the mode a plain ``open`` / ``mkdir``
    gives (``0o644`` / ``0o755`` under umask 022): the safetensors writer alone leaves ``0o600``, which a server
    running as another user cannot read.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in out.iterdir()}
    pcfg = peft_model.peft_config["default"]
    pcfg.base_model_name_or_path = loaded.model_id
    if getattr(pcfg, "tokenizer_name_or_path", None):
        pcfg.tokenizer_name_or_path = loaded.model_id
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    write_model_card(out, meta)
    if created:
        apply_plain_modes(out, recursive=False)
    mode = plain_file_mode()
    ours = {"adapter_config.json", "adapter_model.safetensors", "README.md", META_FILE}
    for path in out.iterdir():  # what save_pretrained wrote (known names, or new), and the two files above
        if (path.name in ours or path.name not in before) and path.is_file() and not path.is_symlink():
            path.chmod(mode)


def write_model_card(out: Path, meta: dict) -> None:
    """Replace PEFT's boilerplate README.md (which names the model's local cache path) with a short card built
    from the training metadata ``meta`` (the content of :data:`META_FILE`)."""
    template = "chat template (`/v1/chat/completions`)" if meta.get("template") == "chat" else \
        "plain (`/v1/tasks/{task}/generate`)"
    lines = [
        f"# Soft prompt `{meta['task']}` for {meta['model_id']}", "",
        f"A PEFT {meta['method']} adapter: {meta['num_virtual_tokens']} virtual tokens x "
        f"{meta['saved_params'] // meta['num_virtual_tokens']} (`prompt_embeddings`), made by `softprompt train`.",
        "", f"- template: {template}",
        f"- data: `{meta['data']}` ({meta['rows']} rows, sha256 `{meta['data_sha256'][:16]}...`)",
        _init_line(meta),
        f"- {meta['steps']} steps x batch {meta['batch_size']}, AdamW lr {meta['lr']}, seed {meta['seed']}, "
        f"{meta['device']}, {meta['torch_threads']} torch threads, {meta['wall_s']} s",
        f"- loss {meta['first_loss']:.4f} -> {meta['final_loss']:.4f} (mean token cross-entropy, nats)",
        f"- trainable parameters {meta['trainable_params']:,} of {meta['total_params']:,}", "",
        f"Serve it: put this directory under the server's `--prompts` directory as `{meta['task']}/`, or "
        f"`softprompt upload <dir> --task {meta['task']}`.", "",
    ]
    (Path(out) / "README.md").write_text("\n".join(lines))


def _init_line(meta: dict) -> str:
    """The model card's line on how the prompt started (prompt tuning's ``init``, or the method's own)."""
    if meta.get("init"):
        return f"- init: `{meta['init']}`"
    if meta.get("method") == "prefix_tuning":
        return (f"- init: PEFT's random prefix, through a projection MLP of width {meta.get('encoder_hidden_size')}"
                if meta.get("prefix_projection") else "- init: PEFT's random prefix, no projection")
    return "- init: p-tuning MLP encoder"


def upload_adapter(out: Path, task: str, url: str, admin_token: str | None, client=None) -> dict:
    """Upload the adapter directory through ``PUT /v1/admin/prompts/{task}``; return the server's metadata.

    Args:
        client: a :class:`server.client.SoftpromptClient` to use (tests); default: a new one for ``url``.

    Raises:
        server.client.SoftpromptError: the server refused it (e.g. 401 without a valid token).
    """
    from server.client import SoftpromptClient

    if client is not None:
        return client.upload(task, out)
    with SoftpromptClient(url, admin_token=admin_token) as c:
        return c.upload(task, out)
