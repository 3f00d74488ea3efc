"""Fixture rows of the seven Table-1 benchmarks in VLMEvalKit's TSV format, with canned model and judge replies.

Each question carries a tag like ``[Q:MV1]`` the fake model keys on; each canned prediction that needs the judge
carries ``[P:MV3]``, which the fake judge keys on. ``EXPECTED`` holds each benchmark's headline number worked out
by hand from the official scoring rules (see the comments at each builder): e.g. DynaMath's worst case counts a
seed question only when all its variants are right (seed 1: B, B, B all right; seed 2: its third variant wrong ->
1 of 2 = 50.0, while the average over variants is 5/6); WeMath's strict score is (525 - 0.5 IG - RM - IK) / 525
with the harness's fixed 525 (one problem complete mastery, one rote memorization, one insufficient knowledge ->
523/525 = 99.62 strict; loose counts rote memorization only when every step is wrong -> 524/525 = 99.81).
Column sets follow what ms-vlmeval 0.0.20's dataset classes read (DESIGN.md, "Evaluation harness facts").
"""
import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

VLM = "fixture-vlm"
JUDGE = "fixture-org/judge-1"  # a "/" as in Qwen/Qwen2.5-72B-Instruct: VLMEvalKit puts the name in file paths


def png_b64(seed, size=32):
    """A tiny deterministic PNG (a solid colour and a rectangle), base64 (> 64 characters, as VLMEvalKit needs)."""
    col = ((seed * 53) % 256, (seed * 97) % 256, (seed * 151) % 256)
    im = Image.new("RGB", (size, size), col)
    ImageDraw.Draw(im).rectangle([4 + seed % 8, 4, 20 + seed % 8, 12 + seed % 16],
                                 fill=(255 - col[0], 255 - col[1], 255 - col[2]))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


RULES = []  # {model, contains, reply}


def model_says(qtok, reply):
    RULES.append({"model": VLM, "contains": [qtok], "reply": reply})


def judge_says(contains, reply):
    RULES.append({"model": JUDGE, "contains": contains if isinstance(contains, list) else [contains], "reply": reply})


def mathvista():
    # columns used by vlmeval: index, image, question (prompt text, as-is), answer, question_type
    # ('multi_choice'|'free_form'), answer_type ('integer'|'float'|'text'|'list'), choices (python list literal),
    # answer_option (letter, multi_choice only), task, skills (python list literal). precision/unit are informational.
    rows = [
        dict(index=1, question='[Q:MV1] Hint: Please answer the question and provide the correct option letter, '
             'e.g., A, B, C, D, at the end.\nQuestion: What fraction of the shape is blue?\n'
             'Choices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5',
             answer='8/11', question_type='multi_choice', answer_type='text',
             choices="['3/11', '8/11', '6/11', '3/5']", answer_option='B', precision=None, unit=None,
             task='figure question answering', skills="['arithmetic reasoning']"),
        dict(index=2, question='[Q:MV2] Hint: Please answer the question requiring an integer answer and provide '
             'the final value, e.g., 1, 2, 3, at the end.\nQuestion: Which number is missing?',
             answer='14', question_type='free_form', answer_type='integer', choices=None, answer_option=None,
             precision=None, unit=None, task='math word problem',
             skills="['arithmetic reasoning', 'logical reasoning']"),
        dict(index=3, question='[Q:MV3] Hint: Please answer the question requiring a floating-point number with one '
             'decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\n'
             'Question: What is the length of the bar?',
             answer='1.5', question_type='free_form', answer_type='float', choices=None, answer_option=None,
             precision=1.0, unit='cm', task='figure question answering', skills="['statistical reasoning']"),
        dict(index=4, question='[Q:MV4] Hint: Please answer the question requiring an integer answer and provide '
             'the final value, e.g., 1, 2, 3, at the end.\nQuestion: How many squares are there?',
             answer='7', question_type='free_form', answer_type='integer', choices=None, answer_option=None,
             precision=None, unit=None, task='math word problem', skills="['arithmetic reasoning']"),
        dict(index=5, question='[Q:MV5] Hint: Please answer the question and provide the correct option letter, '
             'e.g., A, B, C, D, at the end.\nQuestion: Which is largest?\nChoices:\n(A) 1\n(B) 2\n(C) 3\n(D) 0',
             answer='3', question_type='multi_choice', answer_type='text',
             choices="['1', '2', '3', '0']", answer_option='C', precision=None, unit=None,
             task='figure question answering', skills="['algebraic reasoning']"),
    ]
    model_says('[Q:MV1]', 'The blue part is 8 of 11 pieces, so the answer is B')          # prefetch hit
    model_says('[Q:MV2]', '14')                                                           # prefetch int hit
    model_says('[Q:MV3]', 'The bar measures one and a half centimetres. [P:MV3]')         # judge -> 1.5 hit
    model_says('[Q:MV4]', '<think>count them... maybe 7?</think>I count eight squares. [P:MV4]')  # judge -> 8 miss
    model_says('[Q:MV5]', 'A')                                                            # prefetch, miss
    judge_says('[P:MV3]', '1.5')
    judge_says('[P:MV4]', '8')
    return rows, {'judge': 60.0, 'exact_matching': 'AssertionError (judge.working() asserted)'}


def mmmu():
    # MMMU_DEV_VAL: index, image (base64, or python-list string of base64 for multi-image), question (may contain
    # '<image k>' placeholders), A..I options (empty => open question), answer (letter, or free text for open
    # questions), split ('dev'|'validation'), category (optional), l2-category (optional), image_path (optional)
    rows = [
        dict(index=1, question='[Q:MM1] <image 1> What shape is shown?', A='square', B='circle', C='star', D='line',
             answer='A', split='dev', category='Math'),
        dict(index=2, question='[Q:MM2] <image 1> Which colour dominates?', A='red', B='green', C='blue', D='black',
             answer='B', split='validation', category='Art'),
        dict(index=3, question='[Q:MM3] <image 1> Which object is drawn?', A='red square', B='green triangle',
             C='blue circle', D='yellow star', answer='C', split='validation', category='Art'),
        dict(index=4, question='[Q:MM4] Compare <image 1> and <image 2>. Which is larger?', A='first', B='second',
             C='same', D='cannot tell', answer='D', split='validation', category='Math', _nimg=2),
        dict(index=5, question='[Q:MM5] <image 1> What is 6 times 7?', A=None, B=None, C=None, D=None,
             answer='42', split='validation', category='Math'),
    ]
    model_says('[Q:MM1]', 'A')
    model_says('[Q:MM2]', 'The answer is B.')
    model_says('[Q:MM3]', 'It looks like the round blue thing. [P:MM3]')   # no option match -> judge -> C
    model_says('[Q:MM4]', 'A')
    model_says('[Q:MM5]', '42')                                            # open question, matched as text
    judge_says('[P:MM3]', 'C')
    return rows, {'judge': 0.75, 'exact_matching': 0.5}


def mathvision():
    # MathVision: index, image, question (prompt text as-is; for MC it already lists the options), answer
    # (letter for MC, value/LaTeX for free form), choices (python list literal; '[]' for free form), category
    # (subject), level (informational)
    rows = [
        dict(index=1, question='[Q:MX1] Which figure comes next?\nChoices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5',
             answer='B', choices="['1', '2', '3', '4', '5']", category='logic', level=1),
        dict(index=2, question='[Q:MX2] How many dots are there?', answer='12', choices='[]',
             category='counting', level=1),
        dict(index=3, question='[Q:MX3] What fraction of the square is shaded?', answer='\\frac{1}{2}',
             choices='[]', category='metric geometry - area', level=2),
        dict(index=4, question='[Q:MX4] Which net folds into a cube?\nChoices: (A) a (B) b (C) c (D) d',
             answer='D', choices="['a', 'b', 'c', 'd']", category='solid geometry', level=3),
    ]
    model_says('[Q:MX1]', 'The answer is B')
    model_says('[Q:MX2]', '12')
    model_says('[Q:MX3]', 'One half of the square is shaded. [P:MX3]')   # judge -> 0.5 == \frac{1}{2}
    model_says('[Q:MX4]', 'C')
    judge_says('[P:MX3]', '0.5')
    return rows, {'judge': 75.0, 'exact_matching': 'AssertionError (judge.working() asserted)'}


def mathverse():
    # MathVerse_MINI_Vision_Only: index, image, question (prompt; the real file's Vision-Only question is mostly
    # an instruction, the problem is in the image), answer, question_for_eval (used by the scoring judge),
    # problem_version ('Vision Only'), metadata (python-dict-literal string with at least 'subject','subfield';
    # single quotes are turned into double quotes and json-parsed, so NO apostrophes inside), query_cot (only
    # for *_cot variant), question_type, problem_index (informational)
    def meta(subject, subfield):
        return str({'split': 'testmini', 'source': 'fixture', 'subject': subject, 'subfield': subfield})
    rows = [
        dict(index=1, problem_index=1, question='[Q:VS1] According to the question shown in the image, please '
             'directly answer the question and provide the correct option letter, e.g., A, B, C, D.',
             answer='B', question_for_eval='Find the angle. Choices: A:30 B:40 C:50 D:60',
             problem_version='Vision Only', question_type='multi-choice', metadata=meta('plane geometry', 'angle'),
             query_cot='[Q:VS1] cot'),
        dict(index=2, problem_index=2, question='[Q:VS2] According to the question shown in the image, please '
             'directly answer the question.', answer='5', question_for_eval='Solve for x.',
             problem_version='Vision Only', question_type='free-form', metadata=meta('functions', 'coordinate'),
             query_cot='[Q:VS2] cot'),
        dict(index=3, problem_index=3, question='[Q:VS3] According to the question shown in the image, please '
             'directly answer the question.', answer='60°', question_for_eval='Find angle ABC.',
             problem_version='Vision Only', question_type='free-form', metadata=meta('plane geometry', 'angle'),
             query_cot='[Q:VS3] cot'),
        dict(index=4, problem_index=4, question='[Q:VS4] According to the question shown in the image, please '
             'directly answer the question and provide the correct option letter, e.g., A, B, C, D.',
             answer='C', question_for_eval='Find the length. Choices: A:1 B:2 C:3 D:4',
             problem_version='Vision Only', question_type='multi-choice', metadata=meta('plane geometry', 'length'),
             query_cot='[Q:VS4] cot'),
    ]
    model_says('[Q:VS1]', 'Therefore the answer is B. [P:VS1]')
    model_says('[Q:VS2]', 'x equals five, i.e. 5 [P:VS2]')
    model_says('[Q:VS3]', 'The angle measures 60 degrees [P:VS3]')
    model_says('[Q:VS4]', 'A [P:VS4]')
    # stage-2 (score) prompts first: they contain [Standard Answer] and the extracted answer
    judge_says(['[Standard Answer]: 60°', '[Model_answer] : 60 degrees'], '1')
    judge_says(['[Standard Answer]: C', '[Model_answer] : A'], '0')
    # stage-1 (extract) prompts contain the raw prediction
    judge_says('[P:VS1]', 'B')
    judge_says('[P:VS2]', '5')
    judge_says('[P:VS3]', '60 degrees')
    judge_says('[P:VS4]', 'A')
    return rows, {'judge': 75.0, 'exact_matching': 'AssertionError (judge.working() asserted)'}


def dynamath():
    # DynaMath: index, image, question, answer, answer_type ('multiple choice'|'float'|'free form'), subject,
    # knowledge_level, qid (seed question id), varid (variant id 1..10). Worst-case groups rows by qid and
    # REQUIRES every qid value to also be the `index` of a varid==1 row (dynamath.py:215-221), i.e. index==qid
    # for the first variant.
    rows = []
    seeds = [(1, 'multiple choice', ['B', 'B', 'B'], 'algebra', 'high school'),
             (2, 'float', ['3.142', '2.000', '1.414'], 'geometry', 'elementary school')]
    # varid-1 rows get index == qid (1, 2); other variants get 3.. (interleaved like the real file)
    idx_of = {(1, 1): 1, (2, 1): 2, (1, 2): 3, (2, 2): 4, (1, 3): 5, (2, 3): 6}
    for qid, atype, answers, subj, lvl in seeds:
        for v, ans in enumerate(answers, start=1):
            i = idx_of[(qid, v)]
            q = (f'[Q:DY{i}] Seed {qid} variant {v}. ' +
                 ('Which option is correct? Choices: (A) 1 (B) 2 (C) 3 (D) 4' if atype == 'multiple choice'
                  else 'Compute the value.'))
            rows.append(dict(index=i, question=q, answer=ans, answer_type=atype, subject=subj,
                             knowledge_level=lvl, qid=qid, varid=v))
    model_says('[Q:DY1]', '{"solution": "Option B holds.", "short answer": "B"}')
    model_says('[Q:DY3]', '```json\n{"solution": "again B", "short answer": "B"}\n```')
    model_says('[Q:DY5]', 'B')
    model_says('[Q:DY2]', '{"solution": "it is pi", "short answer": "3.142"}')
    model_says('[Q:DY4]', 'Approximately two. [P:DY4]')                       # non-JSON -> judge -> 2.000
    model_says('[Q:DY6]', '{"solution": "wrong", "short answer": "1.0"}')     # wrong -> seed 2 fails worst-case
    judge_says('[P:DY4]', '2.000')
    rows.sort(key=lambda r: r['index'])
    return rows, {'judge': 0.5, 'exact_matching': 0.5, 'average': 5 / 6}


def wemath():
    # WeMath: index, image, question, A..G options, answer (letter), key ('2steps_1','2steps_2','2steps_multi',
    # '3steps_1'..'3steps_3','3steps_multi'), ID (problem id shared by all steps of one multi-step problem),
    # 'knowledge concept' (leaf name from wemath.py knowledge_structure_nodes), requirement (WeMath_COT only),
    # option (informational)
    opts = dict(A='3 cm', B='4 cm', C='5 cm', D='6 cm', E='7 cm')
    spec = [  # (index, ID, key, answer, concept, model reply)
        (1, 'P1', '2steps_1', 'A', 'Perimeter of Triangles', 'Answer: A'),
        (2, 'P1', '2steps_2', 'B', 'Perimeter of Squares', '<Thought process>: add sides <Answer>: B'),
        (3, 'P1', '2steps_multi', 'C', 'Perimeter of Triangles', 'the length is five centimeters [P:WM3]'),
        (4, 'P2', '3steps_1', 'A', 'Understanding Circles', 'Answer: A'),
        (5, 'P2', '3steps_2', 'B', 'Understanding Sectors', 'Answer: D'),
        (6, 'P2', '3steps_3', 'C', 'Understanding Circles', 'Answer: C'),
        (7, 'P2', '3steps_multi', 'D', 'Understanding Circles', 'Answer: D'),
        (8, 'P3', '2steps_1', 'A', 'Perimeter of Rectangles', 'Answer: B'),
        (9, 'P3', '2steps_2', 'B', 'Perimeter of Rectangles', 'Answer: C'),
        (10, 'P3', '2steps_multi', 'C', 'Perimeter of Rectangles', 'Answer: D'),
    ]
    rows = []
    for i, pid, key, ans, concept, reply in spec:
        rows.append(dict(index=i, question=f'[Q:WM{i}] Problem {pid} step {key}: find the length.', **opts,
                         answer=ans, key=key, ID=pid, **{'knowledge concept': concept},
                         requirement='Regarding the format, please answer following the template below, and be '
                                     'sure to include two <> symbols:\n<Thought process>: <<your thought '
                                     'process>> <Answer>: <<your option>>'))
        model_says(f'[Q:WM{i}]', reply)
    judge_says('[P:WM3]', 'C')
    # P1: all steps right + multi right -> CompleteMastery; P2: a step wrong + multi right -> RoteMemorization
    # (strict); P3: all wrong -> InsufficientKnowledge.  Score(strict) = (525 - 0.5*IG - RM_s - IK)/525
    return rows, {'judge': '99.62%', 'exact_matching': '99.52%'}


def logicvista():
    # LogicVista: index, image, question (options are inside the question text), answer ('A' or 'A, C' for
    # multi-answer), skill (string; accuracy split by substrings inductive/deductive/numerical/spatial/mechanical)
    spec = [(1, 'inductive', 'A', 'A [P:LV1]', 'A'),
            (2, 'deductive', 'B', 'B [P:LV2]', 'B'),
            (3, 'numerical', 'A, C', 'Both A and C [P:LV3]', 'AC'),
            (4, 'spatial', 'D', 'B [P:LV4]', 'B'),
            (5, 'mechanical', 'C', 'The gear turns like option C [P:LV5]', 'C')]
    rows = []
    for i, skill, ans, reply, jreply in spec:
        rows.append(dict(index=i, question=f'[Q:LV{i}] Which option is correct?\nA. one\nB. two\nC. three\nD. four',
                         answer=ans, skill=skill))
        model_says(f'[Q:LV{i}]', reply)
        judge_says(f'[P:LV{i}]', jreply)
    return rows, {'judge': 80.0, 'exact_matching': 'None (evaluate() returns None, no score file)'}


BUILDERS = {
    'MathVista_MINI': mathvista,
    'MMMU_DEV_VAL': mmmu,
    'MathVision': mathvision,
    'MathVerse_MINI_Vision_Only': mathverse,
    'DynaMath': dynamath,
    'WeMath': wemath,
    'LogicVista': logicvista,
}




EXPECTED = {  # headline numbers in percent, as gndpo reports them
    "mathvista": 60.0, "mmmu": 75.0, "mathvision": 75.0, "mathverse": 75.0, "dynamath": 50.0,
    "wemath": 523 / 525 * 100, "logicvista": 80.0,
}


def write_fixtures(out: Path) -> list:
    """Write <Dataset>.tsv for the seven benchmarks into ``out``; returns the fake server's rules."""
    RULES.clear()
    out.mkdir(parents=True, exist_ok=True)
    seed = 0
    for name, build in BUILDERS.items():
        rows, _ = build()
        for r in rows:
            seed += 1
            n = r.pop("_nimg", 1)
            r["image"] = png_b64(seed) if n == 1 else str([png_b64(seed * 10 + k) for k in range(n)])
        keys = dict.fromkeys(k for r in rows for k in r)
        cols = ["index", "image"] + [c for c in keys if c not in ("index", "image")]
        with open(out / f"{name}.tsv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(cols)
            for r in rows:
                w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    # any other scoring prompt of MathVerse's second stage: "0" (not equivalent)
    RULES.append({"model": JUDGE, "contains": ["[Standard Answer]"], "reply": "0"})
    return [dict(r) for r in RULES]


if __name__ == "__main__":
    import sys

    print(json.dumps(write_fixtures(Path(sys.argv[1])), indent=1))
