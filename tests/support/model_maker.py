"""Make a small but real GLM-4-style checkpoint: config, tokenizer, sharded safetensors + index.

The weights are random, the layout is the real one (``Glm4ForCausalLM`` tensor names, a
``model.safetensors.index.json`` naming the shard of every tensor), so transfers, manifests and
corruption in the tests act on real files of a realistic shape. The same arguments always make
the same bytes (seeded), so a test can build the hub copy and the control node's copy apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

HIDDEN = 1024
INTERMEDIATE = 4096
VOCAB = 16384
HEADS, KV_HEADS, HEAD_DIM = 16, 2, 64
BYTES_PER_PARAM = 2  # float16

TEXT = (
    "GLM models are served by vLLM on a fleet of GPU hosts. The weights are fetched once, "
    "verified with sha256 and copied from host to host. 你好，世界。"
)


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (q, HIDDEN),
        p + "self_attn.q_proj.bias": (q,),
        p + "self_attn.k_proj.weight": (kv, HIDDEN),
        p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.weight": (kv, HIDDEN),
        p + "self_attn.v_proj.bias": (kv,),
        p + "self_attn.o_proj.weight": (HIDDEN, q),
        p + "post_self_attn_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate_up_proj.weight": (2 * INTERMEDIATE, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        p + "post_mlp_layernorm.weight": (HIDDEN,),
    }


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update(layer_shapes(i))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def layers_for(size_bytes: int) -> int:
    fixed = 2 * VOCAB * HIDDEN * BYTES_PER_PARAM
    per_layer = sum(int(np.prod(s)) for s in layer_shapes(0).values()) * BYTES_PER_PARAM
    return max(1, round((size_bytes - fixed) / per_layer))


def config(layers: int) -> dict:
    return {
        "architectures": ["Glm4ForCausalLM"],
        "model_type": "glm4",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "pad_token_id": 0,
        "eos_token_id": [1],
    }


def write_tokenizer(out: Path) -> None:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<|endoftext|>", "<unk>"], show_progress=False
    )
    tokenizer.train_from_iterator([TEXT] * 8, trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 4096,
            },
            indent=2,
        )
    )


def make_checkpoint(out: Path, size_bytes: int = 300 * 2**20, shard_bytes: int = 80 * 2**20, seed: int = 0) -> Path:
    """Write the checkpoint into ``out`` (created); about ``size_bytes`` of weights in shards of
    at most about ``shard_bytes``. Returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    layers = layers_for(size_bytes)
    rng = np.random.default_rng(seed)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    shard_size = 0
    for name, shape in tensor_shapes(layers).items():
        size = int(np.prod(shape)) * BYTES_PER_PARAM
        if shards[-1] and shard_size + size > shard_bytes:
            shards.append({})
            shard_size = 0
        shards[-1][name] = shape
        shard_size += size

    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: rng.standard_normal(shape, dtype=np.float32).astype(np.float16) for name, shape in shard.items()
        }
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: filename for name in shard})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(config(layers), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}, indent=2))
    write_tokenizer(out)
    (out / "README.md").write_text(
        "---\nlicense: mit\n---\nA random GLM-4-shaped checkpoint made by glmfleet's tests.\n"
    )
    return out
