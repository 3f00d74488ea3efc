"""Greedy evaluation: left-padded batches decode like single prompts; placeholders and padding are never emitted."""
import torch

from gndpo.data.records import PromptRecord
from gndpo.evaluate import greedy_accuracy
from gndpo.models import special_placeholder_ids
from gndpo.lab import tiny

RECORDS = [
    PromptRecord(id="a", prompt="1+1?", answer="2"),
    PromptRecord(id="b", prompt="What is the sum of seven and eleven, in digits?", answer="18"),
    PromptRecord(id="c", prompt="Say 3.", answer="3"),
]


def test_batched_left_padded_decoding_matches_one_prompt_at_a_time():
    model, tok = tiny.build_tiny_causal_lm(seed=3, hidden=32, layers=2)
    kwargs = dict(max_new_tokens=12, suffix=None, progress=False)
    batched = greedy_accuracy(model, tok, RECORDS, batch_size=3, **kwargs)
    single = greedy_accuracy(model, tok, RECORDS, batch_size=1, **kwargs)
    assert batched["responses"] == single["responses"]
    assert batched["n"] == 3 and len(batched["correct"]) == len(batched["rewards"]) == 3
    assert set(batched) >= {"accuracy", "format_rate", "mean_response_length", "truncated_rate"}


def test_reward_and_answers_are_passed_through():
    model, tok = tiny.build_tiny_causal_lm(seed=0)
    seen = []

    def reward(response, reference):
        seen.append(reference)
        return 1.0 if reference == "18" else 0.0

    result = greedy_accuracy(model, tok, RECORDS, batch_size=2, max_new_tokens=3, suffix=None, reward=reward,
                             progress=False)
    assert seen == ["2", "18", "3"]
    assert result["correct"] == [False, True, False] and abs(result["accuracy"] - 1 / 3) < 1e-9


def test_image_and_pad_tokens_are_suppressed():
    model, tok = tiny.build_tiny_causal_lm(seed=0)
    assert special_placeholder_ids(tok) == [tok.pad_token_id, tok.convert_tokens_to_ids("<image>")]
    vlm, processor = tiny.build_tiny_vlm("student", seed=0)
    assert special_placeholder_ids(processor) == [0, 3]
    # A zero final norm makes every logit 0: greedy would pick token 0 (the pad) forever. Suppressed, it falls
    # to the next id, <|im_start|> (1), which is special: the decoded response is empty and never stops.
    with torch.no_grad():
        model.model.norm.weight.zero_()
    result = greedy_accuracy(model, tok, RECORDS[:2], max_new_tokens=5, suffix=None, progress=False)
    assert result["responses"] == ["", ""]
    assert result["truncated_rate"] == 1.0 and result["mean_response_length"] == 5.0
    assert result["accuracy"] == 0.0 and result["format_rate"] == 0.0
