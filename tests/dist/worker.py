"""Run under torchrun by tests/dist/test_dist.py: the trainings of a JSON spec, in this process group.

spec = {"runs": [{"overrides": [...], "advantages": "DIR" | null}], "hash_reward": bool,
        "fail": {"rank": R, "step": S} | null, "cli": bool, "engines": "DIR" | null}

Each rank writes the advantages of every step to DIR/rank{r}-step{s}.pt (with the prompt ids they answer), so the
test can compare them with a single process's. "fail" makes rank R raise a user error at step S, through the
CLI, as any rank would. "engines" makes each rank write where its vLLM engines run to DIR/rank{r}.jsonl.
"""
import json
import zlib
import sys

import torch

import gndpo.train
from gndpo.config import load_config
from gndpo.dist import init_from_env, shutdown
from gndpo.errors import DataError


def main(spec_path: str) -> int:
    spec = json.load(open(spec_path))
    if spec.get("hash_reward"):  # a 0/1 outcome (a stable hash of the text) that varies within groups: GSPO learns
        gndpo.train.get_reward = lambda name: (
            lambda texts, answers: [float(zlib.crc32(t.encode()) % 2) for t in texts])
    fail = spec.get("fail")
    if fail:
        real = gndpo.train.compute_step_advantages
        calls = []

        def faulty(cfg, rollouts, *args):
            calls.append(1)
            if dist.rank == fail["rank"] and len(calls) == fail["step"]:
                raise DataError(f"injected fault on rank {dist.rank} at step {len(calls)}")
            return real(cfg, rollouts, *args)

        gndpo.train.compute_step_advantages = faulty
    if spec.get("cli"):
        from gndpo.cli import main as cli_main

        dist = init_from_env(30.0)
        return cli_main(["train", *spec["runs"][0]["overrides"]])
    dist = init_from_env(60.0)
    if spec.get("engines"):  # record how each rank's vLLM engines were placed
        import gndpo.vllm_engine as engine

        real_start = engine.start_engine

        def start_engine(path, options, **kwargs):
            llm, loaded = real_start(path, options, **kwargs)
            config = llm.llm_engine.vllm_config
            with open(f"{spec['engines']}/rank{dist.rank}.jsonl", "a") as f:
                f.write(json.dumps({"rank": dist.rank, "path": str(path),
                                    "backend": config.parallel_config.distributed_executor_backend,
                                    "dp_rank": config.parallel_config.data_parallel_rank,
                                    "dp_size": config.parallel_config.data_parallel_size,
                                    "world_size": config.parallel_config.world_size,
                                    "device": str(config.device_config.device)}) + "\n")
            return llm, loaded

        engine.start_engine = start_engine
    try:
        for run in spec["runs"]:
            out = run.get("advantages")

            def dump(rec, out=out):
                if out:
                    ids = [rec.rollouts.records[int(i)].id for i in rec.rollouts.prompt_index]
                    torch.save({"advantages": rec.advantages, "mask": rec.rollouts.response_mask, "ids": ids,
                                "responses": rec.rollouts.response_ids, "old_logprobs": rec.old_logprobs},
                               f"{out}/rank{dist.rank}-step{rec.step}.pt")

            gndpo.train.train(load_config(None, run["overrides"]), dist=dist, callbacks=[dump])
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
