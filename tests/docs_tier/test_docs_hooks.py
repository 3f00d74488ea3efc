"""The site's generated parts that need no MkDocs: GitHub-style lists for Python-Markdown, the README as the home
page, the config and CLI references as Markdown."""
from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)


def md(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def test_a_list_after_a_paragraph_line_gets_its_blank_line():
    assert hooks.github_lists(md("""
        Exit codes:
        - 0 when valid
        - 2 otherwise
        Next paragraph.
    """)) == md("""
        Exit codes:

        - 0 when valid
        - 2 otherwise
        Next paragraph.
    """)


def test_two_space_nesting_becomes_four_with_its_continuation_lines():
    github = ("- **Sampling**: own loop.\n"
              "  - same distribution as generate;\n"
              "    greedy identical.\n"
              "- **Scoring**: packed.\n"
              "\n"
              "After.")
    assert hooks.github_lists(github) == ("- **Sampling**: own loop.\n"
                                          "    - same distribution as generate;\n"
                                          "        greedy identical.\n"
                                          "- **Scoring**: packed.\n"
                                          "\n"
                                          "After.")


def test_four_space_nesting_fences_and_prose_are_left_alone():
    text = md("""
        Text.

        - a
            - b
        1. one
        2. two

        ```bash
        echo x
        - not a list
          - nor this
        ```
        The year 2026. Not a list either.
    """)
    assert hooks.github_lists(text) == text


def test_the_home_page_is_the_readme_with_site_links():
    home = hooks.readme_as_home("See [results](docs/LAB.md) and ![fig](docs/img/x.png), or <img src=\"docs/img/y.png\">.")
    assert home == "See [results](LAB.md) and ![fig](img/x.png), or <img src=\"img/y.png\">."


def test_the_config_reference_lists_each_key_once_with_its_default_and_choices():
    page = hooks.config_reference()
    assert page.count('<span id="algorithm.method"></span>') == 1
    row = next(line for line in page.splitlines() if '"algorithm.method"' in line)
    assert "`gndpo`" in row and "One of: `gndpo`, `opd`, `gspo`." in row
    row = next(line for line in page.splitlines() if '"model.path"' in line)
    assert "`(required)`" in row


def test_the_cli_reference_shows_each_commands_usage_and_leaves_the_config_keys_to_their_page():
    page = hooks.cli_reference()
    assert "## gndpo train" in page and "usage: gndpo train" in page and "## gndpo serve-teacher" in page
    assert "model.lora.rank=" not in page  # train's epilog lists every key; the config page has them
    assert "| `--gpu-memory SIZE` |" in page
