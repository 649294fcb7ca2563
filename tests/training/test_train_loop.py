"""The training loop on the tiny model: the loss falls, only the prompt trains, runs are deterministic, and the
fast loss equals PEFT's own label loss."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from training.data import Row, collate, encode_row
from training.train import (
    TrainConfig,
    TrainingError,
    batch_order,
    build_peft_model,
    check_only_prompt_trains,
    output_loss,
    prepare_data,
    train,
)


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(task="km", data=data, out=out, steps=12, batch_size=8, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_a_few_steps_lower_the_loss(fresh_tiny, km_data, tmp_path, method):
    loaded = fresh_tiny
    cfg = _cfg(km_data, tmp_path / "out", method=method, lr=3e-2 if method == "prompt_tuning" else 1e-2)
    encoded = prepare_data(loaded, cfg)
    batch = collate(encoded, pad_id=2)  # all 48 rows: a fixed measure of the loss
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    res = train(loaded, cfg, log=lambda *_: None)
    assert len(res.losses) == 12
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))["prompt_embeddings"]
    before_cfg = _cfg(km_data, tmp_path / "unused", method=method)
    fresh, _, _ = build_peft_model(loaded, before_cfg)  # same seed: the prompt as it was before step 1
    with torch.no_grad():
        before = float(output_loss(fresh, batch, 20))
        emb = loaded.model.get_input_embeddings()(batch["input_ids"])
        x = torch.cat([saved[None].expand(len(encoded), -1, -1), emb], dim=1)
        mask = torch.cat([torch.ones(len(encoded), 20, dtype=torch.long), batch["attention_mask"]], dim=1)
        logits = loaded.model(inputs_embeds=x, attention_mask=mask).logits[:, 19:-1]
        after = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        batch["labels"].reshape(-1), ignore_index=-100))
    assert after < before - 0.05, (before, after)
    # the base model's weights never change
    assert all(torch.equal(weights[k], v) for k, v in loaded.model.state_dict().items())


def test_fast_loss_equals_peft_label_loss(fresh_tiny, km_data, tmp_path):
    """PEFT prepends -100 labels for the virtual tokens itself; our loss (LM head only where an output token is
    predicted) must agree with ``peft_model(..., labels=...).loss``."""
    cfg = _cfg(km_data, tmp_path / "o")
    encoded = prepare_data(fresh_tiny, cfg)
    empty = encode_row(fresh_tiny.tokenizer, Row(1, "", "5 m"), end_id=2)  # no BOS: the first label is at 0
    assert empty.labels[0] != -100
    for method in ("prompt_tuning", "p_tuning"):
        peft_model, _, _ = build_peft_model(fresh_tiny, _cfg(km_data, tmp_path / "o", method=method))
        # different lengths: right padding inside the batch; then a batch with an empty input
        for rows in ([encoded[0], encoded[10], encoded[20]], [encoded[3], empty]):
            batch = collate(rows, pad_id=2)
            with torch.no_grad():
                ours = output_loss(peft_model, batch, 20)
                theirs = peft_model(**batch, use_cache=False).loss
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and the gradient reaches the prompt
    output_loss(peft_model, collate(encoded[:4], pad_id=2), 20).backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_counts_and_only_the_prompt_trains(fresh_tiny, km_data, tmp_path):
    total_base = sum(p.numel() for p in fresh_tiny.model.parameters())
    peft_model, trainable, total = build_peft_model(fresh_tiny, _cfg(km_data, tmp_path / "o"))
    assert trainable == 20 * 64 and total == total_base + 20 * 64
    fresh_tiny.model.lm_head.weight.requires_grad_(True)  # something else trains: refused
    with pytest.raises(TrainingError, match="lm_head"):
        check_only_prompt_trains(peft_model)


def test_p_tuning_counts_the_encoder(fresh_tiny, km_data, tmp_path):
    _, trainable, _ = build_peft_model(fresh_tiny, _cfg(km_data, tmp_path / "o", method="p_tuning",
                                                        encoder_hidden_size=32))
    # embedding [20, 64] + MLP 64->32->32->64 (weights and biases)
    assert trainable == 20 * 64 + (64 * 32 + 32) + (32 * 32 + 32) + (32 * 64 + 64)


def test_same_seed_same_adapter(smol_tokenizer, km_data, tmp_path):
    from srv_helpers import build_tiny_model, wrap_loaded

    tensors = []
    for run, seed in enumerate([7, 7, 8]):
        loaded = wrap_loaded(build_tiny_model(len(smol_tokenizer), seed=0), smol_tokenizer)
        train(loaded, _cfg(km_data, tmp_path / f"r{run}", steps=4, seed=seed), log=lambda *_: None)
        tensors.append(load_file(str(tmp_path / f"r{run}" / "adapter_model.safetensors"))["prompt_embeddings"])
    assert torch.equal(tensors[0], tensors[1])
    assert not torch.equal(tensors[0], tensors[2])


def test_batch_order_is_seeded_and_covers_each_epoch():
    a = batch_order(10, 4, 5, seed=3)
    assert a == batch_order(10, 4, 5, seed=3) and a != batch_order(10, 4, 5, seed=4)
    flat = [i for b in a for i in b]
    assert len(flat) == 20 and sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


@pytest.mark.parametrize(("kw", "msg"), [
    (dict(init="words"), "--init must be"),
    (dict(init="text:  "), "needs some text"),
    (dict(method="lora"), "--method must be"),
    (dict(steps=3, epochs=1.0), "not both"),
    (dict(steps=0), "--steps must be >= 1"),
])
def test_bad_options_raise(fresh_tiny, km_data, tmp_path, kw, msg):
    with pytest.raises(TrainingError, match=msg):
        train(fresh_tiny, _cfg(km_data, tmp_path / "o", **kw), log=lambda *_: None)


def test_epochs_and_text_init(fresh_tiny, km_data, tmp_path):
    res = train(fresh_tiny, _cfg(km_data, tmp_path / "o", steps=None, epochs=0.5, init="text:convert km to m"),
                log=lambda *_: None)
    assert res.steps == 3  # ceil(0.5 * 48 / 8)
    # TEXT init starts from the embeddings of the text's tokens, repeated to 20 virtual tokens
    ids = fresh_tiny.tokenizer("convert km to m")["input_ids"]
    peft_model, _, _ = build_peft_model(fresh_tiny, _cfg(km_data, tmp_path / "p", init="text:convert km to m"))
    start = peft_model.prompt_encoder["default"].embedding.weight
    expect = fresh_tiny.model.get_input_embeddings().weight[(ids * 20)[:20]]
    torch.testing.assert_close(start, expect)
