"""Engine settings chosen from the config without starting an engine (vLLM need not be installed)."""
from importlib.resources import files

import pytest

from gndpo.backends import engine_options
from gndpo.config import load_config
from gndpo.dist import DistContext
from gndpo.errors import ConfigError
from gndpo.models import load_processor

STUDENT = str(files("gndpo") / "lab" / "assets" / "student")


def options(*extra, dist=None, section="rollout.vllm"):
    cfg = load_config(None, [f"model.path={STUDENT}", f"teacher.path={STUDENT}", "data.train=d", *extra])
    v = cfg.rollout.vllm if section == "rollout.vllm" else cfg.teacher.vllm
    return engine_options(cfg, v, load_processor(STUDENT), path=STUDENT, trust_remote_code=False, dtype="bfloat16",
                          device="cpu", records=[], extra_tokens=0, dist=dist, section=section)


def test_one_engine_per_torchrun_rank():
    assert options().data_parallel == 1  # one process: vLLM's own executor
    assert options(dist=DistContext(rank=1, world_size=4, local_rank=1)).data_parallel == 4  # external_launcher
    assert options().dtype == "bfloat16"


def test_tensor_parallel_engines_under_torchrun_are_refused_in_one_line():
    two = DistContext(rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"^teacher.vllm.tensor_parallel_size=2 under torchrun: each rank runs its "
                                          r"own engine .*; set teacher.vllm.tensor_parallel_size=1"):
        options("teacher.vllm.tensor_parallel_size=2", dist=two, section="teacher.vllm")
    assert options("rollout.vllm.tensor_parallel_size=2").tensor_parallel_size == 2  # one process: vLLM's TP
