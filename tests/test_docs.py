"""The documentation site: `mkdocs build --strict` passes, the API reference is generated
from the docstrings, and every page in docs/ is reachable from the navigation."""

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"

# Python modules of the tools the build needs, and the pip requirement of each.
DOC_TOOLS = {
    "mkdocs": "mkdocs>=1.6,<2",
    "material": "mkdocs-material>=9.5",
    "mkdocstrings": "mkdocstrings[python]>=0.26",
    "mkdocstrings_handlers.python": "mkdocstrings[python]>=0.26",
    "yaml": "PyYAML (installed with mkdocs)",
}


def _require_doc_tools():
    missing = []
    for module, requirement in DOC_TOOLS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(f"{module} ({requirement})")
    if missing:
        pytest.fail(
            "The documentation tools are not installed: missing " + ", ".join(missing) + ". "
            "Install them with `pip install -e \".[docs]\"` (or `bash scripts/install.sh`).",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site once, strictly (any warning fails), into a temporary folder."""
    _require_doc_tools()
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # mkdocs-material's end-of-life banner
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG), "--site-dir", str(out)]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"`mkdocs build --strict` took more than {error.timeout} s", pytrace=False)
    if result.returncode != 0:
        log = "\n".join(
            line for line in (result.stdout + result.stderr).splitlines() if not line.startswith("INFO")
        )
        pytest.fail(f"`mkdocs build --strict` failed (exit {result.returncode}):\n{log}", pytrace=False)
    return out


def _text(page):
    """The visible text of a built page, tags dropped and whitespace collapsed."""
    content = re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))
    return re.sub(r"\s+", " ", html.unescape(content))


def test_strict_build_writes_every_page(site):
    pages = sorted(p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md"))
    for page in pages:
        built = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), f"docs/{page}.md was not built to {built}"


def test_api_reference_renders_the_docstrings(site):
    api = site / "api" / "index.html"
    assert api.is_file(), "docs/api.md was not built"
    source = api.read_text(encoding="utf-8")
    text = _text(api)
    # Phrases that exist only in the docstrings, so the API page was generated from them.
    for phrase in (
        "Scalable and Practical Natural Gradient Descent",  # SPNGD
        "similarity_threshold",  # an SPNGD argument, from its Args section
        "K-FAC optimizer for Keras 3 models",  # KFAC
        "Trace-based Hardware-driven layer-ORiented natural gradient",  # THOR
    ):
        assert phrase in text, f"the API page lacks the docstring phrase {phrase!r}"
    for name in (
        "keras_hoopt.KFAC",
        "keras_hoopt.SPNGD",
        "keras_hoopt.THOR",
        "keras_hoopt.NaturalGradient",
        "keras_hoopt.Newton",
        "keras_hoopt.CurvatureOptimizer",
        "keras_hoopt.load_model",
        "keras_hoopt.callbacks",
        "keras_hoopt.callbacks.BroadcastGlobalVariables",
        "keras_hoopt.schedules.PolynomialEpochDecay",
        "keras_hoopt.datasets.load_mnist_5k",
        "keras_hoopt.refresh",
        "keras_hoopt.blocks",
        "keras_hoopt.communication",
    ):
        assert f'id="{name}"' in source, f"the API page has no section for {name}"
    assert 'id="keras_hoopt.optimizers.base._Attachment"' not in source, "private names must not be documented"


def _nav_pages(entry):
    if isinstance(entry, str):
        return [entry] if entry.endswith(".md") else []
    if isinstance(entry, list):
        return [page for item in entry for page in _nav_pages(item)]
    if isinstance(entry, dict):
        return [page for value in entry.values() for page in _nav_pages(value)]
    return []


def test_every_page_is_in_the_nav():
    _require_doc_tools()
    import yaml

    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    assert config.get("strict") is True, "mkdocs.yml must set `strict: true`"
    nav = _nav_pages(config.get("nav"))
    assert nav, "mkdocs.yml has no nav"
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    orphans = sorted(set(pages) - set(nav))
    assert not orphans, f"pages in docs/ missing from the nav of mkdocs.yml: {orphans}"
    dangling = sorted(set(nav) - set(pages))
    assert not dangling, f"nav entries of mkdocs.yml with no file in docs/: {dangling}"
    duplicates = sorted({page for page in nav if nav.count(page) > 1})
    assert not duplicates, f"pages listed more than once in the nav: {duplicates}"
