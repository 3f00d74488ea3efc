"""A teacher's privileged prompt (teacher.context): the teacher scores the student's response after a longer prompt
than the student's, on every scoring path (packed shared prefix, KV-cache shared prefix, one row per response;
the student itself as teacher; a served teacher), and every score equals a plain forward over that teacher prompt
+ response alone. Templates, placement and the errors of a bad template or record."""
import json

import pytest
import torch

from gndpo.data.records import PromptRecord
from gndpo.errors import ConfigError, DataError
from gndpo.forward import ResponseScorer, rollout_logprobs
from gndpo.models import load_model
from gndpo.rollout.base import SamplingParams
from gndpo.rollout.hf import HFRollout
from gndpo.serve import encode_logprobs
from gndpo.teacher.context import ContextTeacher, check_records, privileged, template_fields
from gndpo.teacher.hf import HFTeacher
from gndpo.teacher.self import StudentTeacher

from scoring_reference import alone

CONTEXT = "Reference answer: {answer}"


def expected(model, processor, rollouts, records):
    out = torch.zeros(rollouts.response_ids.shape)
    for b in range(rollouts.size):
        n = int(rollouts.response_mask[b].sum())
        out[b, :n] = alone(model, processor, records[int(rollouts.prompt_index[b])], rollouts.response_ids[b], n)
    return out


@pytest.fixture(scope="module", params=["text", "vlm"])
def pair(request, tiny_dir):
    """(student, teacher, rollouts of the student over 3 records, n=3)."""
    from gndpo.data.loaders import load_records

    kind = request.param
    student, teacher = load_model(str(tiny_dir / f"{kind}_student")), load_model(str(tiny_dir / f"{kind}_teacher"))
    data = tiny_dir / "text.jsonl" if kind == "text" else tiny_dir / "vlm" / "train.jsonl"
    records = load_records(str(data), image_key=None if kind == "text" else "images", id_key="id")[:3]
    torch.manual_seed(1)
    ro = HFRollout(student.model, student.processor, suffix=None).generate(records, SamplingParams(n=3, max_new_tokens=6))
    return student, teacher, ro.select([4, 0, 1, 8, 6, 7, 2])  # unordered, 2-3 samples per prompt


@pytest.mark.parametrize("path", ["packed", "kv-cache", "joint"])
def test_teacher_prompt_differs_from_the_students_and_every_path_scores_it_as_alone(pair, path, monkeypatch):
    import gndpo.forward

    monkeypatch.setattr(gndpo.forward, "PACK_TOKENS", 4096 if path == "packed" else 0)
    if path == "joint":  # no prefix sharing: one row per response
        monkeypatch.setattr(gndpo.forward, "shares_prefixes", lambda model: False)
    used = []
    for name in ("_packed_prefix_hidden", "_shared_prefix_hidden", "_joint_inputs"):
        real = getattr(gndpo.forward, name)
        monkeypatch.setattr(gndpo.forward, name, lambda *a, _n=name, _r=real, **k: used.append(_n) or _r(*a, **k))
    student, teacher, ro = pair
    rich = [privileged(r, CONTEXT, "prompt") for r in ro.records]
    assert all(len(p.prompt) > len(r.prompt) for p, r in zip(rich, ro.records))
    scored = ContextTeacher(HFTeacher(teacher.model, teacher.processor, suffix=None, micro_batch_size=4),
                            CONTEXT).score(ro).logprobs
    assert used and set(used) == {{"packed": "_packed_prefix_hidden", "kv-cache": "_shared_prefix_hidden",
                                   "joint": "_joint_inputs"}[path]}
    torch.testing.assert_close(scored, expected(teacher.model, teacher.processor, ro, rich), rtol=0, atol=1e-5)
    # the student's own pass over the same responses keeps its own (shorter) prompts
    with torch.no_grad():
        own = rollout_logprobs(student.model, student.processor, ro, micro_batch_size=4, suffix=None, system_prompt=None)
    torch.testing.assert_close(own, expected(student.model, student.processor, ro, ro.records), rtol=0, atol=1e-5)
    # and the context matters: the same teacher without it scores otherwise
    bare = HFTeacher(teacher.model, teacher.processor, suffix=None).score(ro).logprobs
    assert (bare - scored).abs().max() > 1e-3


def test_the_student_as_its_own_teacher_scores_as_alone_in_eval_mode_without_gradient(pair):
    student, _, ro = pair
    scorer = ResponseScorer(student.model)
    scorer.train()
    rich = [privileged(r, CONTEXT, "system") for r in ro.records]
    teacher = ContextTeacher(StudentTeacher(scorer, student.processor, suffix=None, micro_batch_size=4, topk=3),
                             CONTEXT, "system")
    scores = teacher.score(ro)
    assert scorer.training and not scores.logprobs.requires_grad  # the update's mode is back; no graph kept
    student.model.eval()
    torch.testing.assert_close(scores.logprobs, expected(student.model, student.processor, ro, rich), rtol=0,
                               atol=1e-5)
    assert scores.topk_ids.shape == (*ro.response_ids.shape, 3)
    # top-1 log-prob >= the sampled token's, at every response position
    mask = ro.response_mask
    assert bool((scores.topk_logprobs[..., 0][mask] >= scores.logprobs[mask] - 1e-6).all())


def test_a_served_teacher_gets_the_privileged_prompt_ids(tiny_dir, serve):
    """The client renders the teacher's prompts itself: a server scoring whatever ids it receives with the HF
    teacher returns the scores of the privileged prompt + response."""
    from test_client import client, fingerprint_route

    from gndpo.data.loaders import load_records

    student, teacher = load_model(str(tiny_dir / "text_student")), load_model(str(tiny_dir / "text_teacher"))
    records = load_records(str(tiny_dir / "text.jsonl"), image_key=None, id_key="id")[:2]
    torch.manual_seed(3)
    ro = HFRollout(student.model, student.processor, suffix=None).generate(records, SamplingParams(n=2, max_new_tokens=6))

    def score(body, path):
        rows = []
        for req in body["requests"]:
            prompt = body["prompts"][req["prompt"]]["prompt_token_ids"]
            ids = torch.tensor([prompt + req["response_token_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(teacher.model(input_ids=ids).logits[0].float(), -1)
            rows.append([float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(req["response_token_ids"])])
        return 200, {"logprobs": encode_logprobs(rows)}

    fake = serve({"/fingerprint": fingerprint_route(student.processor), "/score": score})
    served = ContextTeacher(client(fake.url, student.processor), CONTEXT)
    rich = [privileged(r, CONTEXT, "prompt") for r in ro.records]
    torch.testing.assert_close(served.score(ro).logprobs, expected(teacher.model, teacher.processor, ro, rich),
                               rtol=0, atol=1e-5)


@pytest.fixture
def serve():
    from test_client import FakeServer

    servers = []
    yield lambda routes: servers.append(FakeServer(routes)) or servers[-1]
    for s in servers:
        s.close()


# ---------------------------------------------------------------- templates


def record(**fields):
    return PromptRecord("r1", "What is 2 plus 3?", "5", fields={"answer": "5", **fields})


def test_context_placement_in_the_prompt_and_the_system_turn():
    from gndpo.data.templates import build_messages

    rec = record(solution="2+3=5")
    at_prompt = privileged(rec, "Hint: {solution} (so {answer})", "prompt")
    assert at_prompt.prompt == "Hint: 2+3=5 (so 5)\nWhat is 2 plus 3?" and at_prompt.answer == "5"
    at_system = privileged(rec, "Answer {answer}.", "system")
    assert at_system.prompt == rec.prompt
    assert build_messages(at_system, suffix=None, system_prompt="Be brief.")[0] == {
        "role": "system", "content": "Be brief.\n\nAnswer 5."}
    assert build_messages(at_system, suffix=None)[0] == {"role": "system", "content": "Answer 5."}
    assert build_messages(rec, suffix=None)[0]["role"] == "user"  # the student's record: no system turn
    assert privileged(rec, "{{literal}} {answer}", "prompt").prompt.startswith("{literal} 5\n")


@pytest.mark.parametrize("template, match", [
    ("{answer.x}", "not a plain field name"), ("{answer!r}", "not a plain field name"),
    ("{answer:>5}", "not a plain field name"), ("{}", "not a plain field name"),
    ("Answer {", "not a valid template"), ("no field", "names no record field")])
def test_bad_templates_are_one_line_config_errors(template, match):
    with pytest.raises(ConfigError, match=match) as info:
        template_fields(template)
    assert "\n" not in str(info.value)


def test_a_record_missing_a_field_is_named(tmp_path):
    from gndpo.data.loaders import load_records

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        {"id": "a", "problem": "p", "answer": "1", "solution": "s", "score": 3},
        {"id": "b", "problem": "q", "answer": "2"})) + "\n")
    records = load_records(str(path), image_key=None, id_key="id")
    assert records[0].fields == {"id": "a", "problem": "p", "answer": "1", "solution": "s", "score": "3"}
    check_records("{answer} {score}", records[:1])
    with pytest.raises(DataError, match=r"teachers\[1\].context reads the field 'solution', which record 1 "
                                        r"\(id 'b'\) of data.train lacks \(its fields: id, problem, answer\)"):
        check_records("{solution}", records, where="teachers[1].context")
