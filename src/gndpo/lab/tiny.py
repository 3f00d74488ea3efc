"""Tiny models built offline from configs: a char-level ChatML tokenizer, LLaVA teacher/student, a Qwen2 LM.

Everything here is deterministic given ``seed`` and needs no network. Tests reuse these builders as fixtures.
Teacher and student share one tokenizer (identical vocabulary and chat template), which the trainer checks.
"""
from __future__ import annotations


import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN, IMAGE_TOKEN)  # ids 0, 1, 2, 3
# Every printable ASCII character plus newline: any English prompt (the paper's suffix included) encodes
# without unknowns, and the vocabulary does not depend on a training corpus. Other characters are dropped.
CHARSET = "\n" + "".join(chr(c) for c in range(32, 127))
# The paper's format markers as single (non-special) tokens, as in Qwen3's vocabulary: responses get ~40 %
# shorter, which is most of the lab's compute. Decoding them gives back the same text.
FORMAT_TOKENS = ("<think>", "</think>", "\\boxed{")  # ids 100, 101, 102

# ChatML in the style of Qwen, without Qwen's default system prompt (prompt length matters at this size).
# Content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} items.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

IMAGE_SIZE = 32
PATCH_SIZE = 8  # (32 / 8)^2 = 16 image tokens per image once the CLS feature is dropped

# Vision tower width/depth, Qwen2 text width/depth/MLP width, attention heads (both towers), KV heads (text).
SIZES = {
    "teacher": dict(v_hidden=64, v_layers=2, hidden=128, layers=4, mlp=384, heads=4, kv_heads=2),
    "student": dict(v_hidden=32, v_layers=1, hidden=64, layers=2, mlp=256, heads=2, kv_heads=1),
}
# The two specialist teachers of the two-teacher lab run (one per half of the task): 0.39 M parameters each, so
# the shipped pair adds 3 MB, not the 7 MB of two full-size teachers.
SIZES["teacher_sum"] = SIZES["teacher_prod"] = dict(v_hidden=48, v_layers=1, hidden=96, layers=3, mlp=288, heads=4,
                                                    kv_heads=2)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Char-level tokenizer with ChatML special tokens, left padding and the lab chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARSET:
        vocab[ch] = len(vocab)
    # A BPE model without merges is a char-level tokenizer that keeps spaces and newlines as tokens.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor() -> CLIPImageProcessor:
    # Images are drawn at the model's size: resizing is the identity and nothing is cropped, so the PIL and
    # torchvision backends produce the same pixel values.
    return CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    processor = LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS feature, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    return processor


def _generation_config(tokenizer) -> GenerationConfig:
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )


def build_tiny_vlm(kind: str = "teacher", *, seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised LLaVA (CLIP vision tower + Qwen2 text model) and its processor."""
    if kind not in SIZES:
        raise ValueError(f"unknown tiny VLM kind {kind!r}; valid: {sorted(SIZES)}")
    s = SIZES[kind]
    processor = build_processor()
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"], num_hidden_layers=s["v_layers"],
        num_attention_heads=s["heads"], image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
        projection_dim=s["v_hidden"],
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=16,
        projector_hidden_act="gelu", tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = _generation_config(tokenizer)
    model.eval()
    return model, processor


def build_tiny_causal_lm(
    *, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, hidden: int = 32, layers: int = 2
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised Qwen2 causal LM over the lab tokenizer (or ``tokenizer``), for text-only tests."""
    tokenizer = tokenizer or build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = _generation_config(tokenizer)
    model.eval()
    return model, tokenizer


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
