"""The command blocks of the README and docs/, as the docs tier executes them.

Every fenced block in a command language (bash, sh, shell, console, python) carries a marker comment on the line
before it, invisible on GitHub and on the site:

    <!-- docs-test: run -->                      executed as shown
    <!-- docs-test: run sub="A => B" ... -->     executed with the text A replaced by B (shortened for CI: fewer
                                                  steps, a smaller task); A must occur in the block
    <!-- docs-test: skip="needs GPUs" -->         not executed, reported as skipped with this reason
    <!-- docs-test: output -->                    a fence with the output of the run block before it

Options of ``run``: ``sub`` (repeatable), ``setup="command"`` (run first, not shown: e.g. write files the page
assumes), ``env=vllm|verl`` (the vLLM or verl tier's virtualenv instead of the main one), ``timeout=SECONDS``
(default 300), ``numbers=close`` (numbers in the shown output must match within 2 %; by default any number
matches, since shortened runs print other losses and accuracies).

A page's run blocks execute in order in one fresh directory, so a later block sees what an earlier one wrote;
``configs/``, ``src/`` and ``run.py`` of the checkout are linked into it, so the paths the pages use work.

Output shown on the page is checked against what the block printed (stdout and stderr together, progress bars
split at carriage returns): in a bash block the ``# ...`` lines right after a command (no blank line between),
and every line of an ``output`` fence. Each shown line must match one printed line, in order; runs of spaces
match any spacing, numbers match any number (or a close one), ``...`` matches anything.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

COMMAND_LANGS = {"bash", "sh", "shell", "console", "python", "py"}
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class MarkerError(ValueError):
    pass


@dataclass
class Block:
    path: Path  # the page
    line: int  # 1-based line of the opening fence
    lang: str
    text: str  # the block's content, as shown
    action: str = ""  # run | skip | output | "" (unmarked)
    reason: str = ""  # skip's reason
    subs: list[tuple[str, str]] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    env: str = "main"
    timeout: int = 300
    numbers: str = "any"
    output: str | None = None  # the text of the output fence that follows a run block

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    def script(self) -> str:
        """The text to execute: the shown text with the marker's substitutions applied."""
        text = self.text
        for old, new in self.subs:
            if old not in text:
                raise MarkerError(f"{self.where}: sub {old!r} does not occur in the block (stale marker)")
            text = text.replace(old, new)
        return text

    def expected(self) -> list[str]:
        """The output lines the page shows for this block (after the substitutions)."""
        shown = []
        if self.lang in {"bash", "sh", "shell", "console"}:
            after_command = False
            for line in self.script().splitlines():
                s = line.strip()
                if not s:
                    after_command = False
                elif s.startswith("#"):
                    if after_command:
                        shown.append(s[1:].strip())
                else:
                    after_command = True
        if self.output is not None:
            out = self.output
            for old, new in self.subs:
                out = out.replace(old, new)
            shown += [line.strip() for line in out.splitlines() if line.strip()]
        return shown


def parse_marker(body: str, where: str) -> dict:
    try:
        words = shlex.split(body)
    except ValueError as exc:
        raise MarkerError(f"{where}: cannot parse marker {body!r}: {exc}") from None
    if not words:
        raise MarkerError(f"{where}: empty docs-test marker")
    head, rest = words[0], words[1:]
    if head.startswith("skip="):
        reason = head[len("skip="):].strip()
        if not reason or rest:
            raise MarkerError(f'{where}: a skip needs one reason: <!-- docs-test: skip="why" -->')
        return {"action": "skip", "reason": reason}
    if head == "output":
        if rest:
            raise MarkerError(f"{where}: an output marker takes no options")
        return {"action": "output"}
    if head != "run":
        raise MarkerError(f"{where}: unknown docs-test marker {head!r}; use run, skip=\"reason\" or output")
    out: dict = {"action": "run", "subs": [], "setup": []}
    for word in rest:
        key, eq, value = word.partition("=")
        if not eq:
            raise MarkerError(f"{where}: option {word!r} needs a value (key=value)")
        if key == "sub":
            old, arrow, new = value.partition(" => ")
            if not arrow or not old:
                raise MarkerError(f'{where}: sub needs "OLD => NEW", got {value!r}')
            out["subs"].append((old, new))
        elif key == "setup":
            out["setup"].append(value)
        elif key == "env" and value in ("main", "vllm", "verl"):
            out["env"] = value
        elif key == "timeout" and value.isdigit():
            out["timeout"] = int(value)
        elif key == "numbers" and value in ("any", "close"):
            out["numbers"] = value
        else:
            raise MarkerError(f"{where}: bad option {word!r}; options: sub, setup, env=main|vllm|verl, "
                              "timeout=SECONDS, numbers=any|close")
    return out


def parse_page(path: Path) -> list[Block]:
    """Every fenced block of a Markdown page, with its marker applied; output fences folded into their run block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: dict | None = None
    pending_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line)
        if m:
            pending, pending_line = parse_marker(m.group("body"), f"{path.name}:{i + 1}"), i + 1
            i += 1
            continue
        f = FENCE.match(line)
        if not f:
            if line.strip() and pending is not None:
                raise MarkerError(f"{path.name}:{pending_line}: a docs-test marker must sit right before a fence")
            i += 1
            continue
        fence, indent = f.group("fence"), len(f.group("indent"))
        lang = (f.group("info").split() or [""])[0].lower()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j].lstrip())
            j += 1
        block = Block(path, i + 1, lang, "\n".join(body))
        if pending is not None:
            for key, value in pending.items():
                setattr(block, key, value)
        pending = None
        if block.action == "output":
            prev = blocks[-1] if blocks else None
            if prev is None or prev.action != "run" or prev.output is not None:
                raise MarkerError(f"{block.where}: an output fence must follow a run block")
            prev.output = block.text
        else:
            blocks.append(block)
        i = j + 1
    if pending is not None:
        raise MarkerError(f"{path.name}:{pending_line}: a docs-test marker with no fence after it")
    return blocks


_COMMAND_START = re.compile(r"^(\$ )?(gndpo|python3?|torchrun|pip|vllm|mkdocs|bash|export|cd|\.venv[\w-]*/bin/\S+|"
                            r"[A-Z_]+=\S*\s+\S+)( |$)")


def looks_like_commands(block: Block) -> bool:
    """A fence with no language (or text) whose first line is a shell command: it should be a marked bash block."""
    first = next((ln.strip() for ln in block.text.splitlines() if ln.strip()), "")
    return block.lang in ("", "text") and bool(_COMMAND_START.match(first))


# ------------------------------------------------------------------ matching printed output

def _pattern(shown: str, numbers: str) -> tuple[re.Pattern, list[str]]:
    """A regex for one shown line, and the numbers it shows (checked afterwards when numbers=close)."""
    parts, wanted, pos = [], [], 0
    for m in re.finditer(rf"\.\.\.|…|{NUMBER.pattern}|\s+", shown):
        parts.append(re.escape(shown[pos:m.start()]))
        token = m.group(0)
        if token in ("...", "…"):
            parts.append(".*?")
        elif token.isspace():
            parts.append(r"\s+")
        else:
            parts.append(f"({NUMBER.pattern}|nan|inf|-inf)")
            wanted.append(token)
        pos = m.end()
    parts.append(re.escape(shown[pos:]))
    return re.compile("".join(parts)), wanted


def _as_float(token: str) -> float:
    return float(token.replace(",", ""))


def _close(got: str, want: str) -> bool:
    try:
        g, w = _as_float(got), _as_float(want)
    except ValueError:
        return got == want
    decimals = len(want.split(".")[1]) if "." in want and "e" not in want.lower() else 0
    return abs(g - w) <= max(0.02 * abs(w), 0.5 * 10 ** -decimals)


def check_output(shown: list[str], printed: str, numbers: str = "any") -> str | None:
    """None when every shown line matches a printed line, in order; else what is missing and what was printed."""
    lines = [s.strip() for chunk in printed.replace("\r", "\n").splitlines() for s in [chunk] if s.strip()]
    at = 0
    for want in shown:
        regex, wanted = _pattern(want, numbers)
        for k in range(at, len(lines)):
            m = regex.search(lines[k])
            if m and (numbers == "any" or all(_close(g, w) for g, w in zip(m.groups(), wanted))):
                at = k + 1
                break
        else:
            tail = "\n".join(lines[-15:])
            return f"the page shows {want!r}, which the command did not print (in order); its last lines:\n{tail}"
    return None
