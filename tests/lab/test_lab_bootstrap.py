"""SFT bootstrap pieces: response-only labels, slow vision learning rate, early stop."""
import torch

from gndpo.data.loaders import load_records
from gndpo.lab import bootstrap, task, tiny


def _data(tmp_path, n=8):
    task.write_task(tmp_path, seed=0, n_train=n, n_test=4)
    records = load_records(tmp_path, split="train", id_key="id")
    solutions = task.read_solutions(tmp_path / "train.jsonl")
    _, processor = tiny.build_tiny_vlm("student", seed=0)
    return records, solutions, processor, bootstrap.encode_sft(processor, records, solutions, suffix=task.LAB_SUFFIX)


def test_sft_examples_are_prompt_then_solution_and_only_the_response_is_labelled(tmp_path):
    records, solutions, processor, data = _data(tmp_path)
    tok = processor.tokenizer
    for i, record in enumerate(records):
        ids, p = data.input_ids[i], data.prompt_lengths[i]
        assert tok.decode(ids[p:]) == solutions[record.id] + "<|im_end|>"
        assert tok.decode(ids[:p]).endswith("<|im_start|>assistant\n") and ids[:p].count(3) == 16
    batch = bootstrap.collate(data, [0, 3], pad_id=tok.pad_token_id)
    for row, i in enumerate([0, 3]):
        ids, p = data.input_ids[i], data.prompt_lengths[i]
        labels = batch["labels"][row]
        assert (labels[:p] == -100).all() and labels[p:len(ids)].tolist() == ids[p:] and (labels[len(ids):] == -100).all()
        assert batch["attention_mask"][row].sum() == len(ids)
    assert torch.equal(batch["pixel_values"], data.pixel_values[[0, 3]])


def test_sft_is_deterministic_and_stops_when_asked(tmp_path):
    *_, data = _data(tmp_path)
    recipe = bootstrap.SFTRecipe(steps=6, batch_size=4, warmup=2, check_every=2)
    runs = []
    for _ in range(2):
        model, _ = tiny.build_tiny_vlm("student", seed=0)
        runs.append(bootstrap.sft(model, data, recipe, seed=0, pad_id=0, desc="t"))
    assert runs[0] == runs[1] and len(runs[0]) == 6 and runs[0][-1] < runs[0][0]
    calls = []
    model, _ = tiny.build_tiny_vlm("student", seed=0)
    losses = bootstrap.sft(model, data, recipe, seed=0, pad_id=0, desc="t", stop=lambda: calls.append(1) or len(calls) == 2)
    assert len(losses) == 4 and losses == runs[0][:4] and not model.training


def test_vision_tower_and_projector_learn_ten_times_slower(tmp_path, monkeypatch):
    *_, data = _data(tmp_path, n=4)
    seen = {}

    class Spy(torch.optim.AdamW):
        def __init__(self, groups, **kwargs):
            super().__init__(groups, **kwargs)
            seen["groups"] = groups

    monkeypatch.setattr(bootstrap.torch.optim, "AdamW", Spy)
    model, _ = tiny.build_tiny_vlm("student", seed=0)
    bootstrap.sft(model, data, bootstrap.SFTRecipe(steps=1, batch_size=2, lr=1e-3), seed=0, pad_id=0)
    fast, slow = seen["groups"]
    slow_names = {n for n, p in model.named_parameters() if any(p is q for q in slow["params"])}
    assert slow["lr"] == fast["lr"] / 10
    assert slow_names and all(n.startswith(("model.vision_tower", "model.multi_modal_projector")) for n in slow_names)
    assert len(fast["params"]) + len(slow["params"]) == len(list(model.parameters()))
