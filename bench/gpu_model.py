"""Models for the device check and the CUDA tests: Llama-family shapes built from a config with random weights
(nothing downloaded), a stand-in tokenizer, and random soft prompts.

Shapes (``transformers.LlamaConfig`` fields):
- :data:`LLAMA_1B`: Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads of 64, MLP 8192, vocabulary
  128,256, tied embeddings): 1.24e9 parameters, 2.47 GB in bf16.
- :data:`SMOLLM2_135M`: SmolLM2-135M (hidden 576, 30 layers, 9 heads, 3 KV heads of 64, MLP 1536, vocabulary
  49,152, tied embeddings), the project's default model, for the CUDA equivalence tests when its weights are not
  on the machine (the device machine has no network, and its GGUF file is larger than what a device run carries).
- :data:`TINY`: 2 layers, hidden 64, for ``--tiny`` runs on the CPU.

Generation never stops at an end token with these models (:func:`loaded_model` gives none), so every request
produces exactly ``max_new_tokens`` tokens in every system.
"""

from __future__ import annotations

import torch

from prompt_store.formats import ParsedPrompt
from prompt_store.registry import PromptRegistry, SoftPrompt
from server.model_loader import LoadedModel

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True)
SHAPES = {"llama-3.2-1b": LLAMA_1B, "smollm2-135m": SMOLLM2_135M, "tiny": TINY}


class IdTokenizer:
    """Stands in for a tokenizer where only decoding is needed (the engine's detokenizer): token ``i`` reads
    ``" t<i>"``. No special tokens, no end token."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(f" t{int(i)}" for i in ids)


def build_model(shape: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` with Hugging Face's random initialisation (seeded), built on ``device``
    in ``dtype``, eval mode, frozen. No end or padding token is configured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def loaded_model(model: torch.nn.Module, name: str) -> LoadedModel:
    """``model`` as the engine takes it: an :class:`IdTokenizer`, no end tokens, its own device and dtype."""
    p = next(model.parameters())
    return LoadedModel(model=model, tokenizer=IdTokenizer(int(model.config.vocab_size)), model_id=name,
                       device=p.device, dtype=p.dtype, eos_token_ids=(),
                       max_context=int(model.config.max_position_embeddings))


def weight_bytes_per_decode_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step must read: every parameter once (a tied embedding counts once, as the LM
    head reads it whole), except an untied input embedding, of which a step reads only its tokens' rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied parameter is yielded once
    emb = model.get_input_embeddings().weight
    if emb is not model.get_output_embeddings().weight:
        total -= emb.numel() * emb.element_size()
    return total


def random_prompts(model: torch.nn.Module, num_tasks: int, num_virtual: int, seed: int = 0) -> list[SoftPrompt]:
    """``num_tasks`` soft prompts ``[num_virtual, hidden]`` (CPU, the model's dtype, as prompt files load):
    rows of the input-embedding matrix plus Gaussian noise of a tenth of its standard deviation, so their scale
    is a trained prompt's. Tasks are named ``task-00000``, ... ."""
    emb = model.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, emb.shape[0], (num_tasks, num_virtual), generator=g)
    rows = emb[ids.to(emb.device)].float().cpu()  # [tasks, n, hidden]
    rows += torch.randn(rows.shape, generator=g) * float(emb.float().std()) * 0.1
    registry = PromptRegistry()
    out = []
    for i in range(num_tasks):
        prompt, _ = registry.put(f"task-{i:05d}", ParsedPrompt(rows[i].to(emb.dtype).contiguous(), "RAW"),
                                 "gpu-check")
        out.append(prompt)
    return out


def random_ids(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``num`` lists of ``length`` uniformly random token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num, length), generator=g).tolist()
