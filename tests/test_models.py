"""Model loading and the student/teacher compatibility check."""
import pytest

from gndpo.errors import ModelError
from gndpo.models import check_compatible, load_model, special_placeholder_ids


def test_loads_text_and_vlm_with_left_padding(tiny_dir):
    text = load_model(str(tiny_dir / "text_student"))
    vlm = load_model(str(tiny_dir / "vlm_student"))
    assert not text.is_vlm and vlm.is_vlm
    assert text.tokenizer.padding_side == "left" and vlm.tokenizer.padding_side == "left"
    # The sampler must never emit the image placeholder or padding.
    ids = special_placeholder_ids(vlm.processor)
    assert vlm.processor.image_token_id in ids and vlm.tokenizer.pad_token_id in ids


def test_identical_tokenizers_pass(tiny_dir):
    a, b = load_model(str(tiny_dir / "text_student")), load_model(str(tiny_dir / "text_teacher"))
    check_compatible(a.processor, b.processor)


def test_chat_template_difference_is_named(tiny_dir):
    a, b = load_model(str(tiny_dir / "text_student")), load_model(str(tiny_dir / "text_teacher"))
    b.tokenizer.chat_template = b.tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(ModelError, match="chat templates render a probe prompt differently"):
        check_compatible(a.processor, b.processor)


def test_eos_difference_is_named(tiny_dir):
    a, b = load_model(str(tiny_dir / "text_student")), load_model(str(tiny_dir / "text_teacher"))
    b.tokenizer.eos_token = "<|endoftext|>"
    with pytest.raises(ModelError, match="EOS tokens differ"):
        check_compatible(a.processor, b.processor)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(tmp_path))
