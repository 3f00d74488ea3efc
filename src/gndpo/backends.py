"""Which sampler and which teacher a run uses (``rollout.backend``, ``teacher.backend``), built from the config.

The loop sees only the protocols (:class:`gndpo.rollout.base.RolloutBackend`, :class:`gndpo.teacher.base.Teacher`);
the vLLM and server backends are imported here only when configured, so a plain install never imports vLLM.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Sequence

import torch

from gndpo.config import DISTILLATION_ESTIMATORS, RunConfig, TeacherConfig, teacher_sections
from gndpo.forward import rollout_logprobs
from gndpo.models import (check_compatible, configure_images, context_limit, dtype_name, load_config, load_model,
                          load_processor, resolve_dtype, student_dtypes)


def build_rollout(cfg: RunConfig, model, processor, *, suffix: str | None, records: Sequence, device, scorer=None,
                  dist=None):
    """The student's sampler. ``records``: the training prompts (the vLLM engine sizes its image limit on them);
    ``scorer``: the ResponseScorer around ``model``, FSDP2's root when sharded (the HF sampler then decodes with
    the full weights gathered once per rollout, not once per token)."""
    r = cfg.rollout
    if r.backend == "hf":
        from gndpo.dist import fsdp_units, gathered
        from gndpo.rollout.hf import HFRollout

        context = None
        if scorer is not None and fsdp_units(scorer):  # gathered in the compute dtype by FSDP2's policy
            context = lambda: gathered(scorer)  # noqa: E731
        elif scorer is not None:
            context = scorer.compute
        return HFRollout(model, processor, suffix=suffix, system_prompt=cfg.data.system_prompt,
                         micro_batch_size=r.micro_batch_size, engine=r.engine, context=context)
    from gndpo.rollout.vllm import VLLMRollout

    def trainer_logprobs(rollouts):  # the sync check's reference: the trainer's model at temperature 1
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return rollout_logprobs(scorer if scorer is not None else model, processor, rollouts,
                                        micro_batch_size=cfg.trainer.micro_batch_size,
                                        suffix=suffix, system_prompt=cfg.data.system_prompt, temperature=1.0)
        finally:
            model.train(was_training)

    # the engine runs in the student's compute dtype; pushes convert the (float32) masters to it
    _, compute = student_dtypes(cfg.model.dtype, cfg.model.compute_dtype, device, lora=cfg.model.lora.rank > 0)
    options = engine_options(cfg, r.vllm, processor, path=cfg.model.path, trust_remote_code=cfg.model.trust_remote_code,
                             dtype=dtype_name(compute), device=device, records=records, extra_tokens=0, dist=dist,
                             section="rollout.vllm")
    # vLLM's sleep mode works through one allocator per process: a sleeping sampler would free an in-process vLLM
    # teacher's memory too, so it stays awake beside one
    options = replace(options, sleep=r.vllm.sleep and all(te.backend != "vllm" for _, te in teacher_sections(cfg)))
    return VLLMRollout(model, processor, path=cfg.model.path, options=options, suffix=suffix,
                       system_prompt=cfg.data.system_prompt, score_fn=trainer_logprobs,
                       check_every=r.sync_check_every, check_responses=r.sync_check_responses,
                       tolerance=r.sync_tolerance)


def check_teacher_records(cfg: RunConfig, records: Sequence) -> None:
    """Before any model loads: every context template's fields exist in every record, and every record names a
    teacher of the ``teachers:`` list (one-line DataErrors)."""
    from gndpo.teacher import composite, context

    if cfg.algorithm.advantage not in DISTILLATION_ESTIMATORS:
        return
    for where, te in teacher_sections(cfg):
        if te.context is not None:
            context.check_records(te.context, records, where=f"{where}.context")
    if cfg.teachers:
        composite.check_routes(records, _router(cfg))


def _router(cfg: RunConfig):
    from gndpo.teacher.composite import router

    return router([e.name for e in cfg.teachers], cfg.data.teacher_key, cfg.data.default_teacher)


def build_teacher(cfg: RunConfig, student_processor, *, suffix: str | None, records: Sequence, device, images: dict,
                  dist=None, scorer=None):
    """The teacher that scores the student's tokens, after checking it tokenizes as the student does; with a
    ``teachers:`` list, one :class:`gndpo.teacher.composite.RoutedTeacher` over all of them. Under torchrun each
    rank scores its own share: with a full copy of an hf teacher, or its shard (``dist.shard_teacher``).
    ``scorer``: the student's ResponseScorer, the weights of a ``path=self`` teacher with ``self_weights=current``."""
    topk = cfg.algorithm.topk if cfg.algorithm.distill == "topk" else 0  # the teacher's top-k at every position
    kwargs = dict(suffix=suffix, records=records, device=device, images=images, dist=dist, scorer=scorer, topk=topk)
    if not cfg.teachers:
        return _build_one(cfg, cfg.teacher, student_processor, **kwargs)
    from gndpo.teacher.composite import RoutedTeacher

    members = []
    try:
        for entry in cfg.teachers:
            members.append((entry.name, _build_one(cfg, entry, student_processor, **kwargs)))
    except BaseException:  # the teachers built so far (an engine, a model) go with the run that failed
        RoutedTeacher(members, _router(cfg)).close()
        raise
    return RoutedTeacher(members, _router(cfg), topk=topk)


def _build_one(cfg: RunConfig, te: TeacherConfig, student_processor, *, suffix, records, device, images, dist, scorer,
               topk: int):
    """One teacher section: the model (or the student itself, ``path=self``), its privileged context around it."""
    if te.path == "self":
        teacher = _self_teacher(cfg, te, student_processor, suffix=suffix, records=records, device=device,
                                images=images, dist=dist, scorer=scorer, topk=topk)
    else:
        teacher = _model_teacher(cfg, te, student_processor, suffix=suffix, records=records, device=device,
                                 images=images, dist=dist, topk=topk)
    if te.context is None:
        return teacher
    from gndpo.teacher.context import ContextTeacher

    return ContextTeacher(teacher, te.context, te.context_at)


def _self_teacher(cfg: RunConfig, te: TeacherConfig, student_processor, *, suffix, records, device, images, dist,
                  scorer, topk: int):
    """``teacher.path=self``: the live student through its scorer (``current``), or a frozen copy of its starting
    weights (``initial``, model.path in teacher.dtype) on the configured backend."""
    if te.self_weights == "initial":
        m = cfg.model
        start = replace(te, path=m.path, trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle,
                        check_compatibility=False)  # the student's own tokenizer
        return _model_teacher(cfg, start, student_processor, suffix=suffix, records=records, device=device,
                              images=images, dist=dist, topk=topk)
    from gndpo.dist import fsdp_units, gathered
    from gndpo.teacher.self import StudentTeacher

    if scorer is None:
        raise ValueError("teacher.path=self with self_weights=current needs the student's scorer")
    sharded = bool(fsdp_units(scorer))  # whole weights gathered once per score call, in the compute dtype
    return StudentTeacher(scorer, student_processor, suffix=suffix, system_prompt=cfg.data.system_prompt,
                          micro_batch_size=te.micro_batch_size, topk=topk,
                          context=(lambda: gathered(scorer)) if sharded else None, collective=sharded)


def _model_teacher(cfg: RunConfig, te: TeacherConfig, student_processor, *, suffix, records, device, images, dist,
                   topk: int):
    if te.backend == "server":
        from gndpo.teacher.client import ServerTeacher

        teacher = ServerTeacher(te.url, api_key=os.environ.get(te.api_key_env) or None,
                                processor=student_processor, suffix=suffix, system_prompt=cfg.data.system_prompt,
                                micro_batch_size=te.micro_batch_size, timeout=te.timeout, retries=te.retries,
                                connect_timeout=te.connect_timeout, topk=topk)
        if te.check_compatibility:
            teacher.check_compatible(student_processor)
        return teacher
    if te.backend == "vllm":
        from gndpo.teacher.vllm import VLLMTeacher

        processor = load_processor(te.path, what="teacher", trust_remote_code=te.trust_remote_code)
        configure_images(processor, **images)
        if te.check_compatibility:
            check_compatible(student_processor, processor)
        options = engine_options(cfg, te.vllm, processor, path=te.path, trust_remote_code=te.trust_remote_code,
                                 dtype=te.dtype, device=device, records=records, dist=dist, section="teacher.vllm",
                                 extra_tokens=1 + context_tokens(te, processor, records, suffix=suffix,
                                                                 system_prompt=cfg.data.system_prompt))
        return VLLMTeacher(te.path, processor, options=options, suffix=suffix, system_prompt=cfg.data.system_prompt,
                           micro_batch_size=te.micro_batch_size, topk=topk)
    from gndpo.teacher.hf import HFTeacher

    loaded = load_model(te.path, what="teacher", dtype=te.dtype, device=device, trust_remote_code=te.trust_remote_code,
                        allow_pickle=te.allow_pickle)
    configure_images(loaded.processor, **images)  # the teacher sees the images as the student does
    if te.check_compatibility:
        check_compatible(student_processor, loaded.processor)
    model = loaded.model
    if dist is not None and dist.distributed and cfg.dist.shard_teacher:
        from gndpo.dist import apply_fsdp
        from gndpo.forward import ResponseScorer

        model.requires_grad_(False)
        model = ResponseScorer(model)
        apply_fsdp(model, loaded.model)
    return HFTeacher(model, loaded.processor, suffix=suffix, system_prompt=cfg.data.system_prompt,
                     micro_batch_size=te.micro_batch_size, topk=topk)


def context_tokens(te: TeacherConfig, processor, records: Sequence, *, suffix: str | None,
                   system_prompt: str | None) -> int:
    """The most tokens ``te.context`` adds to a training prompt (0 without one): a vLLM teacher's engine must take
    the longer prompts. Tokenizer only (one placeholder per image), no image processing."""
    if te.context is None or not records:
        return 0
    from gndpo.teacher.context import privileged
    from gndpo.vllm_engine import prompt_ids

    plain = prompt_ids(processor, records, suffix=suffix, system_prompt=system_prompt)
    rich = prompt_ids(processor, [privileged(r, te.context, te.context_at) for r in records], suffix=suffix,
                      system_prompt=system_prompt)
    return max(len(b) - len(a) for a, b in zip(plain, rich))


def engine_options(cfg: RunConfig, v, processor, *, path: str, trust_remote_code: bool, dtype: str, device,
                   records: Sequence, extra_tokens: int, dist=None, section: str = "rollout.vllm"):
    """vLLM engine settings: the run's dtype and lengths (up to the model's own limit), the most images one
    training prompt holds, the image settings ``processor`` was configured with, and under torchrun one engine
    per rank (``dist``)."""
    from gndpo.errors import ConfigError
    from gndpo.vllm_engine import EngineOptions, image_settings

    world = dist.world_size if dist is not None else 1
    if world > 1 and v.tensor_parallel_size > 1:
        # an engine spanning ranks would need every rank of its group to feed it the same prompts; gndpo's ranks
        # each sample their own share
        raise ConfigError(f"{section}.tensor_parallel_size={v.tensor_parallel_size} under torchrun: each rank runs "
                          f"its own engine on its own GPU; set {section}.tensor_parallel_size=1 (a model too big "
                          "for one GPU: serve it with gndpo serve-teacher, teacher.backend=server)")

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
        resolve_dtype(dtype, torch.device(device))]
    config = load_config(path, trust_remote_code=trust_remote_code)
    limit = context_limit(config)
    length = v.max_model_len or cfg.data.max_prompt_length + cfg.rollout.max_new_tokens + extra_tokens
    if limit and not v.max_model_len:
        length = min(length, limit)
    return EngineOptions(dtype=name, max_model_len=length, gpu_memory_utilization=v.gpu_memory_utilization,
                         enforce_eager=v.enforce_eager, tensor_parallel_size=v.tensor_parallel_size,
                         seed=cfg.trainer.seed, max_images=max((len(r.images) for r in records), default=0),
                         data_parallel=world,
                         processor_kwargs=image_settings(processor, max_tiles=cfg.data.max_image_tiles,
                                                         min_pixels=cfg.data.min_pixels,
                                                         max_pixels=cfg.data.max_pixels))
