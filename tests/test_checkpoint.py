"""Checkpoints: exact round trip, HF loadability, atomicity, pruning, run-directory resume rules."""
import copy
import os
import random

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import gndpo.checkpoint as ckpt_mod
from gndpo.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, prepare_run_dir, run_started,
                              save_checkpoint)
from gndpo.errors import GndpoError

CONFIG = {
    "model": {"path": "tiny"},
    "optim": {"lr": 1e-3, "betas": (0.9, 0.999)},
    "trainer": {"total_steps": 4, "resume": False, "output_dir": "runs/x"},
    "logging": {"wandb": False},
    "checkpoint": {"every": 1, "keep_last": 2},
}


def _model(layers=2, seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return Qwen2ForCausalLM(config)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>")


def _train_step(model, opt, sched):
    ids = torch.randint(0, 64, (2, 6))  # drawn from the global RNG, so RNG restore matters
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


@pytest.fixture
def trained():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(2):
        _train_step(model, opt, sched)
    return model, opt, sched


def _save(run_dir, step, model, opt, sched=None, **kw):
    kw.setdefault("state", {"step": step})
    kw.setdefault("config", CONFIG)
    return save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched, **kw)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_restores_weights_optimizer_rng_and_state(tmp_path, trained):
    model, opt, sched = trained
    random.seed(3), np.random.seed(3)
    state = {"step": 2, "data": {"epoch": 0, "position": 7, "sampler": [3, 1, 2]}}
    path = _save(tmp_path, 2, model, opt, sched, processor=_tokenizer(), state=state)
    assert path == tmp_path / "checkpoints" / "step-000002"
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "trainer_state.pt", "config.yaml", "COMPLETE", "tokenizer.json"} <= files
    assert yaml.safe_load((path / "config.yaml").read_text())["optim"]["betas"] == [0.9, 0.999]

    saved_params, saved_opt = _params(model), copy.deepcopy(opt.state_dict())
    _train_step(model, opt, sched)  # the step a resumed run must reproduce exactly
    after_one_more = _params(model)
    draws = (random.random(), np.random.rand(), torch.rand(3))

    with torch.no_grad():  # perturb everything the checkpoint should restore
        for p in model.parameters():
            p.add_(1.0)
    _train_step(model, opt, sched)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)

    assert load_checkpoint(path, model=model, optimizer=opt, scheduler=sched) == state
    _assert_same(_params(model), saved_params)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    loaded_opt = opt.state_dict()
    assert loaded_opt["param_groups"] == saved_opt["param_groups"] and sched.last_epoch == 2
    for i, s in saved_opt["state"].items():
        for k in s:
            assert torch.equal(loaded_opt["state"][i][k], s[k])

    # Same RNG + weights + optimizer state: the next step is bit-identical to the uninterrupted run.
    _train_step(model, opt, sched)
    _assert_same(_params(model), after_one_more)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == draws[:2] and torch.equal(again[2], draws[2])


def test_checkpoint_is_a_hugging_face_model_directory(tmp_path, trained):
    model, opt, sched = trained
    path = _save(tmp_path, 2, model, opt, sched, processor=_tokenizer())
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    _assert_same(_params(reloaded), _params(model))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    # (AutoTokenizer would pick Qwen2Tokenizer from config.json's model_type and ignore this toy WordLevel
    # tokenizer; a real Qwen checkpoint ships a Qwen2 tokenizer, so name the class here.)
    assert PreTrainedTokenizerFast.from_pretrained(path)("w1 w5")["input_ids"] == [5, 9]


def test_failed_save_leaves_nothing_visible(tmp_path, trained, monkeypatch):
    model, opt, sched = trained
    first = _save(tmp_path, 1, model, opt, sched)
    first_bytes = (first / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)  # fails after the weights were written
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    for step in (2, 1):  # a new step, and replacing the existing one
        with pytest.raises(RuntimeError, match="disk full"):
            _save(tmp_path, step, model, opt, sched)
        assert latest_checkpoint(tmp_path) == first and list_checkpoints(tmp_path) == [first]
        assert (first / "model.safetensors").read_bytes() == first_bytes
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]


def test_crash_leftovers_are_ignored_then_cleaned(tmp_path, trained):
    model, opt, sched = trained
    first = _save(tmp_path, 1, model, opt, sched)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000002-12345").mkdir()  # a save killed before its rename
    (root / "step-000003").mkdir()  # no COMPLETE marker: never a checkpoint
    (root / "step-000003" / "model.safetensors").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(GndpoError, match="incomplete"):
        load_checkpoint(root / "step-000003", model=model)

    # A replacement killed between its two renames: the old copy is put back on resume.
    os.rename(first, root / ".old-step-000001-12345")
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump(ckpt_mod._plain(CONFIG)))
    assert prepare_run_dir(tmp_path, config=CONFIG, resume=True) == first

    _save(tmp_path, 2, model, opt, sched)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002", "step-000003"]


def test_resave_same_step_replaces_it(tmp_path, trained):
    model, opt, sched = trained
    _save(tmp_path, 2, model, opt, sched, state={"v": 1})
    with torch.no_grad():
        model.model.norm.weight.fill_(0.5)
    path = _save(tmp_path, 2, model, opt, sched, state={"v": 2})
    fresh = _model(seed=1)
    assert load_checkpoint(path, model=fresh, restore_rng=False) == {"v": 2}
    assert torch.all(fresh.model.norm.weight == 0.5)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]


def test_keep_last_prunes_older_checkpoints(tmp_path, trained):
    model, opt, _ = trained
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep_last=2, config=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    assert not (latest_checkpoint(tmp_path) / "config.yaml").exists()
    with pytest.raises(GndpoError, match="keep_last must be >= 1"):
        _save(tmp_path, 5, model, opt, keep_last=0)


def test_load_into_a_different_architecture_is_an_error(tmp_path, trained):
    model, opt, sched = trained
    path = _save(tmp_path, 2, model, opt, sched)
    with pytest.raises(GndpoError, match=r"lacks weight model\.layers\.2\..* not tied"):
        load_checkpoint(path, model=_model(layers=3))
    with pytest.raises(GndpoError, match=r"unexpected weights such as model\.layers\.1\."):
        load_checkpoint(path, model=_model(layers=1))
    wider = _model()
    wider.resize_token_embeddings(72)
    with pytest.raises(GndpoError, match=r"model\.embed_tokens\.weight has shape \(64, 16\), the model \(72, 16\)"):
        load_checkpoint(path, model=wider)
    with pytest.raises(GndpoError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoints" / "step-000009", model=model)


def test_vlm_with_renamed_checkpoint_keys_round_trips(tmp_path):
    # save_pretrained writes Qwen2-VL under its original key names (model.layers.* rather than
    # model.language_model.layers.*); loading must map them back.
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=64, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    vision = dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=None, state={"step": 1}, config=None)
    torch.manual_seed(1)
    other = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))
    assert load_checkpoint(path, model=other) == {"step": 1}
    _assert_same(_params(other), _params(model))


def test_prepare_run_dir_fresh_refuse_and_resume(tmp_path, trained):
    run = tmp_path / "runs" / "x"
    assert prepare_run_dir(run, config=CONFIG, resume=False) is None
    assert yaml.safe_load((run / "run_config.yaml").read_text())["optim"]["lr"] == 1e-3

    # A run that stopped before its first step ended (a wrong path, a missing field, an engine that did not start)
    # left only its setup files: the corrected command reuses the directory, with or without resume, any config.
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".tmp-step-000001-99").mkdir()  # its first save, cut off
    fixed = {**CONFIG, "optim": {"lr": 5e-4, "betas": (0.9, 0.999)}}
    assert not run_started(run)
    assert prepare_run_dir(run, config=fixed, resume=False) is None
    assert yaml.safe_load((run / "run_config.yaml").read_text())["optim"]["lr"] == 5e-4
    assert prepare_run_dir(run, config=CONFIG, resume=True) is None
    assert yaml.safe_load((run / "run_config.yaml").read_text())["optim"]["lr"] == 1e-3

    # One logged step makes it a run: protected without resume, resumable (from scratch: no checkpoint yet) with it.
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    assert run_started(run)
    with pytest.raises(GndpoError) as info:
        prepare_run_dir(run, config=CONFIG, resume=False)
    assert str(info.value) == (
        f"output directory {run} already holds a run; continue it with gndpo train --resume {run} "
        "(or trainer.resume=true), or choose another trainer.output_dir"
    )
    assert prepare_run_dir(run, config=CONFIG, resume=True) is None
    with pytest.raises(GndpoError, match=r"optim\.lr changed from 0\.001 to 0\.0005"):
        prepare_run_dir(run, config=fixed, resume=True)

    model, opt, sched = trained
    _save(run, 1, model, opt, sched)
    latest = _save(run, 2, model, opt, sched)
    allowed = {**CONFIG, "trainer": {**CONFIG["trainer"], "total_steps": 10, "resume": True},
               "logging": {"wandb": True, "extra": 1}, "checkpoint": {"every": 5}}
    assert prepare_run_dir(run, config=allowed, resume=True) == latest
    assert yaml.safe_load((run / "run_config.yaml").read_text())["trainer"]["total_steps"] == 10

    changed = {**allowed, "optim": {"lr": 2e-3, "betas": (0.9, 0.999)}}
    with pytest.raises(GndpoError) as info:
        prepare_run_dir(run, config=changed, resume=True)
    assert str(info.value).startswith(
        f"cannot resume {run}: optim.lr changed from 0.001 to 0.002, and a resumed run stays exact only with the "
        "settings it trained with; set it back to 0.001, or start a new run in another trainer.output_dir "
        "(changeable on resume: trainer.total_steps, ")
    added = {**allowed, "algorithm": {"method": "opd"}}
    with pytest.raises(GndpoError, match=r"algorithm\.method changed from '<absent>' to 'opd'"):
        prepare_run_dir(run, config=added, resume=True)
    with pytest.raises(GndpoError, match="already holds a run"):
        prepare_run_dir(run, config=allowed, resume=False)


def test_a_checkpoint_alone_makes_a_run(tmp_path, trained):
    # A run killed between its first checkpoint and its first metrics line is a run: the checkpoint is worth keeping.
    model, opt, sched = trained
    _save(tmp_path, 1, model, opt, sched)
    assert run_started(tmp_path)
    with pytest.raises(GndpoError, match="already holds a run"):
        prepare_run_dir(tmp_path, config=CONFIG, resume=False)
    # so is one whose only checkpoint was set aside as damaged
    other = tmp_path / "other"
    (other / "checkpoints" / ".broken-step-000001-5").mkdir(parents=True)
    assert run_started(other) and not run_started(tmp_path / "nowhere")
