"""The paper's models as config-only directories: InternVL3.5 1B/2B/4B students and the 8B teacher, written from
their published model cards, for the resource plan (``gndpo train --dry-run``) and the real-shape benchmarks,
with no hub access. No weights: a directory holds ``config.json`` (and, for the benchmarks, whatever they add)."""
from __future__ import annotations

import json
from pathlib import Path

TILE = 448  # InternViT's tile: 32 x 32 patches of 14 px, pixel-shuffled to 256 tokens


def internvl3_5_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    """config.json of an InternVL3.5 ``-HF`` checkpoint (transformers' InternVLForConditionalGeneration).

    Language model: Qwen3, from its model cards and config.json files (huggingface.co/Qwen/Qwen3-0.6B,
    -1.7B, -4B, -8B): head_dim 128, vocab_size 151936, max_position_embeddings 40960, rms_norm_eps 1e-6,
    rope_theta 1e6; per size hidden_size / intermediate_size / layers / query heads / KV heads
    0.6B 1024/3072/28/16/8, 1.7B 2048/6144/28/16/8, 4B 2560/9728/36/32/8, 8B 4096/12288/36/32/8.
    Embeddings are untied in InternVL3.5 at every size (the Qwen3 bases up to 4B tie them): the model card's
    "#Language Param" (0.8B on Qwen3-0.6B, 2.0B on 1.7B, 4.4B on 4B) counts a separate LM head, and the
    InternVL3_5-1B-HF model.safetensors holds 2.12 GB in bfloat16, i.e. 1.06B parameters.
    Vision: InternViT-300M-448px-V2_5 (InternVL3.5 model card, "Model Architecture"): width 1024, 24 layers,
    16 heads, MLP 4096, 448 px images in 14 px patches, qkv bias, LayerNorm, no q/k norm; pixel shuffle with
    downsample_ratio 0.5 -> (448 / 14)^2 * 0.5^2 = 256 tokens per tile. image_token_id 151671 (<IMG_CONTEXT>
    in InternVL3.5's tokenizer; MindSpeed-MM's internvl3.5 model.json, img_context_token_id).
    """
    text = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False}
    vision = {"model_type": "internvl_vision", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096, "image_size": [448, 448], "patch_size": [14, 14], "attention_bias": True,
              "use_qk_norm": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
    return {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl", "text_config": text,
            "vision_config": vision, "downsample_ratio": 0.5, "image_token_id": 151671, "image_seq_length": 256,
            "projector_hidden_act": "gelu", "vision_feature_layer": -1, "tie_word_embeddings": False}


SIZES = {"1b": (1024, 3072, 28, 16, 8), "2b": (2048, 6144, 28, 16, 8), "4b": (2560, 9728, 36, 32, 8),
         "8b": (4096, 12288, 36, 32, 8)}

def write_config_dirs(root: str | Path, sizes=("1b", "2b", "4b", "8b")) -> dict[str, Path]:
    """``root/InternVL3_5-{SIZE}-HF/config.json`` for each size; returns size -> directory."""
    dirs = {}
    for size in sizes:
        d = Path(root) / f"InternVL3_5-{size.upper()}-HF"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(internvl3_5_config(*SIZES[size]), indent=1))
        dirs[size] = d
    return dirs


def save_random_model(out: str | Path, size: str = "1b", *, seed: int = 0, layers: int | None = None,
                      device: str = "cpu") -> Path:
    """An InternVL3.5-``size``-shaped model with random weights, saved in bfloat16 (as released) with a processor
    that cuts images into real 448 px tiles (256 tokens each) and the lab family's small tokenizer (prompts use
    few ids; the model's vocabulary is the real 151,936). ``layers``: keep that many text and vision layers (same
    per-layer shapes) on a machine too small for all of them."""
    import torch
    from transformers import AutoConfig, GotOcr2ImageProcessor, InternVLForConditionalGeneration

    from gndpo.lab.families import build_processor

    out = Path(out)
    config = internvl3_5_config(*SIZES[size])
    if layers is not None:
        config["text_config"]["num_hidden_layers"] = layers
        config["vision_config"]["num_hidden_layers"] = layers
    processor = build_processor("internvl")
    tok = processor.tokenizer
    config["image_token_id"] = tok.convert_tokens_to_ids(processor.image_token)
    config["text_config"].update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    processor.image_processor = GotOcr2ImageProcessor(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                                      min_patches=1, max_patches=12)
    processor.image_seq_length = 256
    processor.video_processor.size = {"height": TILE, "width": TILE}
    torch.manual_seed(seed)
    with torch.device(device):
        model = InternVLForConditionalGeneration(AutoConfig.for_model(**config)).to(torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
