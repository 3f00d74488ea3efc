"""The lab's two-teacher and self-distillation runs: shipped specialists, routing by half, valid configs, the
report's tables."""
import json

import pytest

from gndpo.data.loaders import load_records
from gndpo.lab import bootstrap, task
from gndpo.lab import teachers as lab_teachers
from gndpo.lab.bootstrap import ASSETS_DIR
from gndpo.lab.run import LabPlan, lab_tasks


def test_questions_belong_to_one_half():
    assert task.subtask("Digit sum times 7.") == "sum" and task.subtask("Digit product plus 2.") == "prod"
    items = task.all_items()
    assert {task.subtask(i.problem()) for i in items if i.operation == "sum_times"} == {"sum"}
    assert {task.subtask(i.problem()) for i in items if i.operation == "prod_plus"} == {"prod"}
    with pytest.raises(ValueError, match="not a lab question"):
        task.subtask("What is 2 plus 3?")


def test_shipped_specialists_are_strong_on_their_half_only():
    report = json.loads((ASSETS_DIR / "bootstrap.json").read_text())
    for kind, half in bootstrap.SPECIALISTS.items():
        entry = report["models"][kind]
        other = "prod" if half == "sum" else "sum"
        assert (ASSETS_DIR / kind / "model.safetensors").stat().st_size < 2 * 2**20
        assert entry["subtask"] == half and entry["subtask_accuracy"][half] >= 0.9
        assert entry["subtask_accuracy"][other] <= 0.05 and entry["seed"] == report["seed"] + bootstrap._SEED_OFFSETS[kind]


def test_a_specialist_trains_on_its_half_only(tmp_path, monkeypatch):
    task.write_task(tmp_path, seed=0, n_train=12, n_test=6)
    train = load_records(tmp_path, split="train", id_key="id")
    test = load_records(tmp_path, split="test", id_key="id")
    seen = []
    real = bootstrap.encode_sft
    monkeypatch.setattr(bootstrap, "encode_sft", lambda processor, records, *a, **k: seen.append(records) or
                        real(processor, records, *a, **k))
    monkeypatch.setitem(bootstrap.RECIPES, "teacher_prod", bootstrap.SFTRecipe(steps=2, batch_size=2, warmup=1))
    _, _, entry = bootstrap.bootstrap_model("teacher_prod", train, test, task.read_solutions(tmp_path / "train.jsonl"),
                                            seed=0)
    assert seen and {task.subtask(r.prompt) for r in seen[0]} == {"prod"}
    assert len(seen[0]) == sum(task.subtask(r.prompt) == "prod" for r in train) < len(train)
    assert entry["subtask"] == "prod" and set(entry["subtask_accuracy"]) == {"sum", "prod"} and entry["steps"] == 2


def test_the_options_add_valid_runs_routed_by_half(tmp_path):
    task.write_task(tmp_path, seed=0, n_train=20, n_test=4)
    plan = LabPlan(seeds=2, steps=3, n_train=20, n_test=4, methods=("gndpo",), stress=False, teachers=True,
                   self_distill=True)
    tasks = lab_tasks(plan, tmp_path, tmp_path / "runs")  # every config validated by load_config
    names = [t.name for t in tasks]
    for tag in ("-2teachers", "-2teachers-per_teacher", "-sum_teacher", "-self", "-self-initial", "-self-in-prompt"):
        assert [f"gndpo{tag}-seed0", f"gndpo{tag}-seed1"] == [n for n in names if n.startswith(f"gndpo{tag}-seed")]
    by_name = {t.name: t.cfg for t in tasks}
    two = by_name["gndpo-2teachers-seed1"]
    assert [e.name for e in two.teachers] == ["sum", "prod"] and two.teacher.path is None
    assert two.data.teacher_key == "teacher" and two.algorithm.teacher_norm == "batch"
    assert by_name["gndpo-2teachers-per_teacher-seed0"].algorithm.teacher_norm == "per_teacher"
    assert by_name["gndpo-sum_teacher-seed0"].teacher.path.endswith("teacher_sum") and not by_name[
        "gndpo-sum_teacher-seed0"].teachers
    own = by_name["gndpo-self-initial-seed0"].teacher
    assert (own.path, own.context, own.self_weights, own.context_at) == ("self", lab_teachers.SELF_CONTEXT, "initial",
                                                                         "system")
    assert by_name["gndpo-self-in-prompt-seed1"].teacher.context_at == "prompt"
    few = LabPlan(seeds=1, steps=3, n_train=20, n_test=4, methods=("gndpo",), stress=False, teachers=True,
                  self_distill=True, variants=("sum_teacher", "self-initial"))
    assert [t.name for t in lab_tasks(few, tmp_path, tmp_path / "runs")][:-2] == [
        "gndpo-seed0", "gndpo-sum_teacher-seed0", "gndpo-self-initial-seed0"]
    assert lab_teachers.check_variants(("self",), True, False) == \
        "lab variant 'self' belongs to --self-distill, which is not given"
    assert lab_teachers.check_variants(("selfish",), True, True).startswith("unknown lab variant 'selfish'; choose")
    rows = [json.loads(line) for line in open(tmp_path / lab_teachers.ROUTED_TRAIN)]
    assert len(rows) == 20 and all(r["teacher"] == task.subtask(r["problem"]) for r in rows)
    assert {r["teacher"] for r in rows} == {"sum", "prod"}


def test_report_tables():
    runs = [{"method": m, "seed": s, "accuracy": a, "grad_norm_max": 2.0, "run_dir": f"{m}-{s}"}
            for m, s, a in (("gndpo", 0, 0.4), ("gndpo", 1, 0.5), ("gndpo-2teachers", 0, 0.6),
                            ("gndpo-2teachers", 1, 0.8), ("gndpo-self", 0, 0.1), ("gndpo-self", 1, 0.3))]
    halves = {r["run_dir"]: {"all": r["accuracy"], "sum": r["accuracy"] + 0.1, "prod": r["accuracy"] - 0.1}
              for r in runs}
    md = lab_teachers.teachers_section(runs, halves, {"base student": {"all": 0.3, "sum": 0.35, "prod": 0.25}}, 2)
    assert "| base student | 30.0 | 35.0 | 25.0 |" in md
    assert "| gndpo-2teachers | 70.0 ± 14.1 | 80.0 ± 14.1 | 60.0 ± 14.1 |" in md
    assert "gndpo-self" not in md and "per_teacher" not in md  # runs that did not happen have no row
    preference = {"responses": 8, "right": 2, "system": {"reward_mean": -0.5, "right": -0.25, "wrong": -0.5,
                                                         "clamp_frac": 0.05},
                  "prompt": {"reward_mean": -1.0, "right": -1.5, "wrong": -0.75, "clamp_frac": 0.1}}
    md = lab_teachers.self_section(runs, 2, preference)
    assert "| gndpo-self | 20.0 ± 14.1 | 10.0 / 30.0 | 2.00 |" in md and "| gndpo | 45.0 ± 7.1 |" in md
    assert "| before the question | -1.000 | -1.500 | -0.750 | 10.0 % |" in md and "8 responses" in md
