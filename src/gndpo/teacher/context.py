"""A teacher's privileged context (``teacher.context``): a template over each record's fields, rendered into the
prompt the teacher scores the student's response after, and never into the student's.

The template is Python format syntax restricted to plain field names: ``"Reference answer: {answer}"``, with
``{{`` and ``}}`` for literal braces. Fields are the record's text and number fields as the dataset names them
(:attr:`gndpo.data.records.PromptRecord.fields`). ``at="prompt"`` puts the rendered text on its own line before
the problem, in the user turn (after the images); ``at="system"`` appends it to the system prompt.
"""
from __future__ import annotations

import string
from dataclasses import replace
from typing import Sequence

from gndpo.data.records import PromptRecord
from gndpo.errors import ConfigError, DataError

PLACES = ("prompt", "system")


def template_fields(template: str, *, where: str = "teacher.context") -> tuple[str, ...]:
    """The field names ``template`` reads, in order; ConfigError (one line) for anything but plain ``{name}``s."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where}={template!r} is not a valid template ({exc}); write fields as {{name}} and "
                          "literal braces as {{ and }}") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ConfigError(f"{where}={template!r}: {{{name}{'!' + conversion if conversion else ''}"
                              f"{':' + spec if spec else ''}}} is not a plain field name; write fields as {{name}}")
        names.append(name)
    if not names:
        raise ConfigError(f"{where}={template!r} names no record field, so every teacher prompt would get the same "
                          "text; name one, e.g. 'Reference answer: {answer}'")
    return tuple(dict.fromkeys(names))


def check_records(template: str, records: Sequence[PromptRecord], *, where: str = "teacher.context") -> None:
    """DataError (one line) naming the first record that lacks a field ``template`` reads."""
    names = template_fields(template, where=where)
    for index, record in enumerate(records):
        missing = [n for n in names if n not in record.fields]
        if missing:
            have = ", ".join(record.fields) or "none"
            raise DataError(f"{where} reads the field {missing[0]!r}, which record {index} (id {record.id!r}) of "
                            f"data.train lacks (its fields: {have}); fix {where} or the data")


def render(template: str, record: PromptRecord) -> str:
    return template.format_map(record.fields)


def privileged(record: PromptRecord, template: str, at: str) -> PromptRecord:
    """``record`` as the teacher sees it: the rendered context before the problem or in the system prompt."""
    text = render(template, record)
    if at == "system":
        return replace(record, system="\n\n".join(s for s in (record.system, text) if s))
    if at != "prompt":
        raise ValueError(f"unknown context place {at!r}; valid: {', '.join(PLACES)}")
    return replace(record, prompt=f"{text}\n{record.prompt}")


class ContextTeacher:
    """``inner`` scoring every response after its record's privileged prompt (:func:`privileged`) instead of the
    student's: whatever the backend (hf, vLLM, served), the teacher renders and encodes the prompts it is handed,
    so the response's tokens are scored after the longer prompt while the student's own passes keep theirs."""

    def __init__(self, inner, template: str, at: str = "prompt"):
        template_fields(template)
        if at not in PLACES:
            raise ValueError(f"unknown context place {at!r}; valid: {', '.join(PLACES)}")
        self.inner, self.template, self.at = inner, template, at
        self.topk = inner.topk
        self.collective = getattr(inner, "collective", False)

    def score(self, rollouts):
        records = tuple(privileged(r, self.template, self.at) for r in rollouts.records)
        return self.inner.score(replace(rollouts, records=records))

    def close(self) -> None:
        self.inner.close()
