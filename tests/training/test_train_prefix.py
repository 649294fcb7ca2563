"""Prefix tuning (``--method prefix_tuning``, with and without ``--prefix-projection``) on the tiny model: the fast
loss equals PEFT's own, training lowers the loss of the prefix *as saved* (read back by hand with the layout of
the design notes, section 2), the adapter directory has the shapes and config fields a server needs, and only the
prefix encoder trains. The tiny Llama: 2 layers, 4 heads of 16, 2 KV heads, so PEFT's ``token_dim`` is 2 x 16 = 32
and the saved prefix is ``[20, 2 * 2 * 32]`` = ``[20, 128]``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import DynamicCache

from training.adapter import META_FILE
from training.cli import train_main
from training.data import DataError, Row, collate, encode_row
from training.train import (
    TrainConfig,
    TrainingError,
    build_peft_model,
    check_only_prompt_trains,
    output_loss,
    prepare_data,
    train,
)

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")]  # PEFT forward

LAYERS, KV_HEADS, HEAD_DIM, NV = 2, 2, 16, 20
WIDTH = LAYERS * 2 * KV_HEADS * HEAD_DIM  # 128


def _cfg(data, out, projection: bool, **kw) -> TrainConfig:
    base = dict(task="km", data=data, out=out, method="prefix_tuning", prefix_projection=projection, steps=12,
                batch_size=8, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _loss_from_saved_prefix(model, saved: torch.Tensor, batch: dict) -> float:
    """Mean output-token cross-entropy with the prefix built by hand from the saved ``[n, 2L * H_kv * D]`` tensor:
    reshape to ``(n, 2L, H_kv, D)``, block ``2l`` = K and ``2l + 1`` = V of layer ``l``, text at positions
    ``n, n+1, ...`` (the model's default after an ``n``-token cache), mask extended over the prefix."""
    b = batch["input_ids"].shape[0]
    kv = saved.view(NV, 2 * LAYERS, KV_HEADS, HEAD_DIM).permute(1, 2, 0, 3)  # [2L, H_kv, n, D]
    cache = DynamicCache()
    for layer in range(LAYERS):
        k, v = (kv[2 * layer + j][None].expand(b, -1, -1, -1).contiguous() for j in (0, 1))
        cache.update(k, v, layer)
    mask = torch.cat([torch.ones(b, NV, dtype=torch.long), batch["attention_mask"]], dim=1)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, cache=cache).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   batch["labels"][:, 1:].reshape(-1), ignore_index=-100))


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_training_lowers_the_loss_of_the_saved_prefix(fresh_tiny, km_data, tmp_path, projection):
    loaded = fresh_tiny
    cfg = _cfg(km_data, tmp_path / "out", projection, lr=1e-3 if projection else 1e-2)
    batch = collate(prepare_data(loaded, cfg), pad_id=2)  # all 48 rows: a fixed measure of the loss
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    res = train(loaded, cfg, log=lambda *_: None)
    assert len(res.losses) == 12
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert saved.shape == (NV, WIDTH) and saved.dtype == torch.float32
    fresh, _, _ = build_peft_model(loaded, _cfg(km_data, tmp_path / "unused", projection))  # same seed: step 0
    with torch.no_grad():
        before = float(output_loss(fresh, batch, NV))
        after = _loss_from_saved_prefix(loaded.model, saved, batch)
        # the saved tensor is the trained prefix itself (for projection: the MLP's output)
        trained = float(output_loss(res.peft_model, batch, NV))
    assert after == pytest.approx(trained, abs=1e-5)
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(weights[k], v) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_adapter_directory(fresh_tiny, km_data, tmp_path, projection):
    from peft import PeftModel

    out = tmp_path / "km"
    res = train(fresh_tiny, _cfg(km_data, out, projection, steps=3, encoder_hidden_size=48 if projection else None),
                log=lambda *_: None)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"] and f.metadata() == {"format": "pt"}
        saved = f.get_tensor("prompt_embeddings")
    assert saved.shape == (NV, WIDTH)
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "num_layers",
                                   "num_attention_heads", "token_dim", "num_transformer_submodules",
                                   "prefix_projection", "base_model_name_or_path")} == {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": NV, "num_layers": LAYERS,
        "num_attention_heads": KV_HEADS,  # PEFT narrows it to the KV heads (grouped-query attention)
        "token_dim": KV_HEADS * HEAD_DIM, "num_transformer_submodules": 1, "prefix_projection": projection,
        "base_model_name_or_path": "tiny-llama"}
    trainable = NV * 32 + (32 * 48 + 48) + (48 * WIDTH + WIDTH) if projection else NV * WIDTH
    meta = json.loads((out / META_FILE).read_text())
    assert {k: meta[k] for k in ("method", "prefix_projection", "init", "trainable_params", "saved_params",
                                 "steps")} == {
        "method": "prefix_tuning", "prefix_projection": projection, "init": None, "trainable_params": trainable,
        "saved_params": NV * WIDTH, "steps": 3}
    assert meta["encoder_hidden_size"] == (48 if projection else None)
    assert meta["wall_s"] == round(res.wall_s, 1) and meta["seconds_per_step"] == round(res.wall_s / 3, 3) > 0
    assert res.trainable_params == trainable and res.saved_params == NV * WIDTH
    card = (out / "README.md").read_text()
    assert f"A PEFT prefix_tuning adapter: {NV} virtual tokens x {WIDTH}" in card
    assert ("- init: PEFT's random prefix, through a projection MLP of width 48" if projection
            else "- init: PEFT's random prefix, no projection") in card
    # PEFT loads it back (inference mode: the prefix as saved) and its forward equals the trained model's
    x = torch.tensor([fresh_tiny.tokenizer("7 km")["input_ids"]])
    with torch.no_grad():
        want = res.peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        again = PeftModel.from_pretrained(fresh_tiny.model, str(out))
        assert torch.equal(again.prompt_encoder["default"].embedding.weight, saved)
        got = again(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_prefix_loss_equals_peft_label_loss(fresh_tiny, km_data, tmp_path):
    """Our loss passes PEFT's own prefix cache to the base model; it must equal ``peft_model(**batch).loss``, with
    right padding, and with an empty input (whose first output token nothing predicts: both leave it out)."""
    encoded = prepare_data(fresh_tiny, _cfg(km_data, tmp_path / "o", False))
    empty = encode_row(fresh_tiny.tokenizer, Row(1, "", "5 m"), end_id=2)
    assert empty.labels[0] != -100
    for projection in (False, True):
        peft_model, _, _ = build_peft_model(fresh_tiny, _cfg(km_data, tmp_path / "o", projection))
        for rows in ([encoded[0], encoded[10], encoded[20]], [encoded[3], empty]):
            batch = collate(rows, pad_id=2)
            with torch.no_grad():
                ours = output_loss(peft_model, batch, NV)
                theirs = peft_model(**batch, use_cache=False).loss
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        output_loss(peft_model, collate(encoded[:4], pad_id=2), NV).backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        assert len(grads) == (5 if projection else 1)  # embedding (+ two Linear layers' weights and biases)
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), list(grads)


def test_only_the_prefix_encoder_trains(fresh_tiny, km_data, tmp_path):
    total_base = sum(p.numel() for p in fresh_tiny.model.parameters())
    peft_model, trainable, total = build_peft_model(fresh_tiny, _cfg(km_data, tmp_path / "o", False))
    assert trainable == NV * WIDTH and total == total_base + NV * WIDTH
    peft_model, trainable, _ = build_peft_model(fresh_tiny, _cfg(km_data, tmp_path / "o", True))
    hidden = 64  # default projection width: the model's hidden size
    assert trainable == NV * 32 + (32 * hidden + hidden) + (hidden * WIDTH + WIDTH)
    fresh_tiny.model.model.layers[0].self_attn.k_proj.weight.requires_grad_(True)
    with pytest.raises(TrainingError, match=r"layers\.0\.self_attn\.k_proj"):
        check_only_prompt_trains(peft_model)


@pytest.mark.parametrize(("kw", "msg"), [
    (dict(method="prefix_tuning", init="vocab"), "--init applies to prompt tuning only"),
    (dict(method="prefix_tuning", init="text:km to m"), "--init applies to prompt tuning only"),
    (dict(method="prefix_tuning", encoder_hidden_size=32), "needs --prefix-projection"),
    (dict(method="prompt_tuning", prefix_projection=True), "--prefix-projection applies to --method prefix_tuning"),
    (dict(method="p_tuning", prefix_projection=True), "--prefix-projection applies to --method prefix_tuning"),
])
def test_options_that_do_not_apply_are_refused(fresh_tiny, km_data, tmp_path, kw, msg):
    cfg = TrainConfig(task="km", data=km_data, out=tmp_path / "o", steps=1, progress=False, **kw)
    with pytest.raises(TrainingError, match=msg):
        train(fresh_tiny, cfg, log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_prefix_tuning_refuses_empty_inputs_that_prompt_tuning_accepts(fresh_tiny, write_jsonl, tmp_path):
    """An empty input has no position to predict the first output token from under a prefix (the server answers it
    with 422 empty_input), so prefix tuning refuses such rows, naming their lines; prompt tuning trains on them."""
    data = write_jsonl([{"input": "3 km", "output": "3000 m"}, {"input": "", "output": "0 m"},
                        {"input": "4 km", "output": "4000 m"}, {"input": "", "output": "1 m"}])
    cfg = TrainConfig(task="km", data=data, out=tmp_path / "o", steps=1, progress=False, method="prefix_tuning")
    with pytest.raises(DataError) as info:
        prepare_data(fresh_tiny, cfg)
    assert [line for line, _ in info.value.problems] == [2, 4] and "422 empty_input" in str(info.value)
    assert len(prepare_data(fresh_tiny, TrainConfig(task="km", data=data, out=tmp_path / "p", steps=1))) == 4


def test_cli_prefix_tuning(fresh_tiny, km_data, tmp_path, capsys):
    out = tmp_path / "km"
    argv = ["--task", "km", "--data", str(km_data), "--out", str(out), "--steps", "2", "--no-progress",
            "--method", "prefix_tuning", "--prefix-projection", "--encoder-hidden-size", "16"]
    assert train_main(argv, loaded=fresh_tiny) == 0
    text = capsys.readouterr().out
    assert f"saved {out} ({NV} virtual tokens x {WIDTH} = {NV * WIDTH:,} numbers)" in text
    meta = json.loads((out / META_FILE).read_text())
    assert meta["prefix_projection"] is True and meta["encoder_hidden_size"] == 16 and meta["lr"] == 3e-4
    assert train_main([*argv[:-3], "--init", "vocab"], loaded=fresh_tiny) == 2
    assert "--init applies to prompt tuning only" in capsys.readouterr().err


def test_smollm2_prefix_shape(smol_dir, tmp_path):
    """SmolLM2-135M's own config (30 layers, 9 heads, 3 KV heads of 64; random weights, no checkpoint needed):
    the saved prefix is [20, 30 * 2 * 3 * 64] = [20, 11520] with and without projection."""
    from srv_helpers import wrap_loaded
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(smol_dir)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
            config.hidden_size) == (30, 3, 64, 576)
    loaded = wrap_loaded(AutoModelForCausalLM.from_config(config).eval(), AutoTokenizer.from_pretrained(smol_dir))
    for projection in (False, True):
        cfg = _cfg(tmp_path / "unused.jsonl", tmp_path / str(projection), projection)
        peft_model, trainable, _ = build_peft_model(loaded, cfg)
        assert trainable == (20 * 192 + (192 * 576 + 576) + (576 * 11520 + 11520) if projection else 20 * 11520)
        peft_model.save_pretrained(str(cfg.out))
        shape = load_file(str(cfg.out / "adapter_model.safetensors"))["prompt_embeddings"].shape
        config_json = json.loads((cfg.out / "adapter_config.json").read_text())
        assert shape == (20, 11520)
        assert (config_json["num_layers"], config_json["num_attention_heads"], config_json["token_dim"]) == (30, 3, 192)
