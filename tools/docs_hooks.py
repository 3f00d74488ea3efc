"""MkDocs hooks for gndpo's site (mkdocs.yml ``hooks:``): the pages that are generated, never written by hand.

- ``index.md`` is the README, with its ``docs/...`` links made relative to the site, so the landing page and the
  repository's front page cannot disagree.
- ``reference/config.md`` lists every config key from the config dataclasses through
  :func:`gndpo.config.config_sections`, the same source that prints ``gndpo train --help``.
- ``reference/cli.md`` renders every ``gndpo`` subcommand from the argparse parser :func:`gndpo.cli.build_parser`.

Every page, and every docstring of the API page, also goes through :func:`github_lists` (a Markdown extension
added in ``on_config``), so Markdown written for GitHub shows its lists on the site as GitHub shows them.

gndpo is imported from this checkout's ``src/`` (only its config and CLI modules, which need no torch), so the
docs virtualenv needs only the MkDocs packages of ``requirements/docs.txt``.
"""
from __future__ import annotations

import argparse
import html
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("index.md", "reference/config.md", "reference/cli.md")
_WIDTH = "100"  # argparse wraps usage lines to $COLUMNS; fixed so the page does not depend on the terminal


def _gndpo():
    src = str(ROOT / "src")
    if sys.path[0] != src:
        sys.path.insert(0, src)
    import gndpo.cli
    import gndpo.config

    return gndpo.config, gndpo.cli


def _cell(text: str) -> str:
    """Text for a Markdown table cell: HTML-escaped, with the characters Markdown would act on escaped."""
    text = html.escape(str(text), quote=False)
    return re.sub(r"([|*_\[\]`\\])", r"\\\1", text)


# ------------------------------------------------------------------ GitHub's lists for Python-Markdown

_LIST_ITEM = re.compile(r"^( *)(?:[-*+]|\d+[.)]) +\S")
_FENCE = re.compile(r"^ *(`{3,}|~{3,})")


def github_lists(markdown: str) -> str:
    """Lists as GitHub renders them, rewritten for Python-Markdown (MkDocs), which needs a blank line before a list
    that follows a paragraph line, and 4 spaces (GitHub: 2) before a nested item. Code fences are left alone."""
    out: list[str] = []
    block: list[str] = []  # the current list, from its first item to the line before it ends

    def flush():
        if any((m := _LIST_ITEM.match(ln)) and len(m.group(1)) % 4 == 2 for ln in block):
            block[:] = [" " * (2 * (len(ln) - len(ln.lstrip(" ")))) + ln.lstrip(" ") for ln in block]
        out.extend(block)
        block.clear()

    lines = markdown.split("\n")
    fence = None
    for i, line in enumerate(lines):
        if fence is not None:
            out.append(line)
            if re.match(rf"^ *{re.escape(fence[0])}{{{len(fence)},}} *$", line):
                fence = None
            continue
        opening = _FENCE.match(line)
        if opening:
            flush()
            fence = opening.group(1)
            out.append(line)
            continue
        if block:
            if line.strip() == "":
                nxt = next((ln for ln in lines[i + 1:] if ln.strip()), "")
                if nxt.startswith(" ") or _LIST_ITEM.match(nxt):
                    block.append(line)
                    continue
                flush()
                out.append(line)
                continue
            if not block[-1].strip() and not line.startswith(" ") and not _LIST_ITEM.match(line):
                flush()
                out.append(line)
                continue
            block.append(line)
            continue
        m = _LIST_ITEM.match(line)
        if m and len(m.group(1)) < 4:
            if out and out[-1].strip() and not out[-1].lstrip().startswith("<!--"):
                out.append("")
            block.append(line)
            continue
        out.append(line)
    flush()
    return "\n".join(out)


# ------------------------------------------------------------------ the README as the home page

def readme_as_home(readme: str) -> str:
    """The README with links into docs/ made relative to the site root (docs/LAB.md -> LAB.md)."""
    readme = re.sub(r"\]\(docs/", "](", readme)
    return re.sub(r'(src=")docs/', r"\1", readme)


# ------------------------------------------------------------------ config reference

def config_reference() -> str:
    config, _ = _gndpo()
    sections = config.config_sections()
    n = sum(len(keys) for _, _, keys in sections)
    out = [
        "# Config keys",
        "",
        f"Every key of a run's config ({n} keys in {len(sections)} sections), its default and its meaning. This page",
        "is generated at build time from the config dataclasses in `gndpo/config.py`, the same source",
        "`gndpo train --help` prints, so the two cannot disagree. Set a key in the YAML file under its section, or",
        "on the command line as `section.key=value` (`trainer.total_steps=10`, `model.lora.rank=16`).",
        "Defaults are the paper's Table 2; `(required)` has no default. See",
        "[Training and configs](../guides/training.md) for how a config is put together.",
        "",
    ]
    for name, section_help, keys in sections:
        out += [f"## {name}", "", section_help, "", "| key | default | meaning |", "|---|---|---|"]
        for k in keys:
            choices = f" One of: {', '.join(f'`{c}`' for c in k.choices)}." if k.choices else ""
            out.append(f'| <span id="{k.key}"></span>`{k.key}` | `{k.default}` | {_cell(k.help)}{choices} |')
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------ CLI reference

def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps its subcommands here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _argument_rows(group) -> list[str]:
    rows = []
    for a in group._group_actions:
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        if a.option_strings:
            value = "" if a.nargs == 0 else " " + (a.metavar if isinstance(a.metavar, str) else a.dest.upper())
            name = ", ".join(f"`{o}{value}`" for o in a.option_strings)
        else:
            name = f"`{a.metavar if isinstance(a.metavar, str) else a.dest}`"
        notes = []
        if a.choices and not isinstance(a, argparse._SubParsersAction):
            notes.append("one of: " + ", ".join(f"`{c}`" for c in a.choices))
        if a.nargs in ("*", "+"):
            notes.append("several allowed")
        if a.default not in (None, False, argparse.SUPPRESS) and a.nargs != 0:
            notes.append(f"default `{a.default}`")
        help_ = _cell(a.help or "")
        rows.append(f"| {name} | {help_}{' (' + '; '.join(notes) + ')' if notes else ''} |")
    return rows


def cli_reference() -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _WIDTH
    try:
        _, cli = _gndpo()
        parser = cli.build_parser()
        commands = _subcommands(parser)
        out = [
            "# Command line",
            "",
            "Every `gndpo` command and option, generated at build time from the argparse parser in `gndpo/cli.py`",
            "(what `gndpo COMMAND --help` prints). The config keys that `gndpo train` takes as `key=value`",
            "overrides are in [Config keys](config.md).",
            "",
            "| command | what it does |",
            "|---|---|",
        ]
        out += [f"| [`gndpo {name}`](#gndpo-{name}) | {_cell(h)} |" for name, h, _ in commands]
        out.append("")
        for name, h, sub in commands:
            out += [f"## gndpo {name}", "", (sub.description or h[:1].upper() + h[1:] + "."), "", "```text",
                    sub.format_usage().strip(), "```", ""]
            for group in sub._action_groups:
                rows = _argument_rows(group)
                if not rows:
                    continue
                title = {"positional arguments": "Arguments", "options": "Options"}.get(group.title, group.title)
                out += [f"**{title}**" if title[0].isupper() else f"**Options: {title}**", "",
                        "| argument | meaning |", "|---|---|", *rows, ""]
            epilog = sub.epilog or ""
            if name == "train":  # the epilog ends with every config key: the config page has them
                epilog = epilog[: epilog.index("config keys")].rstrip() if "config keys" in epilog else epilog
            if epilog.strip():
                out += ["```text", epilog.strip(), "```", ""]
        return "\n".join(out)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


# ------------------------------------------------------------------ MkDocs events

def _github_lists_extension():
    from markdown.extensions import Extension
    from markdown.preprocessors import Preprocessor

    class GithubLists(Preprocessor):
        def run(self, lines):
            return github_lists("\n".join(lines)).split("\n")

    class GithubListsExtension(Extension):
        def extendMarkdown(self, md):
            md.preprocessors.register(GithubLists(md), "gndpo_github_lists", 40)  # before fenced code (25)

    return GithubListsExtension()


def on_config(config):
    # An extension, not a page hook: mkdocstrings renders the docstrings of the API page with these extensions too.
    config.markdown_extensions.append(_github_lists_extension())
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    pages = {
        "index.md": readme_as_home((ROOT / "README.md").read_text(encoding="utf-8")),
        "reference/config.md": config_reference(),
        "reference/cli.md": cli_reference(),
    }
    for uri, content in pages.items():
        existing = files.get_file_from_path(uri)
        if existing is not None:
            raise SystemExit(f"docs/{uri} is generated by tools/docs_hooks.py; remove the file from docs/")
        files.append(File.generated(config, uri, content=content))
    return files
