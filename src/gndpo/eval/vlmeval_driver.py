"""Runs inside the harness's own virtualenv (``ms-vlmeval``): one model, several VLMEvalKit datasets.

    python vlmeval_driver.py JOB.json

Standard library + VLMEvalKit only: this file must not import gndpo (the harness's virtualenv does not have it),
and gndpo imports it only for :func:`strip_think`, :func:`read_headline`, :func:`scrubbed` and :func:`judge_alias`,
which need nothing else. The job file (written by :mod:`gndpo.eval.harness`) names the datasets, the
OpenAI-compatible model endpoint, the decoding, the judge, and the JSON-lines file to which one result per dataset
is appended as soon as it is scored. API keys come from the environment (``GNDPO_EVAL_MODEL_KEY``,
``GNDPO_EVAL_JUDGE_KEY``), never from the job file.

For each dataset: the local TSV's MD5 is compared with VLMEvalKit's; a differing file (a fixture, a subset) is used
as it is and reported ``"data": "unofficial"`` rather than re-downloaded. Predictions are made through
``vlmeval.api.GPT4V`` (resumable: VLMEvalKit keeps finished items), ``<think>...</think>`` is stripped from every
prediction (a response cut off inside its thinking has no answer), the harness's judge-stage caches are removed
(they would otherwise be reused even when predictions changed), and ``dataset.evaluate`` scores them. Items the
server failed to answer stop the dataset with an error instead of counting as wrong.

The judge is gndpo's, not whatever VLMEvalKit would build: every scorer's ``build_judge`` is replaced (see
:func:`install_judge`). With a judge, each scorer gets a client for exactly the configured model and endpoint whose
every call is counted; a call that fails (VLMEvalKit's scorers then quietly fall back to exact matching, pick a
random option, or count the item wrong) fails the dataset with the count instead of a score. Without one, each
scorer that asks for a judge gets a client that refuses without any network call (the answers it cannot parse
count as unparsed; the result is rule-only). Either way credentials and endpoints the environment holds
(``OPENAI_API_KEY``, ``OPENAI_API_BASE``, ...) are removed first, so nothing reaches a third party unasked. The
judge's name only names files through a path-safe alias (a name such as ``Qwen/Qwen2.5-72B-Instruct`` would
otherwise become a directory).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import sys
import threading
import time

FAILED = "Failed to obtain answer via API"
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)


# environment variables that hold credentials or API endpoints: never inherited by the harness (VLMEvalKit reads
# OPENAI_API_KEY / OPENAI_API_BASE, LOCAL_LLM, BOYUE_*, provider keys...)
_SECRET_NAME = re.compile(r"(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD|API_BASE|BASE_URL|ENDPOINT)(_|$)|^(OPENAI|AZURE)"
                          r"|^(LOCAL_LLM|BOYUE)$", re.IGNORECASE)


def scrubbed(env: dict) -> dict:
    """``env`` without the variables that hold credentials or endpoints."""
    return {k: v for k, v in env.items() if not _SECRET_NAME.search(k)}


def judge_alias(model: str) -> str:
    """The judge's name as VLMEvalKit may use it in file names: no path separators or other odd characters."""
    alias = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-.") or "judge"
    return "judge-exact_matching" if alias == "exact_matching" else alias


class JudgeLedger:
    """Judge calls of the dataset being scored (the scorers call from threads)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.built = self.calls = self.failed = self.refused = 0
        self.first_failure = None

    def record(self, answer) -> None:
        text = answer.get("prediction") if isinstance(answer, dict) else answer
        bad = not isinstance(text, str) or not text.strip() or FAILED in text
        with self.lock:
            self.calls += 1
            if bad:
                self.failed += 1
                self.first_failure = self.first_failure or " ".join(str(text).split())[:200]


LEDGER = JudgeLedger()


def install_judge(judge: dict | None, key: str) -> None:
    """Replace VLMEvalKit's ``build_judge`` everywhere it was imported: a counted client of exactly ``judge``
    (``{"model", "api_base"}``), or with None one that refuses every call."""
    import vlmeval.dataset  # noqa: F401 - loads the scorer modules, which import build_judge by name
    from vlmeval.api import OpenAIWrapper
    from vlmeval.api.base import BaseAPI
    from vlmeval.dataset.utils import judge_util

    class RefusingJudge(BaseAPI):
        """No judge configured: answers every request with VLMEvalKit's failure message, sends nothing."""

        def __init__(self, **kwargs):
            super().__init__(retry=1, wait=0, verbose=False, system_prompt=kwargs.get("system_prompt"))
            self.model, self.fail_msg = "none", FAILED + " (gndpo: no judge, --judge none)"

        def generate_inner(self, inputs, **kwargs):
            return -1, self.fail_msg, "refused"

        def generate(self, message, **kwargs):
            with LEDGER.lock:
                LEDGER.refused += 1
            return self.fail_msg

    def build_judge(**kwargs):
        for name in ("model", "nproc", "api_base", "key"):
            kwargs.pop(name, None)
        with LEDGER.lock:
            LEDGER.built += 1
        if judge is None:
            return RefusingJudge(**kwargs)
        client = OpenAIWrapper(judge["model"], api_base=judge["api_base"], key=key, **kwargs)
        client.api_base, client.key = judge["api_base"], key  # whatever the model's name suggests to VLMEvalKit
        real = client.generate

        def generate(message, **kw):  # BaseAPI.working() calls self.generate: counted too
            answer = real(message, **kw)
            LEDGER.record(answer)
            return answer

        client.generate = generate
        return client

    original = judge_util.build_judge
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "") or "").startswith("vlmeval") and \
                getattr(module, "build_judge", None) is original:
            module.build_judge = build_judge


# the harness's own failures a user can meet, explained
KNOWN_FAILURES = {
    ("WeMath", "ZeroDivisionError"): "VLMEvalKit's WeMath scorer divides by the number of problems whose final "
                                     "multi-step question was answered right, and none was: it gives no score",
}


class JudgeFailed(RuntimeError):
    """The judge failed on some calls: the dataset gets no score (VLMEvalKit would have scored it without them)."""

    def __init__(self, failed: int, calls: int, api_base: str, first: str | None):
        super().__init__(f"the judge failed {failed} of {calls} calls (first: {first or 'no answer'}); no score is "
                         f"stored for this benchmark: check the judge at {api_base}, then run the same command again "
                         f"to retry it")
        self.failed, self.calls = failed, calls


def strip_think(text: str) -> str:
    """The answer part of a reasoning response: the text after the last ``</think>``; ``""`` when a ``<think>`` was
    opened and never closed (cut off before answering); the text unchanged when it has no think block."""
    text = "" if text is None else str(text)
    parts = _THINK_CLOSE.split(text)
    if len(parts) > 1:
        return parts[-1].strip()
    if "<think>" in text.lower():
        return ""
    return text


def read_headline(path: str, row: list | None, column: str, scale: str) -> float:
    """The headline number of a harness score CSV, as a percentage."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{os.path.basename(path)} is empty")
    if row is None:
        chosen = rows[0]
    else:
        matches = [r for r in rows if str(r.get(row[0], "")).strip() == row[1]]
        if not matches:
            raise ValueError(f"{os.path.basename(path)} has no row {row[0]} == {row[1]!r}")
        chosen = matches[0]
    if column not in chosen:
        raise ValueError(f"{os.path.basename(path)} has no column {column!r}")
    raw = str(chosen[column]).strip()
    if scale == "percent-string":
        return float(raw.rstrip("%"))
    value = float(raw)
    return 100.0 * value if scale == "fraction" else value


def _text(value) -> str:
    """A prediction cell as text (an empty TSV cell reads back as NaN)."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dataset_class(name: str):
    from vlmeval.dataset import DATASET_CLASSES

    for cls in DATASET_CLASSES:
        if name in getattr(cls, "supported_datasets", lambda: [])():
            return cls
    raise ValueError(f"VLMEvalKit has no dataset {name!r}")


def _prepare_data(name: str, data_dir: str) -> str:
    """'official' (MD5 matches), 'unofficial' (a local file with another MD5: used as is) or 'download'."""
    path = os.path.join(data_dir, f"{name}.tsv")
    if not os.path.exists(path):
        return "download"
    cls = _dataset_class(name)
    official = getattr(cls, "DATASET_MD5", {}).get(name)
    if official is None or _md5(path) == official:
        return "official"
    cls.DATASET_MD5 = {k: v for k, v in cls.DATASET_MD5.items() if k != name}  # no re-download over local data
    return "unofficial"


def _clear_judge_stage(work_dir: str, model_name: str, name: str, keep: str) -> None:
    """Remove the harness's judge-stage files of this dataset (it reuses any that exist, even for new predictions)."""
    prefix = os.path.join(work_dir, f"{model_name}_{name}_")
    for path in glob.glob(glob.escape(prefix) + "*"):
        if os.path.abspath(path) != os.path.abspath(keep) and not path.endswith(("_checkpoint.pkl", "_PREV.pkl")):
            os.remove(path)


def run_dataset(job: dict, spec: dict, model) -> dict:
    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job
    from vlmeval.smp import dump, get_pred_file_path, load

    name, work_dir, model_name = spec["dataset"], job["work_dir"], job["model_name"]
    start = time.time()
    data = _prepare_data(name, job["data_dir"])
    dataset = build_dataset(name)
    if dataset is None:
        raise RuntimeError(f"VLMEvalKit could not build {name} from {job['data_dir']}")
    with open(job["result_file"], "a", encoding="utf-8") as f:  # gndpo shows what is running
        f.write(json.dumps({"dataset": name, "started": True, "n_items": len(dataset.data)}) + "\n")
    infer_data_job(model, work_dir=work_dir, model_name=model_name, dataset=dataset, api_nproc=job["api_nproc"],
                   retry_failed=True)
    pred_file = get_pred_file_path(work_dir, model_name, name)
    preds = load(pred_file)
    texts = [_text(p) for p in preds["prediction"]]
    failed = sum(FAILED in t for t in texts)
    if failed:
        raise RuntimeError(f"{failed} of {len(texts)} requests to the model server failed (HTTP 400 in the log "
                           f"usually means prompt + --max-new-tokens exceed the server's --max-model-len); run the "
                           f"same command again to retry only those")
    if "raw_prediction" not in preds:
        preds["raw_prediction"] = texts
    preds["prediction"] = [strip_think(_text(t)) for t in preds["raw_prediction"]]
    dump(preds, pred_file)
    _clear_judge_stage(work_dir, model_name, name, keep=pred_file)

    judge = job.get("judge")
    kwargs = {"nproc": job["judge_nproc"], "retry": 3, "verbose": False}
    if judge:  # the client itself comes from install_judge: the real name, endpoint and key
        kwargs.update(model=judge_alias(judge["model"]), timeout=judge.get("timeout", 300))
    else:
        kwargs.update(model="exact_matching")
    t_eval = time.time()
    LEDGER.reset()
    try:
        dataset.evaluate(pred_file, **kwargs)
    except Exception:
        if judge and LEDGER.failed:  # e.g. LogicVista asserts judge.working(): the judge is the cause
            raise JudgeFailed(LEDGER.failed, LEDGER.calls, judge["api_base"], LEDGER.first_failure) from None
        raise
    if judge and LEDGER.failed:
        raise JudgeFailed(LEDGER.failed, LEDGER.calls, judge["api_base"], LEDGER.first_failure)
    pattern = os.path.join(glob.escape(work_dir), spec["score_glob"].format(m=glob.escape(model_name), d=name))
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise RuntimeError(f"the harness wrote no score file ({os.path.basename(pattern)}) for {name}")
    score = read_headline(found[-1], spec["row"], spec["value_column"], spec["scale"])
    # rule-only whatever the reason: no judge configured, or a scorer that never asked for one
    return {"dataset": name, "score": score, "n_items": len(texts), "data": data,
            "rule_only": not judge or LEDGER.built == 0, "judge_calls": LEDGER.calls,
            "unparsed_without_judge": LEDGER.refused,
            "score_file": os.path.relpath(found[-1], work_dir), "predictions": os.path.relpath(pred_file, work_dir),
            "truncated_in_think": sum(strip_think(t) == "" and "<think>" in t.lower() for t in texts),
            "infer_seconds": round(t_eval - start, 1), "eval_seconds": round(time.time() - t_eval, 1)}


def _scrub_environment(judge: dict | None, judge_key: str) -> None:
    """Remove credentials and endpoints from this process's environment (again after VLMEvalKit's import, which
    loads a ``.env`` file beside the package when there is one); with a judge, the OpenAI variables name it."""
    for name in [k for k in os.environ if _SECRET_NAME.search(k)]:
        del os.environ[name]
    if judge:
        os.environ.update(OPENAI_API_KEY=judge_key, OPENAI_API_BASE=judge["api_base"])


def main(argv: list[str]) -> int:
    job = json.load(open(argv[0], encoding="utf-8"))
    model_key = os.environ.get("GNDPO_EVAL_MODEL_KEY", "EMPTY")
    judge, judge_key = job.get("judge"), os.environ.get("GNDPO_EVAL_JUDGE_KEY", "EMPTY")
    _scrub_environment(judge, judge_key)
    os.environ["LMUData"] = job["data_dir"]
    os.environ["PRED_FORMAT"] = "tsv"  # xlsx cells stop at 32,767 characters: reasoning outputs are longer
    os.environ.setdefault("EVAL_FORMAT", "csv")
    os.makedirs(job["work_dir"], exist_ok=True)
    from vlmeval.api import GPT4V

    _scrub_environment(judge, judge_key)
    install_judge(judge, judge_key)
    d = job["decoding"]
    model = GPT4V(model=job["served_model"], api_base=job["api_base"], key=model_key,
                  temperature=d["temperature"], max_tokens=d["max_new_tokens"], top_p=d["top_p"],
                  seed=d["seed"], timeout=job["timeout"], retry=job["retry"], verbose=False)
    model.api_base, model.key = job["api_base"], model_key  # whatever the served name suggests to VLMEvalKit
    for spec in job["benchmarks"]:
        try:
            result = run_dataset(job, spec, model)
        except Exception as exc:  # one line back to gndpo; the traceback stays in the log
            import traceback

            traceback.print_exc()
            message = KNOWN_FAILURES.get((spec["dataset"], type(exc).__name__))
            if isinstance(exc, JudgeFailed):
                message = str(exc)
            elif message is None:
                message = f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no message'}"
            result = {"dataset": spec["dataset"], "error": message}
            if isinstance(exc, JudgeFailed):
                result.update(judge_failed=exc.failed, judge_calls=exc.calls)
        with open(job["result_file"], "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        if "error" in result:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
