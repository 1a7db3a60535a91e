"""The README's "Use it from Python" example runs as written, and every public name exists.

The example is kept in ``docs/example.py``; the README's section shows the same code, and this test
fails if the two drift apart. The section is found by its heading, and its first ``python`` block
is the example.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

import mechlie

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Use it from Python"
EXAMPLE = ROOT / "docs" / "example.py"


def readme_example() -> str | None:
    """The first python block under the README's heading, or None if the README has no such section."""
    text = (ROOT / "README.md").read_text()
    start = text.find(f"\n{HEADING}\n")
    if start < 0:
        return None
    section = text[start + 1 :].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, f"README section {HEADING!r} has no ```python block"
    return m.group(1)


def example_source() -> str:
    source = EXAMPLE.read_text()
    shown = readme_example()
    if shown is not None:
        assert shown.strip() == source.strip(), f"the README's {HEADING!r} block differs from {EXAMPLE}"
    return source


def test_public_api_names_all_exist():
    assert "Direction" not in mechlie.__all__  # nothing builds it
    assert {"Site", "hook_name", "load_pairs_file", "pairs_from_dataset"} <= set(mechlie.__all__)
    from mechlie.core.hooks import Site, hook_name

    assert mechlie.Site is Site and mechlie.hook_name is hook_name
    missing = [name for name in mechlie.__all__ if not hasattr(mechlie, name)]
    assert missing == []
    assert mechlie.steer.__module__ == "mechlie.core.hooks"
    assert mechlie.Estimate.__module__ == "mechlie.core.stats"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mechlie.nope  # noqa: B018


def test_example_uses_only_public_names():
    tree = ast.parse(example_source())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "ml"}
    assert used and used <= set(mechlie.__all__), sorted(used - set(mechlie.__all__))
    assert len(example_source().splitlines()) <= 20


@pytest.mark.slow
def test_example_runs(smol, monkeypatch):
    monkeypatch.setattr(mechlie, "load_model", lambda name: smol)  # the session's model, loaded once
    out = io.StringIO()
    ns: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(example_source(), str(EXAMPLE), "exec"), ns)
    printed = out.getvalue()
    assert "P(truth): honest prompt" in printed and "auroc" in printed and "lo" in printed
    scores, before, after = ns["scores"], ns["before"], ns["after"]
    # The claims the example makes: the lying framing lowers P(truth), the best layer's direction reads it
    # on held-out facts well above chance, and steering against it raises P(truth) on the lying prompts.
    assert before["p_truth_honest"] > before["p_truth_lying"] + 0.1
    assert float(scores.auroc_lo.max()) > 0.6
    assert after["p_truth_lying"] > before["p_truth_lying"] + 0.02
