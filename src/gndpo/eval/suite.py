"""``gndpo eval MODEL [MODEL ...] --suite paper``: the paper's Table 1 for any checkpoint, on VLMEvalKit.

For each model whose table cells are not yet scored: its checkpoint is served by vLLM's OpenAI-compatible server
on loopback (or a running server is used, ``--base-url``), the harness (its own virtualenv) runs the benchmarks
against it with Table 3's decoding and scores them with the judge, and each finished benchmark is written to
``eval.json`` / ``eval.md`` at once, so a failure later keeps it and a rerun resumes after it.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gndpo.errors import ConfigError, GndpoError
from gndpo.eval import harness as harness_mod
from gndpo.eval import report
from gndpo.eval.benchmarks import HARNESS, Benchmark
from gndpo.eval.native import evaluate_records
from gndpo.eval.server import SERVED_NAME, VLLMServer, check_endpoint, context_length

MODEL_KEY_ENV = "GNDPO_EVAL_API_KEY"      # key of a --base-url server
JUDGE_KEY_ENV = "GNDPO_JUDGE_API_KEY"     # key of the judge endpoint (default; --judge-key-env names another)


@dataclass(frozen=True)
class ModelSpec:
    label: str  # the table row
    path: str   # checkpoint directory, or with --base-url the name the server serves


@dataclass(frozen=True)
class Judge:
    model: str
    base_url: str
    key_env: str = JUDGE_KEY_ENV


def parse_models(args: list[str]) -> list[ModelSpec]:
    """``PATH`` or ``LABEL=PATH``; the label of a run's checkpoint ``RUN/checkpoints/step-N`` is ``RUN/step-N``."""
    specs = []
    for arg in args:
        label, sep, path = arg.partition("=")
        if not sep:
            label, path = _label(arg), arg
        if not label or not path:
            raise ConfigError(f"model {arg!r}: use PATH or LABEL=PATH")
        specs.append(ModelSpec(label, path))
    labels = [s.label for s in specs]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup:
        raise ConfigError(f"two models share the label {dup!r}; name them LABEL=PATH")
    return specs


def _label(path: str) -> str:
    parts = Path(path.rstrip("/")).parts
    if len(parts) >= 3 and re.fullmatch(r"step-\d+(-merged)?", parts[-1]) and parts[-2] in ("checkpoints", "export"):
        return f"{parts[-3]}/{parts[-1]}"
    return parts[-1] if parts else path


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "model"


def default_data_dir() -> Path:
    return Path(os.environ.get("LMUData") or Path.home() / "LMUData")


def load_native(b: Benchmark, data_dir: Path) -> tuple[str, list]:
    """A gndpo-scored benchmark's records: ``DATA_DIR/<name>`` when it exists, else the hub's copy."""
    from gndpo.data.geometry3k import GEOMETRY3K_ID, load_geometry3k

    local = data_dir / b.dataset
    source = str(local) if local.exists() else GEOMETRY3K_ID
    return ("official" if source == GEOMETRY3K_ID else "local"), load_geometry3k(source, split="test")


def run_suite(models: list[ModelSpec], benchmarks: list[Benchmark], *, out: Path, data_dir: Path,
              decoding: dict, judge: Judge | None, base_url: str | None = None, max_model_len: int | None = None,
              dtype: str = "auto", vllm_args: tuple[str, ...] = (), timeout: int = 3600, api_nproc: int = 8,
              judge_nproc: int = 4,
              compare: tuple[str, str] | None = None, log: Callable[[str], None] = print) -> dict:
    out, data_dir = Path(out), Path(data_dir)
    # everything a user can get wrong is checked before a server starts
    if base_url is not None and len(models) != 1:
        raise ConfigError("--base-url serves one model: pass exactly one MODEL (the name the server serves)")
    if base_url is None:
        for m in models:
            local = Path(m.path).expanduser()
            hub_id = not local.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", m.path) is not None
            if not hub_id and not (local / "config.json").is_file():
                raise ConfigError(f"model {m.path!r} is not a model directory (no config.json) nor a hub id; pass "
                                  f"a checkpoint directory, e.g. RUN/checkpoints/step-000065")
        for m in models:
            if (Path(m.path).expanduser() / "config.json").is_file():  # the new tokens fit, or one line
                context_length(str(Path(m.path).expanduser()), decoding["max_new_tokens"], max_model_len)
    if compare is not None:
        missing = [name for name in compare if name not in {m.label for m in models}]
        if missing:
            raise ConfigError(f"--compare names {', '.join(missing)}, which is not among the models "
                              f"({', '.join(m.label for m in models)})")
    runnable = [b for b in benchmarks if judge is not None or b.judge != "required"]
    native = {b.key: load_native(b, data_dir) for b in runnable if b.runner == "gndpo"}  # (provenance, records)
    for b in (b for b in runnable if b.runner == "vlmeval"):
        if not (data_dir / f"{b.dataset}.tsv").is_file():
            raise ConfigError(f"{data_dir / (b.dataset + '.tsv')} not found: put VLMEvalKit's {b.dataset}.tsv there "
                              f"(docs/EVAL.md says where to get it) or point --data-dir at the directory holding it")
    if judge is not None:
        check_endpoint("the judge", judge.base_url, os.environ.get(judge.key_env), judge.model)
    if base_url is not None:
        check_endpoint("the model server", base_url, os.environ.get(MODEL_KEY_ENV), models[0].path)

    python = None
    if any(b.runner == "vlmeval" for b in runnable):  # the table records the version actually installed
        python = harness_mod.ensure_harness(log)
        harness = dict(HARNESS, version=harness_mod.harness_version(python))
    else:
        harness = None
    state = report.load_state(out)
    report.check_settings(state, {"harness": harness, "decoding": decoding,
                                  "judge": None if judge is None else {"model": judge.model,
                                                                       "base_url": judge.base_url}}, out)
    chosen = {b.key for b in benchmarks} | set(state.get("benchmarks", []))
    state["benchmarks"] = [k for k in report.BY_KEY if k in chosen]
    if compare is not None:
        state["compare"] = list(compare)
    for m in models:
        entry = state["models"].setdefault(m.label, {"path": m.path, "results": {}})
        results = entry["results"]
        for b in benchmarks:
            if b.judge == "required" and judge is None and b.key not in results:
                results[b.key] = {"refused": True, "reason": "needs an LLM judge"}
        todo = [b for b in runnable if results.get(b.key, {}).get("score") is None]
        report.save_state(out, state)
        if not todo:
            log(f"{m.label}: {len(benchmarks)} benchmark(s) already scored in {out / 'eval.json'}")
            continue
        harness_todo = [b for b in todo if b.runner == "vlmeval"]
        work = out / "items" / safe_name(m.label)
        log_file = out / "logs" / f"{safe_name(m.label)}.log"
        job = {"work_dir": str(work.resolve()), "data_dir": str(data_dir.resolve()), "model_name": safe_name(m.label),
               "decoding": decoding, "timeout": timeout, "retry": 3, "api_nproc": api_nproc,
               "judge_nproc": judge_nproc, "result_file": str((out / "logs" / f"{safe_name(m.label)}.results.jsonl")
                                                              .resolve()),
               "judge": None if judge is None else {"model": judge.model,
                                                    "api_base": judge.base_url.rstrip("/") + "/chat/completions"},
               "benchmarks": [{"key": b.key, "dataset": b.dataset, "score_glob": b.score_glob,
                               "row": list(b.row) if b.row else None, "value_column": b.value_column,
                               "scale": b.scale} for b in harness_todo]}
        env = {"GNDPO_EVAL_JUDGE_KEY": os.environ.get(judge.key_env, "EMPTY")} if judge else {}
        t0 = time.perf_counter()

        def record(result: dict, *, label=m.label, results=results, todo=todo, t0=t0) -> None:
            key = next(b.key for b in todo if b.dataset == result["dataset"])
            if result.get("started"):
                log(f"{label}: {result['dataset']}: {result['n_items']} items, running "
                    f"({time.perf_counter() - t0:.0f} s so far)")
                return
            if "error" in result:
                if "judge_failed" in result:  # stored as failed, never as a score; a rerun retries it
                    results[key] = {"failed": result["error"], "judge_failed": result["judge_failed"],
                                    "judge_calls": result["judge_calls"]}
                    report.save_state(out, state)
                return
            results[key] = {k: v for k, v in result.items() if k != "dataset"}
            report.save_state(out, state)
            done = sum(1 for b in todo if results.get(b.key, {}).get("score") is not None)
            log(f"{label}: [{done}/{len(todo)}] {result['dataset']}: {result['score']:.1f} "
                f"({result['n_items']} items, {time.perf_counter() - t0:.0f} s)"
                + (" rule-only" if result.get("rule_only") else ""))

        def score(api_base: str, key: str, served_name: str, *, todo=todo, job=job, env=env, work=work,
                  log_file=log_file, record=record) -> list[dict]:
            outcome = []
            if job["benchmarks"]:
                job.update(served_model=served_name, api_base=api_base)
                outcome = harness_mod.run_job(python, job, log_file=log_file, env=dict(env, GNDPO_EVAL_MODEL_KEY=key),
                                              on_result=record)
            for b in (b for b in todo if b.runner == "gndpo"):
                if any("error" in r for r in outcome):
                    break
                start = time.perf_counter()
                try:
                    result = evaluate_records(native[b.key][1], api_base=api_base, key=key, model=served_name,
                                              decoding=decoding, items_file=work / f"{b.dataset}.jsonl",
                                              nproc=api_nproc, timeout=timeout, log=log)
                except GndpoError as exc:
                    outcome.append({"dataset": b.dataset, "error": str(exc)})
                    break
                result.update(dataset=b.dataset, data=native[b.key][0],
                              infer_seconds=round(time.perf_counter() - start, 1))
                record(result)
                outcome.append(result)
            return outcome

        if base_url is not None:
            outcome = score(base_url.rstrip("/") + "/chat/completions", os.environ.get(MODEL_KEY_ENV, "EMPTY"),
                            m.path)
        else:
            from gndpo.vllm_engine import local_model_dir, vllm_readable

            local = str(local_model_dir(m.path))  # a hub id: its cached (or downloaded) snapshot
            served = vllm_readable(local, out / "served" / safe_name(m.label))
            length = context_length(local, decoding["max_new_tokens"], max_model_len)
            log(f"{m.label}: serving {m.path} with vLLM on loopback (max-model-len {length}); log {log_file}")
            with VLLMServer(served, max_model_len=length, log_file=log_file, seed=decoding["seed"],
                            dtype=dtype, extra_args=vllm_args) as server:
                outcome = score(server.base_url + "/chat/completions", server.key, SERVED_NAME)
        failed = next((r for r in outcome if "error" in r), None)
        if failed is not None:
            report.save_state(out, state)
            raise GndpoError(f"{m.label}: {failed['dataset']}: {failed['error']} (log: {log_file}; finished "
                             f"benchmarks are kept in {out / 'eval.json'})")
    report.save_state(out, state)
    return state
