"""``gndpo eval MODEL DATA --engine vllm``: greedy answers identical to gndpo's HF loop, and Table 3's sampling
with K samples. Run as subprocesses: vLLM engines in one process must start and end together."""
import json
import os
import subprocess
import sys
from importlib.resources import files

ASSETS = files("gndpo") / "lab" / "assets"


def run_eval(tmp_path, name, *args):
    out = tmp_path / f"{name}.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "gndpo.cli", "eval", str(ASSETS / "student"),
                             str(tmp_path / "task" / "test.jsonl"), "--max-new-tokens", "48", "--out", str(out), *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1], [json.loads(line) for line in out.read_text().splitlines()]


def test_vllm_engine_greedy_equals_the_hf_loop_and_samples_k(tmp_path):
    from gndpo.lab.task import write_task

    write_task(tmp_path / "task", n_train=4, n_test=6)
    line_v, rows_v = run_eval(tmp_path, "vllm", "--engine", "vllm")
    line_h, rows_h = run_eval(tmp_path, "hf", "--engine", "hf")
    assert [r["response"] for r in rows_v] == [r["response"] for r in rows_h]
    assert "engine vllm" in line_v and line_v.split(";")[0] == line_h.split(";")[0]  # same accuracy line
    line, rows = run_eval(tmp_path, "sampled", "--engine", "vllm", "--temperature", "0.6", "--top-p", "0.95",
                          "--samples", "3")
    assert "mean@3 " in line and "pass@3 " in line and all(len(r["response"]) == 3 for r in rows)
