"""Shared test setup: one torch thread per process (2 shared cores), offline hubs, tiny models built once."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TEXT_CORPUS = [
    "What is {a} plus {b}? Think, then answer in \\boxed{{}}. <think>{a}+{b}={c}</think> \\boxed{{{c}}}".format(
        a=a, b=b, c=a + b) for a in range(12) for b in range(12)
]


def build_bpe_tokenizer(vocab_size: int = 300, corpus=TEXT_CORPUS):
    """A small byte-level BPE tokenizer with ChatML special tokens, trained offline on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


def build_qwen2(tokenizer, *, hidden: int, layers: int, seed: int):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny models and datasets saved once per session:

    text_student / text_teacher: Qwen2 causal LMs over a small BPE tokenizer;
    text_other_tok: a Qwen2 over a different BPE tokenizer (for the compatibility check);
    vlm_student / vlm_teacher: LLaVA (CLIP + Qwen2) from the lab builders;
    text.jsonl: arithmetic prompts; vlm/: the lab task (jsonl + PNG images).
    """
    from gndpo.lab.task import write_task
    from gndpo.lab.tiny import build_tiny_vlm

    root = tmp_path_factory.mktemp("tiny")
    tok = build_bpe_tokenizer()
    for name, hidden, layers, seed in (("text_student", 16, 1, 0), ("text_teacher", 32, 2, 1)):
        build_qwen2(tok, hidden=hidden, layers=layers, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    other = build_bpe_tokenizer(vocab_size=320, corpus=[c.upper() for c in TEXT_CORPUS])
    build_qwen2(other, hidden=16, layers=1, seed=2).save_pretrained(root / "text_other_tok")
    other.save_pretrained(root / "text_other_tok")
    for kind in ("student", "teacher"):
        model, processor = build_tiny_vlm(kind, seed=3)
        model.save_pretrained(root / f"vlm_{kind}")
        processor.save_pretrained(root / f"vlm_{kind}")
    with open(root / "text.jsonl", "w") as f:
        for i in range(24):
            a, b = i % 7, (3 * i) % 5
            f.write(json.dumps({"id": f"t{i}", "problem": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n")
    write_task(root / "vlm", seed=0, n_train=24, n_test=8)
    return root


def write_mixed_images(root, n: int = 8) -> None:
    """``root/train.jsonl``: arithmetic prompts with 1, 0, 2, 1, 0, ... images of different sizes and aspect
    ratios (InternVL tiles them differently, Qwen-VL gives them different grids), images as PNG files."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    sizes = [(32, 32), (64, 32), (40, 72), (48, 48), (96, 40)]
    with open(root / "train.jsonl", "w") as f:
        for i in range(n):
            count = (1, 0, 2)[i % 3]
            names = []
            for j in range(count):
                w, h = sizes[(i + j) % len(sizes)]
                name = f"img{i}_{j}.png"
                Image.new("RGB", (w, h), ((37 * i) % 256, (91 * j + 40) % 256, 200)).save(root / name)
                names.append(name)
            a, b = i % 7, (3 * i) % 5
            f.write(json.dumps({"id": f"m{i}", "problem": f"What is {a} plus {b}?", "answer": str(a + b),
                                "images": names}) + "\n")


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """Tiny student/teacher pairs of every family in gndpo.lab.families (``{family}_student``,
    ``{family}_teacher``), ``mixed/train.jsonl`` (0-2 images of varied sizes per prompt) and ``text.jsonl``."""
    from gndpo.lab.families import FAMILIES, save_pair

    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        save_pair(family, root)
    write_mixed_images(root / "mixed")
    with open(root / "text.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"id": f"t{i}", "problem": f"What is {i % 7} plus {i % 5}?",
                                "answer": str(i % 7 + i % 5)}) + "\n")
    return root


# text / vlm: the original Qwen2 + BPE and lab LLaVA students; the rest: the families users bring, VLMs with
# prompts holding 0, 1 or 2 images of different sizes in one batch.
STUDENT_KINDS = ["text", "vlm", "qwen3", "internvl", "qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="module", params=STUDENT_KINDS)
def student_and_records(request, tiny_dir):
    """(LoadedModel, 5 prompt records) for each kind of student in STUDENT_KINDS."""
    from gndpo.data.loaders import load_records
    from gndpo.lab.families import VISION_FAMILIES
    from gndpo.models import load_model

    kind = request.param
    if kind in ("text", "vlm"):
        loaded = load_model(str(tiny_dir / f"{kind}_student"))
        data = tiny_dir / "text.jsonl" if kind == "text" else tiny_dir / "vlm" / "train.jsonl"
    else:
        root = request.getfixturevalue("family_dir")
        loaded = load_model(str(root / f"{kind}_student"))
        data = root / "mixed" / "train.jsonl" if kind in VISION_FAMILIES else root / "text.jsonl"
    records = load_records(str(data), image_key="images" if loaded.is_vlm else None)[:5]
    return loaded, records
