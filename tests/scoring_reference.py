"""An independent reference for the scoring tests: a response's log-probs from a plain Hugging Face forward over its
prompt + response alone (no gndpo scoring path: no packing, no KV cache, no engine)."""
import torch

from gndpo.forward import encode_prompts


def alone(model, processor, record, response_ids, length):
    """Log-probs (length,) of the first ``length`` response tokens after ``record``'s prompt."""
    enc = encode_prompts(processor, [record], suffix=None, system_prompt=None)
    ids = torch.cat([enc["input_ids"], response_ids[None, :length]], 1)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
    P = enc["input_ids"].shape[1]
    return torch.log_softmax(logits[P - 1:P - 1 + length], -1).gather(-1, response_ids[:length, None]).squeeze(-1)
