#!/usr/bin/env python3
"""Make a tiny GLM-4 checkpoint (``Glm4ForCausalLM``, random bf16 weights) for the GPU smoke test.

The GPU machine has no network, so nothing is downloaded: the architecture comes from
transformers' own ``Glm4Config``, and the tokenizer is a real one that a package on the
machine ships: Mistral's Tekken BPE (``tekken_240911.json``, 131072 tokens) from the
``mistral_common`` wheel, which vLLM itself needs at import, converted to the Hugging Face
``tokenizer.json`` format by transformers' own converter. Only Hugging Face files are written
(no ``tekken.json``), so vLLM reads it as an ordinary HF tokenizer, as it would GLM's.

The dims keep GLM-4's shape (grouped KV heads, partial rotary 0.5, attention bias, separate
lm_head) at a size that loads in seconds: hidden 256, 2 layers, 4 heads, 2 KV heads of 64.

Usage: make_tiny_glm4.py OUT_DIR [--seed N]
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


def make(out: Path, seed: int) -> dict:
    import torch
    from transformers import GenerationConfig, Glm4Config, Glm4ForCausalLM
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    source = tekken_file()
    tokenizer = convert_tekken_tokenizer(str(source), chat_template=CHAT_TEMPLATE)
    vocab = len(tokenizer)

    config = Glm4Config(
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
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        architectures=["Glm4ForCausalLM"],
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Glm4ForCausalLM(config).to(torch.bfloat16)
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
        "architecture": "Glm4ForCausalLM",
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(make(args.out, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
