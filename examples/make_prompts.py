"""Write the example soft prompts in ``examples/prompts/`` by PEFT's TEXT initialisation.

Each task's virtual tokens are the base model's input embeddings of an instruction text (what PEFT's
``PromptTuningInit.TEXT`` does before training): ``[num_virtual_tokens, hidden_size]``, saved as one tensor in a
``.safetensors`` file. They are placeholders until trained prompts replace them (issue 3); they steer the model
the way prepending their text would, in fewer positions of the request.

Usage: ``python examples/make_prompts.py [--model PATH] [--out examples/prompts]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.config import Settings
from server.model_loader import load_model

#: task -> few-shot text whose embeddings become the virtual tokens.
TASKS: dict[str, str] = {
    "capital": "France: Paris\nJapan: Tokyo\nItaly: Rome\nEgypt: Cairo\n",
    "antonym": "hot -> cold\nbig -> small\nfast -> slow\nhappy -> sad\n",
    "french": "English: cheese\nFrench: fromage\nEnglish: house\nFrench: maison\nEnglish: dog\nFrench: chien\n",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "prompts")
    args = ap.parse_args(argv)
    loaded = load_model(args.model, cache_dir=Settings().cache_dir, device="cpu", dtype="float32")
    embed = loaded.model.get_input_embeddings()
    args.out.mkdir(parents=True, exist_ok=True)
    for task, text in TASKS.items():
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            emb = embed(torch.tensor(ids)).float().contiguous()  # [num_virtual_tokens, hidden_size]
        path = args.out / f"{task}.safetensors"
        save_file({"prompt_embeddings": emb}, str(path), metadata={"format": "pt", "init_text": text})
        print(f"{path}: {emb.shape[0]} virtual tokens from {text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
