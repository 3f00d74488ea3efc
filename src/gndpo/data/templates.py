"""Chat messages built from prompt records, and the paper's prompt suffix (arXiv 2606.09091, App. A.2)."""
from __future__ import annotations

import re

from gndpo.data.records import PromptRecord

# The instruction appended to every problem: reasoning inside <think> </think>, final answer in \boxed{}.
# Same wording as the official Geometry3K preprocessing of the verl recipes the paper builds on.
PAPER_SUFFIX = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)

_IMAGE_TAG = re.compile(r"\s*<image>\s*")


def prompt_text(record: PromptRecord, suffix: str | None = PAPER_SUFFIX) -> str:
    """The user text: the problem with inline ``<image>`` tags removed, then the suffix."""
    text = _IMAGE_TAG.sub(" ", record.prompt).strip()
    return f"{text} {suffix}" if suffix else text


def build_messages(
    record: PromptRecord, *, suffix: str | None = PAPER_SUFFIX, system_prompt: str | None = None
) -> list[dict]:
    """Hugging Face chat messages. Images come first in the user turn, as one ``{"type": "image"}`` each.

    A record without images gets plain-string content, which every text-only chat template accepts.
    """
    messages: list[dict] = []
    system = "\n\n".join(s for s in (system_prompt, record.system) if s)
    if system:
        messages.append({"role": "system", "content": system})
    text = prompt_text(record, suffix)
    if record.images:
        content = [{"type": "image"} for _ in record.images] + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
    else:
        messages.append({"role": "user", "content": text})
    return messages
