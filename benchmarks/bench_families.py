"""What gndpo's fast paths buy on the model families users bring. Not a test.

    .venv/bin/python benchmarks/bench_families.py              # all five families, ~6 minutes on 1 core
    .venv/bin/python benchmarks/bench_families.py --quick      # seconds: tiny models, tiny work

For each family (the VLMs InternVL, Qwen2.5-VL, Qwen3-VL, LLaVA and the text-only Qwen3) one random model of
the family's real architecture, built offline with ``gndpo.lab.families`` at a size bigger than the tests'
(``BENCH_SIZE``), so matrix products and not Python overhead dominate. Each prompt holds one image of tens to
~100 image tokens. Two comparisons, each run in the same process and interleaved A B A B ... so the load of
other jobs hits both sides alike; medians, and the median of the per-pair ratios:

1. rollout: ``HFRollout(engine="loop")`` (gndpo's decode loop: each prompt and its image prefilled once for
   its n samples) against ``engine="generate"`` (``transformers.generate``), fixed-length responses.
2. scoring, on one rollout batch: ``rollout_logprobs`` under ``no_grad`` (the teacher's and the student's
   scoring passes) and a forward + backward of ``response_logprobs`` per micro-batch (the update), along each
   of gndpo's three paths (``PATHS``): each prompt once per micro-batch, packed with its samples into one row,
   or through a KV cache shared by its samples; against one row per response (``shares_prefixes`` patched
   to False). Log-probs must agree within 1e-4 and gradients within 1e-4 (relative, all parameters together),
   or the script stops: a broken fast path reports no speed-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from unittest import mock
from timing import interleaved, speedup  # benchmarks/timing.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("internvl", "qwen2_5_vl", "qwen3_vl", "llava", "qwen3")
# Text: 4 layers of width 256, 8 query and 2 KV heads of 32 (grouped-query attention, as the real ones);
# vision towers of width 128, 2 layers. Vocabulary stays the families' 320-token BPE (see the docs' reading).
BENCH_SIZE = dict(hidden=256, layers=4, heads=8, kv_heads=2, head_dim=32, v_hidden=128, v_layers=2)
# Qwen-VL splits head_dim / 2 = 16 rotary frequencies between time, height and width, in the proportions of
# the real models' [16, 24, 24] for head_dim 128.
MROPE_SECTION = [4, 6, 6]
IMAGE_SIZES = [(160, 120), (128, 128), (120, 160), (144, 112)]  # (width, height) of prompt i's image
LLAVA_PIXELS = 64  # LLaVA's fixed input size: (64 / 8)^2 = 64 image tokens
WORK = dict(prompts=4, n=8, new_tokens=64, micro_batch=8)  # micro-batch 8 = one prompt's 8 samples
QUICK = dict(prompts=2, n=2, new_tokens=8, micro_batch=4)


def widen_images(family: str, processor) -> None:
    """Let the families' toy image geometry produce tens to ~100 image tokens per image, as real ones do."""
    from transformers import CLIPImageProcessor, Qwen2VLImageProcessor

    if family == "internvl":
        processor.image_processor.max_patches = 12  # InternVL's own default: up to 12 tiles + a thumbnail
    elif family in ("qwen2_5_vl", "qwen3_vl"):  # up to 160 x 160 px = 100 merged tokens of 16 x 16 px
        processor.image_processor = Qwen2VLImageProcessor(
            size={"shortest_edge": 16 * 16, "longest_edge": 160 * 160}, patch_size=8, merge_size=2,
            temporal_patch_size=2)
    elif family == "llava":
        side = {"height": LLAVA_PIXELS, "width": LLAVA_PIXELS}
        processor.image_processor = CLIPImageProcessor(size=side, crop_size=side, do_center_crop=False)


def build(family: str, size: dict | None, seed: int = 0):
    """A random model of ``family`` (the lab's teacher size when ``size`` is None) and its processor."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    from gndpo.lab import families

    processor = families.build_processor(family)
    widen_images(family, processor)
    # build_config reads its sizes from families.SIZES: lend it ours for this one call.
    with mock.patch.dict(families.SIZES, {"bench": size or families.SIZES["teacher"]}):
        config = families.build_config(family, "bench", processor)
    text = getattr(config, "text_config", config)
    if size and family in ("qwen2_5_vl", "qwen3_vl"):
        text.rope_parameters["mrope_section"] = MROPE_SECTION
    if family == "llava":
        config.vision_config.image_size, config.image_seq_length = LLAVA_PIXELS, (LLAVA_PIXELS // 8) ** 2
    auto = AutoModelForImageTextToText if family in families.VISION_FAMILIES else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config)
    tok = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model.eval(), processor


def make_records(family: str, count: int):
    """``count`` prompts, each with one picture (a gradient, noise and a few shapes) unless text-only."""
    from PIL import Image, ImageDraw

    from gndpo.data.records import PromptRecord
    from gndpo.lab.families import VISION_FAMILIES

    records = []
    for i in range(count):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        ramp = Image.linear_gradient("L")
        img = Image.merge("RGB", [ramp.resize((w, h)), Image.effect_noise((w, h), 40 + 10 * i),
                                  ramp.rotate(90).resize((w, h))])
        draw = ImageDraw.Draw(img)
        for k in range(2 + i):
            x, y = (37 * (k + i)) % (w - 30), (53 * k + 11 * i) % (h - 30)
            draw.ellipse((x, y, x + 20 + 3 * k, y + 25), fill=(255 - 40 * k, 60 * k % 256, 30 * i % 256))
        images = (img,) if family in VISION_FAMILIES else ()
        text = f"How many shapes are in the picture, and what is {i + 3} plus {2 * i}? Answer in \\boxed{{}}."
        records.append(PromptRecord(id=f"p{i}", prompt=text, answer=str(3 * i + 3), images=images))
    return records


def speedup_cell(fast: list[float], slow: list[float], bold: bool = False) -> str:
    """The median speed-up and, over several repeats, the range of the per-repeat ones (how noisy it was)."""
    x = f"**{speedup(fast, slow):.2f}×**" if bold else f"{speedup(fast, slow):.2f}×"
    ratios = [s / f for f, s in zip(fast, slow)]
    return x + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


# Scoring paths: each prompt once per micro-batch, packed with its samples into one row under a 4-D mask
# (gndpo's default while the row fits gndpo.forward.PACK_TOKENS = 1024 tokens, as every row here does) or
# through a KV cache shared by its samples; or, as before, one row per response, each with its own copy of the
# prompt and image.
PATHS = ("packed", "kv-cache", "rows")


def forced(path: str, fn):
    """``fn`` run with gndpo's scoring forced onto ``path``."""
    import gndpo.forward

    def run():
        ctx = {"packed": mock.patch.object(gndpo.forward, "PACK_TOKENS", 10**9),
               "kv-cache": mock.patch.object(gndpo.forward, "PACK_TOKENS", 0),
               "rows": mock.patch.object(gndpo.forward, "shares_prefixes", return_value=False)}[path]
        with ctx:
            return fn()
    return run


def ran_path(fn):
    """``fn()`` and the scoring path it took (spies on the two shared-prefix functions)."""
    import gndpo.forward as fw

    with mock.patch.object(fw, "_packed_prefix_hidden", wraps=fw._packed_prefix_hidden) as packed, \
            mock.patch.object(fw, "_shared_prefix_hidden", wraps=fw._shared_prefix_hidden) as kv:
        out = fn()
    took = {(True, False): "packed", (False, True): "kv-cache", (False, False): "rows"}.get(
        (packed.called, kv.called), "mixed")
    return out, took


def bench_family(family: str, size: dict | None, work: dict, repeats: int) -> dict:
    import torch

    from gndpo.forward import encode_each, micro_batch_inputs, pad_token_id, response_logprobs, rollout_logprobs
    from gndpo.rollout.base import SamplingParams
    from gndpo.rollout.hf import HFRollout

    model, processor = build(family, size)
    records = make_records(family, work["prompts"])
    encoded = encode_each(processor, records, suffix=None, system_prompt=None)
    image_id = getattr(model.config, "image_token_id", None)
    image_tokens = [int((e["input_ids"] == image_id).sum()) for e in encoded] if image_id is not None else [0]
    sampling = SamplingParams(n=work["n"], max_new_tokens=work["new_tokens"], min_new_tokens=work["new_tokens"])
    B, mb, pad = work["prompts"] * work["n"], work["micro_batch"], pad_token_id(processor)
    med = statistics.median

    # 1. rollout, fixed-length: both engines produce exactly B x new_tokens tokens.
    samplers = {e: HFRollout(model, processor, suffix=None, engine=e) for e in ("loop", "generate")}
    rollouts = {e: s.generate(records, sampling, encoded=encoded) for e, s in samplers.items()}  # warm-up
    for engine, ro in rollouts.items():
        assert int(ro.response_mask.sum()) == B * work["new_tokens"], (family, engine, "not fixed-length")
    # sampler_logprobs are only set when the decode loop ran: it must not have fallen back to generate().
    assert rollouts["loop"].sampler_logprobs is not None and rollouts["generate"].sampler_logprobs is None
    gen = interleaved({e: lambda s=s: s.generate(records, sampling, encoded=encoded) for e, s in samplers.items()},
                      repeats)
    tokens = B * work["new_tokens"]
    out = dict(family=family, params=sum(p.numel() for p in model.parameters()), image_tokens=med(image_tokens),
               prompt_tokens=med(int(e["input_ids"].shape[1]) for e in encoded),
               loop_tps=tokens / med(gen["loop"]), generate_tps=tokens / med(gen["generate"]), rollout=gen)

    # 2. scoring of one batch: the no-grad pass (teacher, student's old log-probs) and the update's.
    ro = rollouts["loop"]

    def score():
        with torch.no_grad():
            return rollout_logprobs(model, processor, ro, micro_batch_size=mb, suffix=None, system_prompt=None,
                                    encoded=encoded)

    def update():
        """One forward + backward per micro-batch, as update_policy does, on a loss touching every token."""
        model.zero_grad(set_to_none=True)
        lps = []
        for start in range(0, B, mb):
            part = ro.select(torch.arange(start, min(start + mb, B)))
            inputs, rows = micro_batch_inputs(model, encoded, part.prompt_index, pad_id=pad, device="cpu")
            lp, _ = response_logprobs(model, inputs, part.response_ids, part.response_mask, prompt_index=rows,
                                      with_entropy=True)
            lp.sum().backward()
            lps.append(lp.detach())
        return torch.cat(lps)

    # Agreement first (which also warms every path up): each path must be the one asked for and give the
    # log-probs and gradients of one row per response.
    model.train()  # as update_policy does; dropout is 0 in these configs
    got = {}
    for path in PATHS:
        (lp_score, took_score), (lp_update, took_update) = ran_path(forced(path, score)), ran_path(forced(path, update))
        assert took_score == took_update == path, (family, path, took_score, took_update)
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        got[path] = (lp_score, lp_update, grad)
    ref_score, ref_update, ref_grad = got["rows"]
    for path in ("packed", "kv-cache"):
        lp_score, lp_update, grad = got[path]
        # Gradients compared over all parameters together: some are zero in theory (a key bias shifts every
        # score of a query alike, which softmax ignores), and their rounding noise has no meaningful relative size.
        out[path] = dict(score_diff=float((lp_score - ref_score).abs().max()),
                         update_diff=float((lp_update - ref_update).abs().max()),
                         grad_err=float((grad - ref_grad).norm() / ref_grad.norm()))
        assert max(out[path]["score_diff"], out[path]["update_diff"]) <= 1e-4 and out[path]["grad_err"] <= 1e-4, \
            (family, path, out[path])
    out["update"] = interleaved({p: forced(p, update) for p in PATHS}, repeats)
    model.eval()
    out["score"] = interleaved({p: forced(p, score) for p in PATHS}, repeats)
    return out


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def tables(results: list[dict]) -> str:
    rollout = [[r["family"], f"{r['params'] / 1e6:.1f}", f"{r['image_tokens']:.0f}", f"{r['prompt_tokens']:.0f}",
                f"{r['loop_tps']:.0f}", f"{r['generate_tps']:.0f}",
                speedup_cell(r["rollout"]["loop"], r["rollout"]["generate"], bold=True)] for r in results]
    scoring = []
    for r in results:
        for key, name in (("score", "scoring (no grad)"), ("update", "update (fwd + bwd)")):
            t = {p: statistics.median(r[key][p]) for p in PATHS}
            diff = max(r[p][f"{key}_diff"] for p in ("packed", "kv-cache"))
            agree = f"{diff:.0e}" + (f"; grad {max(r[p]['grad_err'] for p in ('packed', 'kv-cache')):.0e} rel."
                                     if key == "update" else "")
            scoring.append([r["family"], name, f"{t['packed']:.2f}", f"{t['kv-cache']:.2f}", f"{t['rows']:.2f}",
                            speedup_cell(r[key]["packed"], r[key]["rows"], bold=True),
                            speedup_cell(r[key]["kv-cache"], r[key]["rows"]), agree])
    return "\n\n".join([
        markdown(["family", "params (M)", "image tokens / prompt", "prompt tokens", "loop tok/s", "generate tok/s",
                  "loop speed-up (range)"], rollout),
        markdown(["family", "pass", "packed (s)", "KV cache (s)", "one row each (s)", "packed speed-up (range)",
                  "KV cache speed-up (range)", "max Δ log-prob vs one row each"], scoring)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list of: " + ", ".join(FAMILIES))
    parser.add_argument("--repeats", type=int, help="timed calls per variant after one warm-up (default 5, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the lab's teacher size, tiny work")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the 2 cores here are shared)")
    parser.add_argument("--micro-batch", type=int, help="responses per scoring micro-batch (default: one prompt's n)")
    args = parser.parse_args()
    families = args.families.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; valid: {', '.join(FAMILIES)}")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    work, size, repeats = (QUICK, None, args.repeats or 1) if args.quick else (WORK, BENCH_SIZE, args.repeats or 5)
    work = dict(work, micro_batch=args.micro_batch or work["micro_batch"])
    t0 = time.perf_counter()
    results = []
    for family in families:
        r = bench_family(family, size, work, repeats)
        results.append(r)
        x = {k: speedup(r[k]["packed"], r[k]["rows"]) for k in ("score", "update")}
        x["rollout"] = speedup(r["rollout"]["loop"], r["rollout"]["generate"])
        print(f"{family}: loop vs generate {x['rollout']:.2f}x; packed vs one row each: scoring {x['score']:.2f}x, "
              f"update {x['update']:.2f}x ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n{work['prompts']} prompts x {work['n']} samples x {work['new_tokens']} new tokens (fixed length), "
          f"scoring micro-batch {work['micro_batch']}; {repeats} interleaved repeats, medians; "
          f"{torch.get_num_threads()} torch thread(s), float32; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, Python {platform.python_version()}; "
          f"size {'lab teacher' if size is None else size}; wall time {time.perf_counter() - t0:.0f} s\n")
    print(tables(results))


if __name__ == "__main__":
    main()
