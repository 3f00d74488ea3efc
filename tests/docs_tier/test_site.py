"""The documentation site: ``mkdocs build --strict`` passes, the generated references say what the code says, the
README stays a landing page, and a real headless Chromium renders the site without a console message.

MkDocs comes from the docs virtualenv (``python3 run.py test`` builds ``.venv-docs/`` from requirements/docs.txt
and passes its ``mkdocs`` in $GNDPO_MKDOCS), or from this virtualenv when it has MkDocs installed. Chromium comes
from ``python3 run.py test`` too, which installs Debian's when it runs as root (as CI does).
"""
from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
# The home page and two guide pages, at 1280 x 900; the home page's picture is committed as docs/img/site_home.png.
RENDERED = {"home": "", "training": "guides/training/", "lora": "guides/lora/"}


def _mkdocs() -> list[str]:
    exe = os.environ.get("GNDPO_MKDOCS")
    if exe and Path(exe).exists():
        return [exe]
    if importlib.util.find_spec("mkdocs") and importlib.util.find_spec("material"):
        return [sys.executable, "-m", "mkdocs"]
    pytest.skip("MkDocs is not installed here (python3 run.py test builds .venv-docs/ from requirements/docs.txt; "
                "or pip install -r requirements/docs.txt)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH="")  # the hook imports gndpo from this checkout
    done = subprocess.run([*_mkdocs(), "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return out


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_every_nav_page_is_built(site):
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(entries):
        for e in entries:
            value = next(iter(e.values())) if isinstance(e, dict) else e
            yield from pages(value) if isinstance(value, list) else [value]

    for page in pages(nav):
        built = site / ("index.html" if page == "index.md" else page[:-3] + "/index.html")
        assert built.exists(), page


def test_the_config_reference_has_exactly_the_keys_gndpo_train_help_prints(site):
    helped = subprocess.run([sys.executable, "-m", "gndpo.cli", "train", "--help"], capture_output=True, text=True,
                            env=dict(os.environ, COLUMNS="200"), cwd=ROOT, check=True).stdout
    keys = set(re.findall(r"^  ([a-z_]+(?:\.[a-z_0-9]+)+)=", helped, re.M))
    assert len(keys) > 100 and "model.lora.rank" in keys
    page = (site / "reference/config/index.html").read_text()
    assert set(re.findall(r'<span id="([a-z_.0-9]+)"></span>', page)) == keys
    # the help of a key, from its dataclass field, on the page
    line = next(ln for ln in helped.splitlines() if ln.startswith("  algorithm.reward_clamp="))
    assert line.split("  ")[2][:40] in _text(page).replace("&#39;", "'")


def test_the_cli_reference_has_every_command_and_option(site):
    sys.path.insert(0, str(ROOT / "src"))
    from gndpo.cli import build_parser

    page = _text((site / "reference/cli/index.html").read_text())
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert len(sub.choices) >= 7
    for name, parser in sub.choices.items():
        assert f"gndpo {name}" in page
        for action in parser._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt in page, f"gndpo {name} {opt} is missing from the CLI reference"


def test_the_api_reference_documents_the_core(site):
    page = (site / "reference/api/index.html").read_text()
    for name in ("compute_advantages", "gndpo_advantages", "compute_policy_loss", "aggregate_loss",
                 "token_logprobs", "topk_divergence", "register_advantage"):
        assert f'id="gndpo.core.' in page and re.search(rf'id="gndpo\.core\.\w+\.{name}"', page), name
    assert "z-scored over every valid token" in _text(page)  # a docstring, rendered


def test_the_site_loads_nothing_from_other_hosts(site):
    external = []
    for page in site.rglob("*.html"):
        for m in re.finditer(r'<(script|img|link|iframe)\b[^>]*\b(?:src|href)="(https?:)?//[^"]+"', page.read_text()):
            if m.group(1) != "link" or "stylesheet" in m.group(0) or "preconnect" in m.group(0):
                external.append(f"{page.relative_to(site)}: {m.group(0)[:120]}")
    assert not external, external


class _Quiet(http.server.SimpleHTTPRequestHandler):
    statuses: list = []

    def log_request(self, code="-", size="-"):
        self.statuses.append((int(code) if str(code).isdigit() else 0, self.path))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP on loopback (as `mkdocs serve` or any web server would show it: the search index
    is fetched, which a file:// page cannot do), with every request's status recorded."""
    _Quiet.statuses = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason=os.environ.get(
    "GNDPO_NO_CHROMIUM", "no Chromium here (python3 run.py test installs it when root; else apt-get install chromium)"))
@pytest.mark.parametrize("name", RENDERED)
def test_rendered_in_headless_chromium(served, name, tmp_path):
    from PIL import Image

    url = served + RENDERED[name]
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=3000"]
    _Quiet.statuses.clear()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Material's script ran: it marks the search as ready only after loading the index
    assert 'class="md-search' in dom.stdout and "<article" in dom.stdout
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, f"console messages on {url}: {console}"
    failed = [(code, path) for code, path in _Quiet.statuses if code >= 400]
    assert not failed, f"requests that failed while rendering {url}: {failed}"
    assert any(path.endswith("search_index.json") for _, path in _Quiet.statuses), "the search index was not loaded"
    shot = tmp_path / f"site_{name}.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
    with Image.open(shot) as im:
        assert im.size == (1280, 900)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, "the screenshot is (nearly) blank"
    keep = os.environ.get("GNDPO_DOCS_SCREENSHOTS")  # a directory to copy the screenshots to
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)


# ------------------------------------------------------------------ the README is a landing page

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_short():
    n = len(README.splitlines())
    assert n <= 150, f"README.md has {n} lines; the manual belongs in docs/ (at most 150)"


def _table_after(text: str, heading_regex: str) -> dict[str, dict[str, str]]:
    """The first Markdown table after the heading matching ``heading_regex``: {first cell: {header: cell}}."""
    m = re.search(heading_regex, text, re.M)
    assert m, heading_regex
    rows = []
    for line in text[m.end():].splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, body = rows[0], [r for r in rows[2:]]
    return {r[0]: dict(zip(header, r)) for r in body}


def test_the_readme_lab_table_is_the_one_in_docs_lab():
    lab = _table_after((ROOT / "docs/LAB.md").read_text(encoding="utf-8"), r"^## Results \(default setting")
    readme = _table_after(README, r"^## The lab result")
    assert len(readme) >= 4
    for method, cells in readme.items():
        assert method in lab, f"README's lab row {method!r} is not a row of docs/LAB.md's results table"
        for header, value in cells.items():
            assert header in lab[method], f"README's lab column {header!r} is not in docs/LAB.md's table"
            assert value == lab[method][header], (f"README says {method} / {header} = {value!r}, docs/LAB.md says "
                                                  f"{lab[method][header]!r}")


def test_the_readme_cites_the_paper():
    bibtex = re.search(r"```bibtex\n(.*?)```", README, re.S)
    assert bibtex and "2606.09091" in bibtex.group(1) and re.match(r"@\w+\{", bibtex.group(1))
