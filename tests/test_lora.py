"""LoRA through PEFT: where adapters go, what trains, every forward path, resume, gradient checkpointing, export."""
import copy
import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from gndpo.checkpoint import export_checkpoint
from gndpo.cli import main
from gndpo.config import LORA_DEFAULT_TARGETS, LoraConfig, load_config
from gndpo.errors import ConfigError, GndpoError, ModelError
from gndpo.lab.families import build_model, save_pair
from gndpo.lora import apply_lora, language_model_prefix
from gndpo.train import train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                 reason="needs peft (pip install -e '.[lora]')")]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def adapter_weights(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors"))


def adapted_layers(model):
    from peft.tuners.lora import LoraLayer

    return sorted(name for name, m in model.named_modules() if isinstance(m, LoraLayer))


def trainable(model):
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def base_state(model):
    """The model's own weights under their original names (PEFT moves a wrapped layer's to ``.base_layer``)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from gndpo.lab.task import write_task

    root = tmp_path_factory.mktemp("lora")
    for family in ("qwen3", "internvl", "qwen2_5_vl"):
        save_pair(family, root)
    with open(root / "text.jsonl", "w") as f:
        for i in range(16):
            a, b = i % 7, (3 * i) % 5
            f.write(json.dumps({"id": f"t{i}", "problem": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n")
    write_task(root / "vlm", seed=0, n_train=8, n_test=2)
    return root


def make_cfg(root, out, *, family="qwen3", steps=2, extra=()):
    data = root / "text.jsonl" if family == "qwen3" else root / "vlm" / "train.jsonl"
    overrides = [
        f"model.path={root / f'{family}_student'}", f"teacher.path={root / f'{family}_teacher'}", f"data.train={data}",
        "data.prompt_suffix=Answer in \\boxed{}.", "rollout.n=4", "rollout.max_new_tokens=8",
        "rollout.micro_batch_size=16", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
        f"trainer.total_steps={steps}", "trainer.device=cpu", f"trainer.output_dir={out}", "optim.lr=1e-2",
        "logging.progress=false", "logging.tensorboard=false", "trainer.seed=7", "model.lora.rank=4",
        "model.lora.alpha=8", *extra,
    ]
    if family == "qwen3":
        overrides.append("data.image_key=null")
    return load_config(None, overrides)


def spied_train(cfg, monkeypatch):
    """Train; return the student's PEFT wrapper and the teacher model the loop used."""
    import gndpo.teacher.hf
    import gndpo.train

    seen = {}
    real_apply, real_init = gndpo.train.apply_lora, gndpo.teacher.hf.HFTeacher.__init__

    def spy_apply(model, lora):
        seen["student"] = real_apply(model, lora)
        return seen["student"]

    def spy_init(self, model, *args, **kw):
        seen["teacher"] = model
        real_init(self, model, *args, **kw)

    monkeypatch.setattr(gndpo.train, "apply_lora", spy_apply)
    monkeypatch.setattr(gndpo.teacher.hf.HFTeacher, "__init__", spy_init)
    train(cfg)
    return seen["student"], seen.get("teacher")


@pytest.fixture(scope="module")
def lora_run(root, tmp_path_factory):
    """A 4-step text run with checkpoints at steps 2 and 4: (run dir, student wrapper, teacher model)."""
    run = tmp_path_factory.mktemp("runs") / "full"
    with pytest.MonkeyPatch.context() as mp:
        cfg = make_cfg(root, run, steps=4, extra=["checkpoint.every=2", "checkpoint.keep_last=null"])
        student, teacher = spied_train(cfg, mp)
    return run, student, teacher


# ---------------------------------------------------------------- where adapters go


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl", "qwen3_vl", "llava", "qwen3"])
def test_default_targets_adapt_the_language_model_only(family):
    model, _ = build_model(family, "student")
    prefix = language_model_prefix(model)
    same_names_outside = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                          and n.rsplit(".", 1)[-1] in LORA_DEFAULT_TARGETS and not n.startswith(prefix + ".")]
    if family in ("internvl", "qwen2_5_vl", "llava"):  # the vision towers that reuse the projections' names
        assert same_names_outside, "the check would be vacuous"
    apply_lora(model, LoraConfig(rank=2))
    layers = adapted_layers(model)
    assert len(layers) == len(LORA_DEFAULT_TARGETS) * model.config.get_text_config().num_hidden_layers
    assert all(n.startswith(prefix + ".") for n in layers)
    assert not set(layers) & set(same_names_outside)
    assert all("lora_" in n and n.startswith(prefix + ".") for n in trainable(model))


def test_target_strings_follow_peft_and_mistakes_are_one_line():
    model, _ = build_model("internvl", "student")
    apply_lora(model, LoraConfig(rank=2, target_modules="all-linear"))
    layers = adapted_layers(model)
    assert any(".vision_tower." in n for n in layers) and any(".multi_modal_projector." in n for n in layers)
    assert "lm_head" not in layers

    model, _ = build_model("internvl", "student")
    apply_lora(model, LoraConfig(rank=2, target_modules=r".*\.vision_tower\..*\.fc1"))
    assert adapted_layers(model) == ["model.vision_tower.encoder.layer.0.mlp.fc1"]

    for bad, match in (({"target_modules": ["qproj"]}, r"matches no module of the language model .*q_proj"),
                       ({"target_modules": ["mlp"]}, r"matches model\.layers\.0\.mlp \(Qwen3MLP\), a block"),
                       ({"target_modules": "nothing.*"}, "matches no module of the model"),
                       ({"modules_to_save": ["lm_hed"]}, "modules_to_save entry 'lm_hed' matches no module")):
        model, _ = build_model("qwen3", "student")
        with pytest.raises(ModelError, match=match) as info:
            apply_lora(model, LoraConfig(rank=2, **bad))
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        load_config(None, ["model.path=m", "data.train=d", "teacher.path=t", "model.lora.rank=2",
                           "model.lora.target_modules=(unclosed"])


# ---------------------------------------------------------------- every option changes the result


def _randomize_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_each_option_changes_the_adapters_or_the_output():
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])

    def adapted(**kw):
        model, _ = build_model("qwen3", "student", seed=0)
        apply_lora(model, LoraConfig(**{"rank": 4, **kw}))
        _randomize_adapters(model)
        return model

    base = adapted()
    # rank: the adapters' shape
    assert base.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 4
    assert adapted(rank=2).model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 2
    # target_modules and modules_to_save: what trains
    only_q = trainable(adapted(target_modules=["q_proj"]))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in only_q} == {"q_proj"}
    saved = adapted(modules_to_save=["lm_head"])
    assert set(trainable(saved)) - set(trainable(base)) == {"model.embed_tokens.modules_to_save.default.weight"}
    # the model ties lm_head to the embeddings: both read the one trained copy
    assert saved.get_output_embeddings().modules_to_save["default"].weight is \
        saved.get_input_embeddings().modules_to_save["default"].weight
    # alpha: the adapter adds (alpha / rank) * B A x to the frozen layer's output
    for alpha in (8.0, 16.0):
        q = adapted(alpha=alpha).model.layers[0].self_attn.q_proj
        x = torch.randn(3, q.in_features)
        with torch.no_grad():
            delta = q(x) - q.base_layer(x)
            lora = x @ q.lora_A["default"].weight.T @ q.lora_B["default"].weight.T
        torch.testing.assert_close(delta, alpha / 4 * lora, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, adapted(alpha=64.0)(ids).logits, atol=1e-3)
    # dropout: on the adapters' input while training only
    drop = adapted(dropout=0.5)
    with torch.no_grad():
        torch.testing.assert_close(drop.eval()(ids).logits, base.eval()(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(drop.train()(ids).logits, base.train()(ids).logits, atol=1e-4)


def test_forward_paths_and_sampler_agree_with_adapters(root, monkeypatch):
    """The packed, KV-cache and per-sequence scoring paths and the decode loop all see the adapters, and
    agree with the merged model."""
    import gndpo.forward as fwd
    from gndpo.data.loaders import load_records
    from gndpo.models import load_model
    from gndpo.rollout.base import SamplingParams
    from gndpo.rollout.decode import supports_decode_loop
    from gndpo.rollout.hf import HFRollout

    loaded = load_model(str(root / "qwen3_student"))
    model, processor = loaded.model, loaded.processor
    wrapped = apply_lora(model, LoraConfig(rank=4))
    _randomize_adapters(model)
    model.eval()
    records = load_records(str(root / "text.jsonl"), image_key=None)[:3]
    rollouts = HFRollout(model, processor, suffix=None).generate(records, SamplingParams(n=3, max_new_tokens=6))
    assert fwd.shares_prefixes(model)
    assert supports_decode_loop(model, fwd.encode_prompts(processor, records[:1], suffix=None, system_prompt=None))

    def scores(m):
        with torch.no_grad():
            return fwd.rollout_logprobs(m, processor, rollouts, micro_batch_size=9, suffix=None, system_prompt=None)

    packed = scores(model)
    monkeypatch.setattr(fwd, "PACK_TOKENS", 0)
    kv_cache = scores(model)
    monkeypatch.setattr(fwd, "shares_prefixes", lambda m: False)
    separate = scores(model)
    merged = scores(copy.deepcopy(wrapped).merge_and_unload())
    for other in (kv_cache, separate):
        torch.testing.assert_close(packed, other, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed, rollouts.sampler_logprobs, rtol=0, atol=1e-4)  # decode loop: fp32 rounding
    torch.testing.assert_close(separate, merged, rtol=0, atol=1e-5)
    base = load_model(str(root / "qwen3_student")).model.eval()
    assert (scores(base) - separate).abs().max() > 1e-2  # the adapters do change the scores


# ---------------------------------------------------------------- training


def test_only_adapters_train_and_the_teacher_is_untouched(root, lora_run):
    run, student, teacher = lora_run
    model = student.get_base_model()
    assert trainable(model) and all("lora_" in n for n in trainable(model))
    original = load_file(str(root / "qwen3_student" / "model.safetensors"))
    own = base_state(model)
    assert set(original) <= set(own)
    for k in original:
        assert torch.equal(own[k], original[k]), k
    assert all(bool(p.any()) for n, p in model.named_parameters() if "lora_B" in n), "an adapter never trained"
    step2, step4 = adapter_weights(run, 2), adapter_weights(run, 4)
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)

    teacher_file = load_file(str(root / "qwen3_teacher" / "model.safetensors"))
    teacher_state = teacher.state_dict()
    assert not any("lora" in n or "base_layer" in n for n in teacher_state)
    for k in teacher_file:
        assert torch.equal(teacher_state[k], teacher_file[k]), k

    files = {p.name for p in (run / "checkpoints" / "step-000004").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # no base weights in a LoRA checkpoint
    saved = json.loads((run / "checkpoints" / "step-000004" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["base_model_name_or_path"]) == (4, 8.0, str(root / "qwen3_student"))


def test_lora_resume_equals_uninterrupted(root, lora_run, tmp_path):
    from gndpo.checkpoint import load_checkpoint
    from gndpo.models import load_model

    run, _, _ = lora_run
    with pytest.raises(GndpoError, match="holds LoRA adapters; load it into a model with the run's model.lora"):
        load_checkpoint(run / "checkpoints" / "step-000002", model=load_model(str(root / "qwen3_student")).model)
    split = tmp_path / "split"
    train(make_cfg(root, split, steps=2))
    train(make_cfg(root, split, steps=4, extra=["trainer.resume=true"]))
    a, b = adapter_weights(run, 4), adapter_weights(split, 4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_jsonl(split / "metrics.jsonl")] == [1, 2, 3, 4]
    for changed, key in (([f"model.path={root / 'qwen3_teacher'}"], "model.path"),
                         (["model.lora.rank=8"], "model.lora.rank")):
        with pytest.raises(GndpoError, match=rf"cannot resume .*: {key} changed from"):
            train(make_cfg(root, split, steps=5, extra=["trainer.resume=true", *changed]))


def test_gradient_checkpointing_with_lora(root, lora_run, tmp_path, monkeypatch):
    run, _, _ = lora_run
    out = tmp_path / "gc"
    student, _ = spied_train(make_cfg(root, out, steps=2, extra=["model.gradient_checkpointing=true"]), monkeypatch)
    assert student.get_base_model().is_activation_checkpointing
    # the same first update as without checkpointing (same draws, same gradients)
    for key in ("loss", "grad_norm", "entropy"):
        assert read_jsonl(out / "metrics.jsonl")[0][key] == pytest.approx(read_jsonl(run / "metrics.jsonl")[0][key],
                                                                          rel=1e-4, abs=1e-6), key
    assert all(bool(w.any()) for k, w in adapter_weights(out, 2).items() if "lora_B" in k)


def test_dropout_acts_in_the_update_not_in_the_old_logprobs(root, lora_run, tmp_path):
    run, _, _ = lora_run
    out = tmp_path / "dropout"
    train(make_cfg(root, out, steps=2, extra=["model.lora.dropout=0.5"]))
    plain, dropped = read_jsonl(run / "metrics.jsonl")[1], read_jsonl(out / "metrics.jsonl")[1]
    # step 2 (the adapters are no longer zero): the old log-probs are the sampler's policy, without dropout ...
    assert dropped["rollout/logprob_diff_max"] < 1e-4
    # ... while the update's forward drops adapter inputs, so its ratio leaves 1 (exactly 1 without dropout)
    assert plain["approx_kl"] == 0.0 and abs(dropped["approx_kl"]) > 1e-4


def test_tied_modules_to_save_train_together_and_merge(root, tmp_path, monkeypatch):
    """lm_head is tied to the input embeddings: both must use the one trained copy, in training and after merging."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "saved"
    student, _ = spied_train(make_cfg(root, run, steps=1, extra=["model.lora.modules_to_save=[lm_head]"]), monkeypatch)
    model = student.get_base_model()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    original = load_file(str(root / "qwen3_student" / "model.safetensors"))["model.embed_tokens.weight"]
    assert head.modules_to_save["default"].weight is embed.modules_to_save["default"].weight
    assert not torch.equal(head.modules_to_save["default"].weight, original)  # trained
    assert torch.equal(head.original_module.weight, original)  # the base copy is not
    out, _ = export_checkpoint(run, merge=True)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(model, ids),
                               rtol=0, atol=1e-5)


VLM_RUNS = [("internvl", "loop"), ("internvl", "generate"), ("qwen2_5_vl", "loop")]


@pytest.fixture(scope="module")
def vlm_runs(root, tmp_path_factory):
    """One VLM step per (family, rollout engine): {(family, engine): (run dir, student wrapper)}."""
    runs = {}
    for family, engine in VLM_RUNS:
        run = tmp_path_factory.mktemp("vlm") / f"{family}-{engine}"
        with pytest.MonkeyPatch.context() as mp:
            runs[family, engine] = run, spied_train(make_cfg(root, run, family=family, steps=1,
                                                             extra=[f"rollout.engine={engine}"]), mp)[0]
    return runs


@pytest.mark.parametrize("family,engine", VLM_RUNS)
def test_rollout_engines_train_vlms_with_lora(root, vlm_runs, family, engine):
    run, student = vlm_runs[family, engine]
    row = read_jsonl(run / "metrics.jsonl")[0]
    if engine == "loop":  # the loop's own log-probs match the trainer's: the adapters were in the sampler too
        assert row["rollout/logprob_diff_max"] < 1e-4
    else:
        assert "rollout/logprob_diff_max" not in row
    assert all(bool(w.any()) for k, w in adapter_weights(run, 1).items() if "lora_B" in k)
    from transformers import AutoModelForImageTextToText

    own = base_state(student.get_base_model())
    original = AutoModelForImageTextToText.from_pretrained(root / f"{family}_student").state_dict()
    frozen = {k: w for k, w in original.items() if "vision" in k or "visual" in k or "projector" in k}
    assert frozen and all(torch.equal(own[k], w) for k, w in frozen.items())


# ---------------------------------------------------------------- export


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_export_merge_equals_the_adapter_model(root, lora_run, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _, _ = lora_run
    out, what = export_checkpoint(run, merge=True)
    assert out == run / "export" / "step-000004-merged" and "merged into" in what
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert not files & {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "COMPLETE"}
    with monkeypatch.context() as no_peft:  # a plain transformers model: loading it never imports PEFT
        no_peft.setitem(sys.modules, "peft", None)
        merged, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "qwen3_student"),
                                              run / "checkpoints" / "step-000004")
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    torch.testing.assert_close(_logits(merged, ids), _logits(adapter_model, ids), rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(root / "qwen3_student")
    assert (_logits(merged, ids) - _logits(base, ids)).abs().max() > 1e-3

    with pytest.raises(GndpoError, match="already exists"):
        export_checkpoint(run, merge=True)


def test_export_adapters_and_vlm_merge(root, lora_run, vlm_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    run, _, _ = lora_run
    out, what = export_checkpoint(run, step=2)
    assert out == run / "export" / "step-000002" and "PEFT layout" in what
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not files & {"trainer_state.pt", "COMPLETE", "config.yaml", "model.safetensors"}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "qwen3_student"), out)
    ids = torch.tensor([[7, 8, 9, 10]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "qwen3_student"),
                                          run / "checkpoints" / "step-000002")
    torch.testing.assert_close(_logits(loaded, ids), _logits(reference, ids), rtol=0, atol=0)

    vlm_run, student = vlm_runs["internvl", "loop"]
    out, _ = export_checkpoint(vlm_run, merge=True)
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert {"processor_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    torch.testing.assert_close(_logits(merged, ids), _logits(student.get_base_model(), ids), rtol=0, atol=1e-5)


def test_export_of_a_full_run_and_cli_errors(root, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from gndpo.checkpoint import load_checkpoint, save_checkpoint
    from gndpo.models import load_model

    loaded = load_model(str(root / "qwen3_student"))
    run = tmp_path / "full"
    save_checkpoint(run, 3, model=loaded.model, optimizer=None, processor=loaded.processor, state={"step": 3},
                    config={"model": {"path": str(root / "qwen3_student")}})
    assert main(["export", str(run), "--merge"]) == 0
    out = run / "export" / "step-000003-merged"
    assert capsys.readouterr().out.strip() == f"wrote {out}: the full model of step 3 in float32"
    assert not {"trainer_state.pt", "COMPLETE", "config.yaml"} & {p.name for p in out.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k

    with pytest.raises(GndpoError, match="full-model checkpoint: load it with model.lora.rank=0"):
        load_checkpoint(run / "checkpoints" / "step-000003", model=apply_lora(loaded.model, LoraConfig(rank=2)))

    (tmp_path / "empty").mkdir()
    for argv, message in (
            ([str(tmp_path / "missing")], "does not exist"),
            ([str(tmp_path / "empty")], "holds no complete checkpoint"),
            ([str(run), "--step", "9"], "no complete checkpoint of step 9; available steps: 3"),
            ([str(run), "--out", str(out)], "already exists")):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert [p.name for p in (run / "export").iterdir()] == ["step-000003-merged"]  # no temporary leftovers


def test_missing_peft_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    base = ["model.path=m", "teacher.path=t", "data.train=d"]
    load_config(None, base)  # LoRA off: PEFT not needed
    with pytest.raises(ConfigError, match=r"model\.lora\.rank=8 needs PEFT, which is not installed: "
                                          r"pip install 'gndpo\[lora\]'"):
        load_config(None, [*base, "model.lora.rank=8"])
    with pytest.raises(ModelError, match=r"pip install 'gndpo\[lora\]'"):
        apply_lora(torch.nn.Linear(2, 2), LoraConfig(rank=8))
    assert main(["train", "--dry-run", *base, "model.lora.rank=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'gndpo[lora]'" in err
