"""What one lent GPU can check of the paper run, offline, in under 8 minutes: real shapes, the presets' precision,
FSDP2 on NCCL, the decode loop, the resource plan against the CUDA allocator, and the vLLM paths when vLLM imports.

    python benchmarks/gpu/paper_smoke.py                 # on a CUDA GPU
    python benchmarks/gpu/paper_smoke.py --cpu           # validates the script on a CPU (1 layer, float32 compute;
                                                         # CUDA rows skipped)

Models: InternVL3.5-1B's shapes (gndpo.lab.shapes: 151,936-token vocabulary, untied head, InternViT-300M on 448 px
tiles) with random weights as the student, and the same family (--teacher-size 1b, or 2b/8b) as the teacher, built
from config.json on the GPU; no hub. Checks, each a row of the table:

1. one process, the presets' precision (float32 masters, bf16 autocast, gradient checkpointing), the hf sampler's
   decode loop, two GNDPO steps at lr 1e-6: the checkpoint holds float32 masters that moved (>= 90 % of the
   weights that had a non-zero gradient: the embedding rows no prompt or response token uses get none and stay
   put), sampler and trainer log-probs agree to bf16 precision, and for each phase the plan's estimate against
   torch.cuda.max_memory_allocated over that phase (plan / measured within 0.85-1.3: the plan is a worst case,
   which every response of exactly --new-tokens tokens meets);
2. FSDP2 on NCCL (gloo with --cpu) with world size 1 (gndpo.dist.apply_fsdp with the presets'
   MixedPrecisionPolicy), scored through gndpo.forward.response_stats as the trainer does: float32 shards, bf16
   compute, one update that moves the weights, a DCP save/load round trip, the plan's FSDP peak;
3. vLLM (when it imports): a bf16 VLLMRollout over float32 masters with sleep mode: first push and sync check
   (weight fingerprint and log-prob gap), the memory freed by sleep, wake + push after an optimizer step, a
   skipped push stopped by the sync check; VLLMTeacher against HFTeacher. With --cpu the engine runs float32,
   whose CPU kernels repack the linear weights: no fingerprint there (3e passes as "not caught").

Prints one markdown table (and writes it with a JSON copy under $OUT when set); exits 1 when a check fails.
Not run yet: no GPU has been lent to this project's tasks while it was written (see docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROWS: list[tuple[str, str, str]] = []  # (check, PASS/FAIL/SKIP, detail)


def row(check: str, ok: bool | None, detail: str) -> None:
    ROWS.append((check, "SKIP" if ok is None else ("PASS" if ok else "FAIL"), detail))
    print(f"[{ROWS[-1][1]}] {check}: {detail}", flush=True)


def guarded(name: str, fn, *args) -> None:
    """Run one check; an exception is a failed row with its last line, not the end of the script."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 -- every failure becomes a row
        traceback.print_exc()
        row(name, False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}")


# ---------------------------------------------------------------- setup


def write_data(root: Path, n: int) -> Path:
    import torch
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    path = root / "train.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            pixels = (torch.rand(448, 448, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"img{i}.png")
            f.write(json.dumps({"id": f"p{i}", "problem": f"Find the area of triangle ABC ({i}).", "answer": "6",
                                "images": [str(root / f"img{i}.png")]}) + "\n")
    return path


def run_config(work: dict, out: Path, *extra: str):
    from gndpo.config import load_config

    R = work["new_tokens"]
    return load_config(None, [
        f"model.path={work['student']}", f"teacher.path={work['teacher']}", f"data.train={work['data']}",
        "data.prompt_suffix=none", f"data.max_prompt_length={work['P']}", "data.max_image_tiles=12",
        "model.dtype=float32", f"model.compute_dtype={work['compute']}", "model.gradient_checkpointing=true",
        f"teacher.dtype={work['compute']}", "teacher.micro_batch_size=4", "algorithm.method=gndpo", "rollout.n=4",
        f"rollout.max_new_tokens={R}", f"rollout.min_new_tokens={R}", "rollout.micro_batch_size=8",
        "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", f"trainer.device={work['device']}",
        f"trainer.output_dir={out}", "logging.progress=false", "logging.tensorboard=false", "optim.lr=1e-6",
        "trainer.seed=1", *extra])


# ---------------------------------------------------------------- 1: one process


class PhaseMemory:
    """torch.cuda.max_memory_allocated over each phase of gndpo.train, by wrapping the functions it calls."""

    def __init__(self, cuda: bool):
        self.cuda, self.peaks, self._undo = cuda, {}, []

    def wrap(self, owner, attr: str, phase: str) -> None:
        import torch

        real = getattr(owner, attr)

        def wrapped(*a, **k):
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            try:
                return real(*a, **k)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                    self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated())

        setattr(owner, attr, wrapped)
        self._undo.append((owner, attr, real))

    def restore(self) -> None:
        for owner, attr, real in reversed(self._undo):
            setattr(owner, attr, real)


class GradientRows:
    """Which rows of each parameter got a non-zero gradient at some optimizer step of gndpo.train (a step pre-hook
    on the optimizer update_policy is given): the elements AdamW can move. Most rows of the 151,936-row input
    embedding never get one (only the ids the prompts and responses use are looked up), and without weight decay
    they stay put, so "the masters moved" is measured over the rows that had a gradient. Per row (a 1-D tensor:
    per element), from amax/amin reductions: no full-size temporary on the GPU during the update phase."""

    def __init__(self):
        self.rows: dict[str, "torch.Tensor"] = {}  # name -> (rows,) bool, on the CPU
        self.seen: set[int] = set()

    def wrap(self, owner, attr: str) -> None:
        real = getattr(owner, attr)

        def wrapped(cfg, model, optimizer, *a, **k):
            if id(optimizer) not in self.seen:
                self.seen.add(id(optimizer))
                names = {id(p): n for n, p in getattr(model, "model", model).named_parameters()}
                optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.record(opt, names))
            return real(cfg, model, optimizer, *a, **k)

        setattr(owner, attr, wrapped)
        self.undo = (owner, attr, real)

    def record(self, optimizer, names: dict) -> None:
        import torch

        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad.reshape(p.grad.shape[0], -1) if p.grad.dim() > 1 else p.grad.reshape(-1, 1)
                    hit = ((g.amax(1) != 0) | (g.amin(1) != 0)).cpu()
                    name = names[id(p)]
                    self.rows[name] = hit | self.rows[name] if name in self.rows else hit

    def restore(self) -> None:
        setattr(*self.undo)


def check_one_process(work: dict) -> None:
    import torch
    from safetensors.torch import load_file

    import gndpo.train as train_mod
    from gndpo.models import load_model
    from gndpo.plan import GIB, build_plan
    from gndpo.rollout.hf import HFRollout
    from gndpo.teacher.hf import HFTeacher

    out = work["root"] / "one"
    cfg = run_config(work, out, "trainer.total_steps=2", "checkpoint.save_final=true")
    plan = build_plan(cfg)
    mem = PhaseMemory(work["cuda"])
    mem.wrap(HFRollout, "generate", "rollout")
    mem.wrap(train_mod, "rollout_stats", "old log-probs")
    mem.wrap(HFTeacher, "score", "teacher scoring")
    mem.wrap(train_mod, "update_policy", "update")
    grads = GradientRows()
    grads.wrap(train_mod, "update_policy")  # inside the memory wrapper: the hook's reductions count in "update"
    start = time.perf_counter()
    try:
        train_mod.train(cfg)
    finally:
        grads.restore()
        mem.restore()
    seconds = time.perf_counter() - start
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    ckpt = out / "checkpoints" / "step-000002"
    dtypes = {str(w.dtype) for w in load_file(str(ckpt / "model.safetensors")).values()}
    # the masters and the initial weights as models (the gradient rows carry the live parameter names, which
    # save_pretrained may rename), upcast: a bfloat16 checkpoint compares exactly
    final = dict(load_model(str(ckpt), dtype="float32", device="cpu").model.named_parameters())
    base = dict(load_model(work["student"], dtype="float32", device="cpu").model.named_parameters())
    if set(grads.rows) != set(final):
        raise RuntimeError(f"gradients recorded for {len(grads.rows)} parameters, the checkpoint holds "
                           f"{len(final)}; e.g. {sorted(set(grads.rows) ^ set(final))[:3]}")
    moved = with_grad = 0
    with torch.no_grad():
        for k, w in final.items():
            hit = grads.rows[k].view(-1, *([1] * (w.dim() - 1))) if w.dim() > 1 else grads.rows[k].view(-1)
            moved += int(((w != base[k]) & hit).sum())
            with_grad += int(hit.sum()) * (w[0].numel() if w.dim() > 1 else 1)
    total = sum(w.numel() for w in final.values())
    del final, base
    changed = moved / max(with_grad, 1)
    row("1a masters", dtypes == {"torch.float32"} and changed >= 0.9,
        f"checkpoint dtypes {sorted(dtypes)}; {changed:.1%} of the weights with a gradient moved in 2 steps at lr "
        f"1e-6 ({with_grad / total:.1%} of all had one: untouched embedding rows cannot move)")
    diff = max(s.get("rollout/logprob_diff_max", float("nan")) for s in steps)
    row("1b decode loop", diff == diff and diff < 0.5 and steps[-1]["response_length"] == work["new_tokens"],
        f"sampler vs trainer log-prob max |diff| {diff:.3g} ({work['compute']} both); "
        f"{steps[-1]['time/rollout']:.1f} s rollout "
        f"of {8 * work['new_tokens']} tokens; whole run {seconds:.0f} s")
    if not work["cuda"]:
        row("1c plan vs CUDA allocator", None, "no CUDA device")
        return
    for phase in ("rollout", "old log-probs", "teacher scoring", "update"):
        est, got = plan.phase_bytes.get(phase), mem.peaks.get(phase)
        if est is None or got is None:
            row(f"1c plan: {phase}", False, f"plan {est}, measured {got}")
            continue
        ratio = est / got
        row(f"1c plan: {phase}", 0.85 <= ratio <= 1.3,
            f"plan {est / GIB:.2f} GiB, max_memory_allocated {got / GIB:.2f} GiB, ratio {ratio:.3f}")


# ---------------------------------------------------------------- 2: FSDP2, world size 1


def check_fsdp(work: dict) -> None:
    import torch
    import torch.distributed as dist

    from gndpo.data.loaders import load_records
    from gndpo.dist import DistContext, apply_fsdp, clip_grad_norm, load_sharded, save_sharded
    from gndpo.forward import ResponseScorer, encode_each, micro_batch_inputs, pad_token_id, response_stats
    from gndpo.models import load_model
    from gndpo.plan import GIB, build_plan

    cuda = work["cuda"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        loaded = load_model(work["student"], dtype="float32", device=work["device"])
        model = loaded.model
        model.gradient_checkpointing_enable()
        scorer = ResponseScorer(model)
        low = getattr(torch, work["compute"])
        apply_fsdp(scorer, model, param_dtype=low if low != torch.float32 else None, reduce_dtype=torch.float32)
        shards = {type(p).__name__ for p in model.parameters()}
        local = {str(p.to_local().dtype) for p in model.parameters() if hasattr(p, "to_local")}
        optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=1e-6)
        records = load_records(str(work["data"]))[:1]
        encoded = encode_each(loaded.processor, records, suffix=None, system_prompt=None)
        inputs, rows = micro_batch_inputs(scorer, encoded, torch.zeros(4, dtype=torch.long),
                                          pad_id=pad_token_id(loaded.processor), device=work["device"])
        R = work["new_tokens"]
        ids = torch.randint(0, 1000, (4, R), device=work["device"])
        mask = torch.ones(4, R, dtype=torch.bool, device=work["device"])
        before = {n: p.full_tensor().detach().clone() for n, p in list(model.named_parameters())[:4]}
        lp = response_stats(scorer, inputs, ids, mask, prompt_index=rows).logprobs
        lp.mean().backward()
        norm = clip_grad_norm([p for p in scorer.parameters() if p.grad is not None], 1.0, DistContext())
        grads = {str(p.grad.to_local().dtype) for p in model.parameters() if p.grad is not None}
        optimizer.step()
        moved = all(not torch.equal(before[n], p.full_tensor()) for n, p in list(model.named_parameters())[:4]
                    if n in before)
        ok = shards == {"DTensor"} and local == {"torch.float32"} and grads == {"torch.float32"} and moved and \
            norm == norm and norm > 0
        row("2a FSDP2 mixed precision", ok,
            f"{'NCCL' if cuda else 'gloo'} world 1; params {sorted(shards)} holding {sorted(local)}, grads "
            f"{sorted(grads)}, grad norm {norm:.3g}, weights moved: {moved}")
        ckpt = work["root"] / "dcp"
        save_sharded(str(ckpt), scorer, optimizer)
        reference = {n: p.full_tensor().detach().clone() for n, p in list(model.named_parameters())[:4]}
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().zero_()
        load_sharded(str(ckpt), scorer, optimizer)
        same = all(torch.equal(reference[n], p.full_tensor()) for n, p in list(model.named_parameters())[:4]
                   if n in reference)
        row("2b DCP round trip", same, "save_sharded -> zero -> load_sharded restores the float32 shards")
        if cuda:
            cfg = run_config(work, work["root"] / "unused", "trainer.total_steps=1")
            est = build_plan(cfg, world_size=1, shard="fsdp").phase_bytes["update"]
            got = torch.cuda.max_memory_allocated()
            row("2c plan: FSDP update", got <= est * 1.15,
                f"one micro-batch update peak {got / GIB:.2f} GiB within the plan's update phase {est / GIB:.2f} GiB")
        else:
            row("2c plan: FSDP update", None, "no CUDA device")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- 3: vLLM


def check_vllm(work: dict) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        row("3 vLLM", None, f"vLLM does not import here ({exc})")
        return
    import torch

    from gndpo.data.loaders import load_records
    from gndpo.forward import ResponseScorer, rollout_logprobs
    from gndpo.models import load_model
    from gndpo.rollout.base import SamplingParams
    from gndpo.rollout.vllm import SyncError, VLLMRollout
    from gndpo.teacher.hf import HFTeacher
    from gndpo.teacher.vllm import VLLMTeacher
    from gndpo.vllm_engine import EngineOptions

    cuda = work["cuda"]
    loaded = load_model(work["student"], dtype="float32", device=work["device"])
    low = getattr(torch, work["compute"])
    scorer = ResponseScorer(loaded.model, autocast=low if low != torch.float32 else None)

    def reference(rollouts):
        with torch.no_grad():
            return rollout_logprobs(scorer, loaded.processor, rollouts, micro_batch_size=4, suffix=None,
                                    system_prompt=None, temperature=1.0)

    length = work["P"] + work["new_tokens"] + 1
    options = EngineOptions(dtype=work["compute"], max_model_len=length, gpu_memory_utilization=0.3,
                            enforce_eager=True, max_images=1, sleep=True)
    records = load_records(str(work["data"]))[:2]
    sampling = SamplingParams(n=4, max_new_tokens=work["new_tokens"], seed=0)
    start = time.perf_counter()
    sampler = VLLMRollout(loaded.model, loaded.processor, path=work["student"], options=options, suffix=None,
                          system_prompt=None, score_fn=reference, check_every=1, check_responses=8)
    row("3a engine start", True,
        f"{time.perf_counter() - start:.0f} s, {options.dtype}, sleep mode {sampler.sleeps}")
    try:
        ro = sampler.generate(records, sampling)
        drift = ro.stats.get("rollout/sync_weight_drift")
        row("3b first push + sync", ro.stats["rollout/sync_gap"] < 2e-2 and (drift is None or drift <= 1e-9),
            f"log-prob gap {ro.stats['rollout/sync_gap']:.3g} (max {ro.stats['rollout/sync_gap_max']:.3g}), weight "
            f"fingerprint drift {drift if drift is None else f'{drift:.3g}'}, push {ro.stats['time/weight_sync']:.2f} s")
        if cuda:
            free_asleep = torch.cuda.mem_get_info()[0]
            sampler.llm.wake_up()  # measure what sleep had freed, then put it back to sleep as the loop leaves it
            free_awake = torch.cuda.mem_get_info()[0]
            sampler.llm.sleep(level=2)
            freed = (free_asleep - free_awake) / 2**30
            reserved = options.gpu_memory_utilization * torch.cuda.get_device_properties(0).total_memory / 2**30
            row("3c sleep frees the engine", freed >= 0.8 * reserved,
                f"{freed:.1f} GiB freed while asleep of {reserved:.1f} GiB reserved")
        else:
            row("3c sleep frees the engine", None, "sleep mode is CUDA-only")
        optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=1e-6)

        def step(rollouts):
            optimizer.zero_grad(set_to_none=True)
            rollout_logprobs(scorer, loaded.processor, rollouts, micro_batch_size=4, suffix=None,
                             system_prompt=None).sum().backward()
            optimizer.step()

        step(ro)
        sampler.weights_changed()
        ro = sampler.generate(records, sampling)
        drift = ro.stats.get("rollout/sync_weight_drift")
        row("3d wake + push after a step", ro.stats["rollout/sync_gap"] < 2e-2 and (drift is None or drift <= 1e-9),
            f"gap {ro.stats['rollout/sync_gap']:.3g}, drift {drift}, wake + push {ro.stats['time/weight_sync']:.2f} s")
        step(ro)  # not told: one step stale
        try:
            sampler.generate(records, sampling)
            row("3e stale push caught", drift is None and not cuda,
                "not caught" + (" (no fingerprint on this CPU backend)" if drift is None else ""))
        except SyncError as exc:
            row("3e stale push caught", True, str(exc)[:120])
        teacher_ro = ro
    finally:
        sampler.close()
    hf_t = HFTeacher(load_model(work["teacher"], dtype=work["compute"], device=work["device"]).model, loaded.processor,
                     suffix=None, micro_batch_size=4)
    theirs = hf_t.score(teacher_ro).logprobs
    del hf_t
    t_options = EngineOptions(dtype=work["compute"], max_model_len=length, gpu_memory_utilization=0.3,
                              enforce_eager=True, max_images=1)
    teacher = VLLMTeacher(work["teacher"], loaded.processor, options=t_options, suffix=None, micro_batch_size=8)
    try:
        ours = teacher.score(teacher_ro).logprobs
    finally:
        teacher.close()
    mask = teacher_ro.response_mask
    gap = float((ours - theirs).abs()[mask].mean())
    row("3f vLLM teacher = HF teacher", gap < 2e-2,
        f"mean |diff| {gap:.3g} over {int(mask.sum())} tokens ({work['compute']})")


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="validate the script on a CPU (1 layer, no CUDA checks)")
    parser.add_argument("--layers", type=int, default=None, help="text and vision layers (default: the real ones)")
    parser.add_argument("--teacher-size", default="1b", choices=("1b", "2b", "4b", "8b"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--parts", default="1,2,3", help="which checks (1 one process, 2 FSDP2, 3 vLLM)")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("error: no CUDA device; run on a GPU, or pass --cpu to validate the script here", file=sys.stderr)
        return 2
    layers = args.layers if args.layers is not None else (1 if args.cpu else None)
    from gndpo.data.loaders import load_records
    from gndpo.forward import prompt_lengths
    from gndpo.lab.shapes import save_random_model
    from gndpo.models import load_processor

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        device = "cuda" if cuda else "cpu"
        student = save_random_model(root / "student", "1b", seed=0, layers=layers, device=device)
        teacher = save_random_model(root / "teacher", args.teacher_size, seed=1, layers=layers, device=device)
        data = write_data(root, 4)
        P = max(prompt_lengths(load_processor(str(student)), load_records(str(data)), suffix=None, system_prompt=None))
        # --cpu: float32 compute, since torch runs bf16 matmuls in a reference loop on CPUs without native bf16
        work = dict(root=root, student=str(student), teacher=str(teacher), data=data, P=P, new_tokens=args.new_tokens,
                    device=device, cuda=cuda, compute="bfloat16" if cuda else "float32")
        name = torch.cuda.get_device_name(0) if cuda else "CPU (script check)"
        row("0 models", True, f"InternVL3.5-1B-shaped student, {args.teacher_size} teacher"
            f"{f', {layers} layers' if layers else ''}; {P}-token prompts; built in "
            f"{time.perf_counter() - started:.0f} s on {name}")
        parts = set(args.parts.split(","))
        if "1" in parts:
            guarded("1 one process", check_one_process, work)
        if "2" in parts:
            guarded("2 FSDP2", check_fsdp, work)
        if "3" in parts:
            guarded("3 vLLM", check_vllm, work)
    cells = [(c, r, d.replace("|", "\\|")) for c, r, d in ROWS]  # a '|' in a detail would split its cell
    table = ["| check | result | detail |", "|---|---|---|"] + [f"| {c} | {r} | {d} |" for c, r, d in cells]
    print(f"\npaper_smoke on {name}, {time.perf_counter() - started:.0f} s")
    print("\n".join(table))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "paper_smoke.md").write_text("\n".join(table) + "\n")
        Path(os.environ["OUT"], "paper_smoke.json").write_text(json.dumps(ROWS, indent=1))
    return 1 if any(r == "FAIL" for _, r, _ in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
