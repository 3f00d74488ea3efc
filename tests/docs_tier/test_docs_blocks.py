"""The docs tier's own machinery: marker parsing, what counts as shown output, and the loose output match."""
from __future__ import annotations

import textwrap

import pytest

from docs_blocks import MarkerError, check_output, parse_page


def page(tmp_path, text: str):
    p = tmp_path / "page.md"
    p.write_text(textwrap.dedent(text))
    return parse_page(p)


def test_markers_and_their_options(tmp_path):
    blocks = page(tmp_path, '''
        Intro.

        <!-- docs-test: run sub="steps=40 => steps=3" sub="n=512 => n=8" setup="touch x" env=vllm timeout=60 -->
        ```bash
        gndpo train steps=40 n=512
        # done: 40 steps
        ```
        <!-- docs-test: output -->
        ```
        plan: 1.06B
        ```

        <!-- docs-test: skip="needs GPUs" -->
        ```bash
        torchrun --nproc-per-node 8 -m gndpo.cli train
        ```

        ```yaml
        not: a command
        ```

        ```python
        print("unmarked")
        ```
    ''')
    run, skip, yaml, unmarked = blocks
    assert (run.action, run.env, run.timeout, run.setup) == ("run", "vllm", 60, ["touch x"])
    assert run.script() == "gndpo train steps=3 n=8\n# done: 40 steps"
    assert run.expected() == ["done: 40 steps", "plan: 1.06B"]
    assert (skip.action, skip.reason) == ("skip", "needs GPUs")
    assert (yaml.lang, yaml.action) == ("yaml", "")
    assert (unmarked.lang, unmarked.action, unmarked.line) == ("python", "", 23)


@pytest.mark.parametrize("marker, message", [
    ("run sub=\"a -> b\"", "needs \"OLD => NEW\""),
    ("run fast=yes", "bad option 'fast=yes'"),
    ("skip=\"\"", "a skip needs one reason"),
    ("maybe", "unknown docs-test marker 'maybe'"),
])
def test_a_bad_marker_is_one_line_naming_the_page_and_line(tmp_path, marker, message):
    with pytest.raises(MarkerError, match="page.md:2: .*" + message.replace("(", r"\(")):
        page(tmp_path, f"\n<!-- docs-test: {marker} -->\n```bash\nls\n```\n")


def test_a_stale_substitution_fails_instead_of_running_the_long_version(tmp_path):
    (run,) = page(tmp_path, '<!-- docs-test: run sub="total_steps=40 => total_steps=3" -->\n```bash\ngndpo train\n```\n')
    with pytest.raises(MarkerError, match="does not occur in the block"):
        run.script()


def test_an_output_fence_must_follow_a_run_block(tmp_path):
    with pytest.raises(MarkerError, match="must follow a run block"):
        page(tmp_path, '<!-- docs-test: output -->\n```\nx\n```\n')


def test_notes_are_not_output_but_comments_right_after_a_command_are(tmp_path):
    (run,) = page(tmp_path, '''<!-- docs-test: run -->
```bash
# a note before the first command
python -c "print(1)"
# 1

# a note after a blank line
echo hi   # an inline comment
# hi
```
''')
    assert run.expected() == ["1", "hi"]


def test_shown_output_matches_loosely_and_in_order():
    printed = ("gndpo: 100%|##########| 2/2 [00:05<00:00, 2.50s/step, loss=-0.0031]\r\n"
               "done: 2 steps, run directory runs/demo; final loss -0.0031, accuracy 0.5\n")
    shown = ["gndpo: 100%|##########| 10/10 [00:34<00:00, 3.48s/step, loss=-0.0095]",
             "done: 10 steps, run directory runs/demo; final loss -0.009502, accuracy 0.277"]
    assert check_output(shown, printed) is None
    assert check_output(["done: ... accuracy 0.9"], printed) is None  # ... matches anything
    assert "did not print" in check_output(["done: 2 steps, run directory runs/other"], printed)
    assert "did not print" in check_output(list(reversed(shown)), printed)  # order matters


def test_numbers_close_within_two_percent_or_the_last_shown_digit():
    printed = "# peak  rollout  58.58\n# params 1.06B\n"
    assert check_output(["# peak rollout 58.6", "# params 1.06B"], printed, "close") is None
    assert check_output(["# peak rollout 58.0"], printed, "close") is None  # 1 % off
    assert check_output(["# peak rollout 60.0"], printed, "close") is not None  # 2.4 % off
    assert check_output(["# params 1.20B"], printed, "close") is not None
    assert check_output(["# params 1.20B"], printed, "any") is None
