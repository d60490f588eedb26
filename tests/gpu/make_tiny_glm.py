#!/usr/bin/env python3
"""Make a tiny GLM checkpoint (random bf16 weights) for the GPU smoke test: GLM-4
(``Glm4ForCausalLM``) or GLM-5 (``GlmMoeDsaForCausalLM``).

The GPU machine has no network, so nothing is downloaded: the architecture comes from
transformers' own ``Glm4Config``, and the tokenizer is a real one that a package on the
machine ships: Mistral's Tekken BPE (``tekken_240911.json``, 131072 tokens) from the
``mistral_common`` wheel, which vLLM itself needs at import, converted to the Hugging Face
``tokenizer.json`` format by transformers' own converter. Only Hugging Face files are written
(no ``tekken.json``), so vLLM reads it as an ordinary HF tokenizer, as it would GLM's.

GLM-4 keeps its shape (grouped KV heads, partial rotary 0.5, attention bias, separate lm_head)
at a size that loads in seconds: hidden 256, 2 layers, 4 heads, 2 KV heads of 64. GLM-5 keeps
every dimension its kernels read (64 heads; the 512-wide latent and 64 rotary dims of its MLA
cache, the 576 FlashMLA takes; the sparse-attention indexer's 32 heads of 128 and its top 2048;
q/k/v head dims 192+64/256) at transformers' GLM-5 defaults, and shrinks only what no kernel
fixes: hidden 1024, 2 layers (the first dense), 8 routed experts of 256, 2 per token, no MTP
layer.

Usage: make_tiny_glm.py OUT_DIR [--architecture Glm4ForCausalLM|GlmMoeDsaForCausalLM] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# GLM-4-0414's chat layout ([gMASK]<sop>, <|role|> markers) as plain text: Tekken has no such
# special tokens, and a model with random weights answers noise either way.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tekken_file() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    if not path.is_file():
        sys.exit(f"{path} not found: mistral_common {getattr(mistral_common, '__version__', '?')} ships no Tekken file")
    return path


def glm4_config(tokenizer, vocab: int):
    from transformers import Glm4Config

    return Glm4Config(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        attention_bias=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        **token_ids(tokenizer),
        architectures=["Glm4ForCausalLM"],
        dtype="bfloat16",
    )


def glm5_config(tokenizer, vocab: int):
    from transformers import GlmMoeDsaConfig

    return GlmMoeDsaConfig(
        vocab_size=vocab,
        hidden_size=1024,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        q_lora_rank=256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        **token_ids(tokenizer),
        architectures=["GlmMoeDsaForCausalLM"],
        dtype="bfloat16",
    )


CONFIGS = {"Glm4ForCausalLM": glm4_config, "GlmMoeDsaForCausalLM": glm5_config}
# The tokens GLM-4.5 and later write around reasoning and tool calls: the catalog's glm45 and
# glm47 parsers look them up in the vocabulary (the reasoning parser refuses one without them).
GLM_TOKENS = {
    "GlmMoeDsaForCausalLM": [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
    ]
}


def token_ids(tokenizer) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}


def make(out: Path, seed: int, architecture: str = "Glm4ForCausalLM") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    source = tekken_file()
    tokenizer = convert_tekken_tokenizer(str(source), chat_template=CHAT_TEMPLATE)
    tokenizer.add_tokens(GLM_TOKENS.get(architecture, []), special_tokens=True)
    vocab = len(tokenizer)
    config = CONFIGS[architecture](tokenizer, vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stray = [name for name in os.listdir(out) if name == "tekken.json" or name.startswith("tokenizer.model")]
    for name in stray:  # vLLM would switch to its Mistral tokenizer mode on these
        (out / name).unlink()
    params = sum(p.numel() for p in model.parameters())
    summary = {
        "dir": str(out),
        "architecture": architecture,
        "params": params,
        "vocab": vocab,
        "tokenizer_source": f"mistral_common/data/{source.name}",
        "files": sorted(os.listdir(out)),
    }
    (out / "SMOKE_MODEL.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--architecture", choices=sorted(CONFIGS), default="Glm4ForCausalLM")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(make(args.out, args.seed, args.architecture)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
