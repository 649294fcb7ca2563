"""``softprompt eval`` on the three kinds of trained prompt in one run: PEFT prompt tuning, p-tuning and prefix
tuning adapter directories, each its own condition, each equal to PEFT's own forward pass; the JSON records each
prompt's training metadata, which ``softprompt eval-report`` files under its method's column."""

from __future__ import annotations

import json

import pytest
from srv_helpers import peft_greedy_reference, save_peft_adapters

from training.adapter import META_FILE
from training.data import Row
from training.eval_backends import EngineBackend
from training.eval_cli import eval_main
from training.evaluate import evaluate
from training.report import columns_of

MAX_NEW = 5
# PEFT's prefix-tuning forward (the reference) passes past_key_values, which transformers deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def adapters(tiny_loaded, tmp_path_factory):
    """``{method: (peft_model, dir)}``: PEFT adapters on copies of the tiny model, prompt encoders perturbed, saved
    with ``save_pretrained`` plus a ``softprompt_training.json`` naming the method."""
    from peft import (
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    root = tmp_path_factory.mktemp("methods")
    configs = {
        "prompt_tuning": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6,
                                            prompt_tuning_init=PromptTuningInit.RANDOM),
        "p_tuning": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=32,
                                        encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP),
        "prefix_tuning": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8),
    }
    out = save_peft_adapters(tiny_loaded.model, configs, root, seed=700, perturb=0.5)
    for i, method in enumerate(configs):
        (root / method / META_FILE).write_text(json.dumps({"method": method, "template": "plain",
                                                           "trainable_params": 100 + i, "wall_s": 10.0 * (i + 1)}))
    return out


def _refs(tiny_loaded, adapters, rows):
    tok = tiny_loaded.tokenizer
    return {m: [tok.decode(peft_greedy_reference(pm, tok(r.input)["input_ids"], MAX_NEW)[0], skip_special_tokens=True)
                for r in rows] for m, (pm, _) in adapters.items()}


def test_three_methods_in_one_run_equal_peft(tiny_loaded, adapters):
    rows = [Row(1, "The movie was great", "x"), Row(2, "ok", "y"), Row(3, "I did not like the ending", "z")]
    refs = _refs(tiny_loaded, adapters, rows)
    backend = EngineBackend(tiny_loaded, "t", {m: d for m, (_, d) in adapters.items()})
    assert {m: p.peft_type for m, p in backend.prompts.items()} == {
        "prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}
    res = evaluate(rows, backend, conditions=("base", *adapters), instruction=None, max_new_tokens=MAX_NEW,
                   prompts=dict.fromkeys(adapters, False), progress=False)
    for m in adapters:
        assert [r["results"][m]["output"] for r in res["rows"]] == refs[m], m
    assert len({tuple(v) for v in refs.values()}) == 3  # the three prompts really differ


def test_cli_records_methods_for_the_report(tiny_loaded, adapters, write_jsonl, tmp_path):
    data = write_jsonl([{"input": "ok", "output": "y"}, {"input": "The movie was great", "output": "x"}], "t.jsonl")
    out = tmp_path / "eval.json"
    argv = ["--task", "t", "--data", str(data), "--json", str(out), "--max-new-tokens", str(MAX_NEW), "--no-progress",
            "--prompt", f"pt={adapters['prompt_tuning'][1]}", "--prompt", f"ptune={adapters['p_tuning'][1]}",
            "--prompt", f"prefix={adapters['prefix_tuning'][1]}"]
    assert eval_main(argv, loaded=tiny_loaded) == 0
    doc = json.loads(out.read_text())
    assert list(doc["summary"]) == ["base", "pt", "ptune", "prefix"]  # no instruction, no train.jsonl
    assert doc["prompts"]["prefix"]["training"]["method"] == "prefix_tuning"
    cols = columns_of(doc)
    assert {c: v["condition"] for c, v in cols.items()} == {
        "base": "base", "prompt_tuning": "pt", "p_tuning": "ptune", "prefix_tuning": "prefix"}
    assert cols["prefix_tuning"]["training"]["wall_s"] == 30.0
