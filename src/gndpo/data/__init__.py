"""Prompt records, dataset adapters and chat templates."""
from gndpo.data.geometry3k import GEOMETRY3K_ID, load_geometry3k
from gndpo.data.loaders import FORMATS, load_records
from gndpo.data.records import PromptRecord
from gndpo.data.templates import PAPER_SUFFIX, build_messages, prompt_text

__all__ = [
    "FORMATS",
    "GEOMETRY3K_ID",
    "PAPER_SUFFIX",
    "PromptRecord",
    "build_messages",
    "load_geometry3k",
    "load_records",
    "prompt_text",
]
