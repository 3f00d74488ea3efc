"""The resource plan with several teachers and self-distillation: a frozen initial copy of the student costs its
weights in the teacher dtype, the current weights cost none (their compute copies and gathering cover the teacher's
pass), several teachers hold their weights together and score one at a time."""
from gndpo.config import load_config
from gndpo.lab.run import assets_dir
from gndpo.plan import build_plan

STUDENT, TEACHER = assets_dir() / "student", assets_dir() / "teacher"
CONTEXT = "teacher.context='\"Reference answer: {answer}\"'"


def plan(*overrides, **kw):
    cfg = load_config(None, [f"model.path={STUDENT}", "data.train=unused.jsonl", "trainer.device=cuda",
                             "data.max_prompt_length=64", "rollout.max_new_tokens=32", "rollout.n=4",
                             "trainer.prompts_per_step=4", *overrides])
    return build_plan(cfg, **kw)


def lines(p):
    return {line.name: line for line in p.lines}


def test_self_teacher_initial_copy_counts_the_students_weights_in_the_teacher_dtype():
    initial = plan("teacher.path=self", CONTEXT, "teacher.self_weights=initial", "teacher.dtype=bfloat16")
    current = plan("teacher.path=self", CONTEXT)
    student = initial.student.total
    assert lines(initial)["self teacher weights"].bytes == student * 2 and not lines(initial)["self teacher weights"].phases
    assert not any("teacher weights" in name for name in lines(current))
    # the initial copy is the one difference of what stays in memory
    persistent = {p: sum(x.bytes for x in q.lines if not x.phases) for p, q in (("i", initial), ("c", current))}
    assert persistent["i"] - persistent["c"] == student * 2
    # current: the teacher's pass is the student's, in its compute dtype (autocast copies also during scoring)
    assert "teacher scoring" in lines(current)["compute copies (autocast)"].phases
    assert "teacher scoring" not in lines(initial)["compute copies (autocast)"].phases
    assert current.teacher is current.student and [r for r, _, _ in current.teachers] == ["self teacher"]


def test_self_teacher_under_fsdp_gathers_the_whole_student_for_its_pass():
    p = plan("teacher.path=self", CONTEXT, world_size=2, shard="fsdp")
    s = p.student
    assert lines(p)["student gathered for the self teacher"].bytes == (s.layers - 2) * s.layer_params * 2
    assert lines(p)["student gathered for the self teacher"].phases == ("teacher scoring",)


def test_several_teachers_hold_their_weights_together_and_score_one_at_a_time():
    one = plan(f"teacher.path={TEACHER}")
    both = plan(f"teachers=[{{name: a, path: \"{TEACHER}\"}}, {{name: b, path: \"{STUDENT}\"}}, "
                "{name: c, backend: server, url: \"http://h:1\"}]", "data.teacher_key=t")
    by_name = lines(both)
    assert by_name["teacher a weights"].bytes == one.teacher.total * 2 == lines(one)["teacher weights"].bytes
    assert by_name["teacher b weights"].bytes == both.student.total * 2
    assert not any("teacher c" in name for name in by_name)  # served: no memory here
    # scoring lines: the larger teacher's only (a, the lab teacher), as the single-teacher plan counts them
    assert by_name["teacher a scoring working memory"].bytes == lines(one)["teacher scoring working memory"].bytes
    assert not any(name.startswith("teacher b scoring") for name in by_name)
    assert [r for r, _, _ in both.teachers] == ["teacher a", "teacher b"]
