"""Tiny tokenizer, chat template and models: built offline, saved and reloaded unchanged."""
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessorPil

from gndpo.data.records import PromptRecord
from gndpo.data.templates import PAPER_SUFFIX, build_messages
from gndpo.lab import task, tiny


def _record(i=5000):
    item = task.all_items()[i]
    return PromptRecord(id=f"r{i}", prompt=item.problem(), answer=str(item.answer()), images=(task.draw_image(item),))


def test_tokenizer_round_trip_and_special_ids():
    tok = tiny.build_tokenizer()
    assert (tok.pad_token_id, tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<image>") == 3 and tok.image_token == "<image>"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"
    assert len(tok) == 103
    text = "Tab\tis dropped, but all of ASCII ~!{}[]\\ and\nnewlines survive: " + PAPER_SUFFIX
    assert tok.decode(tok(text)["input_ids"]) == text.replace("\t", "")
    response = "<think>9+9=18,18*9=162</think> \\boxed{162}<|im_end|>"
    ids = tok(response, add_special_tokens=False)["input_ids"]
    assert len(ids) == 24 and ids[0] == 100 and ids[-1] == tok.eos_token_id  # format markers are single tokens
    assert tok.decode(ids) == response
    assert tok.decode(ids, skip_special_tokens=True) == response.removesuffix("<|im_end|>")
    assert tok("<|im_start|>user\n<image>")["input_ids"] == [1] + tok("user\n")["input_ids"] + [3]


def test_chat_template_renders_images_text_and_generation_prompt():
    processor = tiny.build_processor()
    record = _record()
    text = processor.apply_chat_template(build_messages(record, suffix=task.LAB_SUFFIX), add_generation_prompt=True,
                                         tokenize=False)
    assert text == f"<|im_start|>user\n<image>{record.prompt}<|im_end|>\n<|im_start|>assistant\n"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": [{"type": "text", "text": "2"}]}]
    assert processor.tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n")
    inputs = processor(text=[text], images=list(record.images), return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 16
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)


def test_text_only_causal_lm_generates_from_a_chat_prompt():
    model, tok = tiny.build_tiny_causal_lm(seed=0)
    record = PromptRecord(id="t", prompt="What is 2+3?", answer="5")
    prompt = tok.apply_chat_template(build_messages(record), add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>user\nWhat is 2+3? You FIRST") and prompt.endswith("assistant\n")
    inputs = tok([prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_teacher_and_student_share_the_tokenizer_and_student_is_smaller():
    teacher, tp = tiny.build_tiny_vlm("teacher", seed=0)
    student, sp = tiny.build_tiny_vlm("student", seed=0)
    assert tp.tokenizer.get_vocab() == sp.tokenizer.get_vocab() and tp.chat_template == sp.chat_template
    assert teacher.config.text_config.vocab_size == student.config.text_config.vocab_size == len(tp.tokenizer)
    assert 5 * tiny.num_parameters(student) < tiny.num_parameters(teacher) < 2_000_000
    assert teacher.generation_config.eos_token_id == tp.tokenizer.eos_token_id


def test_vlm_save_and_reload_give_identical_pixels_and_outputs(tmp_path):
    torch.manual_seed(0)
    model, processor = tiny.build_tiny_vlm("student", seed=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(model2) is type(model) and type(processor2) is type(processor)
    assert type(processor2.image_processor) is type(processor.image_processor)
    assert processor2.tokenizer.padding_side == "left" and processor2.chat_template == processor.chat_template
    assert model2.generation_config.eos_token_id == 2 and model2.generation_config.pad_token_id == 0

    records = [_record(i) for i in (0, 4321)]
    texts = [processor.apply_chat_template(build_messages(r, suffix=""), add_generation_prompt=True, tokenize=False)
             for r in records]
    images = [r.images[0] for r in records]
    a = processor(text=texts, images=images, padding=True, return_tensors="pt")
    b = processor2(text=texts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    # the PIL backend of the image processor yields the same pixels, so either reload is safe
    pil = CLIPImageProcessorPil(**processor.image_processor.to_dict())
    assert torch.allclose(pil(images, return_tensors="pt")["pixel_values"], a["pixel_values"], atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(**a).logits, model2(**b).logits)
