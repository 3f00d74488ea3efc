"""Outcome rewards for math answers: the last ``\\boxed{}`` of a response, checked against the reference
with math-verify (symbolic and numeric equivalence through sympy).

Time bounds. sympy can run for minutes on short answers (``\\sin(x)^{1000}``, ``9^{9^9}``, deep fraction
towers), so every check is bounded twice:
- answers known to stall sympy are refused before comparison (score 0): over ``MAX_ANSWER_CHARS`` characters,
  nested deeper than ``MAX_EXPR_DEPTH``, integer powers or factorials of more than ``MAX_INT_DIGITS`` digits,
  or a compound symbolic base raised to an integer above ``MAX_SYMBOLIC_EXPONENT``;
- on the main thread, math-verify's own ``signal.alarm`` timeouts (``TIMEOUT_S`` per parse or comparison).
  Signals only work on the main thread, so on worker threads these are off and only the first bound holds.
"""
from __future__ import annotations

import math
import re
import threading
from functools import lru_cache
from typing import Any

MAX_ANSWER_CHARS = 1000
MAX_EXPR_DEPTH = 20
MAX_INT_DIGITS = 100_000
MAX_SYMBOLIC_EXPONENT = 64
TIMEOUT_S = 5

_BOX = re.compile(r"\\(boxed|fbox)(?![A-Za-z])")
_THINK_THEN_REST = re.compile(r"\s*<think>.*?</think>(.*)", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` in ``text``, or None.

    Braces may nest; escaped braces (``\\{``) do not count. An unclosed last box gives None.
    """
    if not isinstance(text, str):
        return None
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    start = last.end()
    rest = text[start:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return _braced(text, start + len(rest) - len(stripped))
    if last.group(1) == "boxed" and stripped and len(stripped) < len(rest):
        # "\boxed 5$" (MATH dataset style): up to the next whitespace or "$"
        answer = re.split(r"[\s$]", stripped, maxsplit=1)[0]
        return answer or None
    return None


def _braced(text: str, open_at: int) -> str | None:
    depth, i = 0, open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character: \{ and \} are literal braces
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def verify_answer(prediction: str, reference: str) -> bool:
    """True when ``prediction`` equals ``reference`` as math (``1/2`` = ``0.5`` = ``\\frac{1}{2}``).

    Safe on any thread; never raises (any failure is False).
    """
    try:
        pred, ref = prediction.strip(), reference.strip()
        if not pred or not ref:
            return False
        if pred == ref:
            return True
        if len(pred) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS:
            return False
        parse, verify = _math_verify()
        # None turns math-verify's signal-based timeouts off: signal.alarm raises off the main thread.
        timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        gold = parse(_as_latex(ref), parsing_timeout=timeout)
        target = parse(_as_latex(pred), parsing_timeout=timeout)
        if not gold or not target or _too_costly(gold) or _too_costly(target):
            return False
        return bool(verify(gold, target, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - a reward must never crash the training step
        return False


def math_reward(response: str, reference: str) -> float:
    """1.0 if the response's last boxed answer verifies against the reference, else 0.0."""
    try:
        answer = extract_boxed(response)
    except Exception:  # noqa: BLE001
        return 0.0
    return 1.0 if answer is not None and verify_answer(answer, reference) else 0.0


def format_reward(response: str) -> float:
    """1.0 if the response opens with ``<think>...</think>`` and gives a ``\\boxed{}`` answer after it."""
    if not isinstance(response, str):
        return 0.0
    match = _THINK_THEN_REST.match(response)
    return 1.0 if match and extract_boxed(match.group(1)) is not None else 0.0


def math_format_reward(response: str, reference: str, format_weight: float = 0.1) -> float:
    """``(1 - w) * math + w * format``, EasyR1's math score with its default weight ``w = 0.1``."""
    return (1.0 - format_weight) * math_reward(response, reference) + format_weight * format_reward(response)


# ---------------------------------------------------------------- math-verify plumbing


@lru_cache(maxsize=1)
def _math_verify():
    import math_verify
    from math_verify import grader, parser

    # Worker-thread calls turn the timeouts off on purpose (see the module docstring); math-verify would log
    # a warning on first use telling the user to add their own, which reads as a misconfiguration.
    parser.TIMEOUT_WARNING_SHOWN = True
    grader.TIMEOUT_WARNING_SHOWN = True
    return math_verify.parse, math_verify.verify


def _as_latex(answer: str) -> str:
    """math-verify looks for LaTeX in ``$...$`` or ``\\boxed{}``; a bare answer gets wrapped in ``$``."""
    if "$" in answer or "\\boxed" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


def _too_costly(parsed: list) -> bool:
    return any(_too_deep(e, 0) or _has_costly_power(e) for e in parsed if not isinstance(e, str))


def _children(expr: Any) -> tuple:
    args = getattr(expr, "args", None)
    if isinstance(args, tuple):
        return args
    try:  # sympy matrices are not Basic; their children are the entries
        return tuple(expr)
    except TypeError:
        return ()


def _too_deep(expr: Any, depth: int) -> bool:
    if depth > MAX_EXPR_DEPTH:
        return True
    return any(_too_deep(child, depth + 1) for child in _children(expr))


def _has_costly_power(expr: Any) -> bool:
    stack = [expr]
    while stack:
        node = stack.pop()
        if (_is_pow(node) or _is_factorial(node)) and _log10_abs(node) > MAX_INT_DIGITS:
            return True  # sympy would compute the integer exactly
        if _is_pow(node) and _expands(node):
            return True
        stack.extend(_children(node))
    return False


def _expands(power: Any) -> bool:
    """``(x + 1)^{200}``, ``\\sin(x)^{1000}``: simplify expands or rewrites these term by term."""
    base, exponent = power.args
    compound = not getattr(base, "is_Symbol", False) and bool(getattr(base, "free_symbols", None))
    return compound and _magnitude(exponent) > MAX_SYMBOLIC_EXPONENT


def _is_pow(node: Any) -> bool:
    return bool(getattr(node, "is_Pow", False))


def _is_factorial(node: Any) -> bool:
    return type(node).__name__ in ("factorial", "factorial2", "subfactorial")


def _log10_abs(node: Any) -> float:
    """Rough upper estimate of log10|node| for numeric sub-expressions; 0 for anything else.

    Only integer arithmetic can blow up (sympy evaluates ``9^{9^9}`` exactly), so only that is estimated.
    """
    if getattr(node, "is_Rational", False):  # Integer included
        return max(_int_log10(int(node.p)), _int_log10(int(node.q)))
    if _is_pow(node):
        base, exponent = node.args
        digits = _log10_abs(base)
        return digits * _magnitude(exponent) if digits > 0 else 0.0
    if _is_factorial(node):
        n = _magnitude(node.args[0])
        return n * math.log10(n) if n > 1 else 0.0
    if getattr(node, "is_Mul", False):
        return sum(max(_log10_abs(a), 0.0) for a in node.args)
    if getattr(node, "is_Add", False):
        return max((_log10_abs(a) for a in node.args), default=0.0) + 1.0
    return 0.0


def _int_log10(n: int) -> float:
    n = abs(n)
    return math.log10(n) if 0 < n < 2**1000 else n.bit_length() * math.log10(2)


def _magnitude(node: Any) -> float:
    """Upper estimate of |node| (inf when it overflows a float)."""
    digits = _log10_abs(node)
    return math.inf if digits > 300 else 10.0 ** digits
