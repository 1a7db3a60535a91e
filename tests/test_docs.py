"""Generated results pages: every committed page and the README block match their JSON, a run
round-trips through ``--add``, and the code in docs/extending.md runs (on tiny models, no weights)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mechlie.studies import docs
from mechlie.studies.base import STUDIES, RunFormatError, Study, StudyResult, launch

ROOT = Path(__file__).resolve().parents[1]
FAKE = "fake_docs_study"


# ---------------------------------------------------------------------------------------------
# the committed pages


def test_committed_pages_and_readme_block_match_their_json():
    differ = docs.check(ROOT)
    assert differ == [], f"regenerate with `{docs.REGENERATE}`: {differ}"


def test_every_committed_study_has_its_page_and_config():
    folder = ROOT / docs.RESULTS
    for entry in docs.committed(ROOT):
        assert (folder / f"{entry.name}.md").is_file()
        # <study>, or <study>_<model> for another model's run of it
        assert entry.summary.get("kind") == entry.kind and entry.name in (
            entry.kind,
            docs.page_name(docs.registered(entry.kind), entry.settings),
        )
        assert {"command", "commit", "run", "date"} <= set(entry.source), entry.name
    for page in folder.glob("*.md"):
        assert docs.GENERATED in page.read_text(), f"{page} is not generated: numbers belong in generated files"


def test_results_pages_are_not_ignored_by_git():
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("README.md", "x.md", "x.summary.json", "x.config.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"docs/results/{name}"], cwd=ROOT).returncode == 0
        assert not ignored, f"docs/results/{name} would be ignored by git: the pages must be committed"


def test_readme_is_short_and_holds_the_block_once():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert text.count(docs.BEGIN) == 1 and text.count(docs.END) == 1
    assert "bash scripts/setup.sh && python analyses/head_sweep.py" in text
    assert "bash scripts/test.sh" in text
    for link in re.findall(r"\]\(((?:docs|analyses|scripts)/[^)#]+)\)", text):
        assert (ROOT / link).exists(), f"README links to a missing {link}"
    by_hand = text[: text.index(docs.BEGIN)] + text[text.index(docs.END) :]
    assert not re.search(r"(?<![\w.=])0\.\d{2,}", by_hand), "a result number outside the generated block"
    table = text.split("\n## Scripts\n", 1)[1].split("\n## ", 1)[0]
    missing = [p.name for p in (ROOT / "analyses").glob("*.py") if f"| `{p.name}" not in table]
    assert missing == [], f"scripts missing from the README's table: {missing}"


# ---------------------------------------------------------------------------------------------
# a test-made study: run -> --add -> page -> check


@dataclass(frozen=True)
class FakeConfig:
    model: str = "tiny"
    n_pairs: int = 30
    layers: tuple[int, ...] = (1, 2)
    known_only: bool = True
    out_dir: str = "results/fake"
    run_name: str = ""
    batch_size: int = field(default=8, metadata={"run": False})


class FakeResult(StudyResult):
    study = FAKE
    required = ("auroc",)

    def title(self) -> str:
        return f"Fake study on {self.config().get('model', '?')}"

    def headline(self) -> list[str]:
        s = self.summary()
        n = self.config()["n_pairs"]
        return [f"- AUROC {s['auroc']:.3f} on {n} pairs.", "- second line.", "- third line.", "- fourth line."]


def fake_run(cfg: FakeConfig, model, run) -> FakeResult:
    figure = run.file("auroc.html")
    return FakeResult(run.path, {"auroc": 0.875, "warnings": [], "figures": {"auroc": str(figure)}})


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A repository with a README block, a launcher for the fake study, and one finished run."""
    monkeypatch.setitem(STUDIES, FAKE, Study(FAKE, FakeConfig, fake_run, FakeResult, load_model=False))
    root = tmp_path / "repo"
    (root / "analyses").mkdir(parents=True)
    (root / "analyses" / "fake.py").write_text(f"from {__name__} import STUDY\nlaunch(STUDY)\n")
    (root / "README.md").write_text(f"# title\n\nbefore\n\n{docs.BEGIN}\nold\n{docs.END}\n\nafter\n")
    out = tmp_path / "results"
    argv = ["--out-dir", str(out), "--n-pairs", "12", "--no-known-only", "--batch-size", "2"]
    assert launch(STUDIES[FAKE], argv=argv) == 0
    (run_dir,) = out.iterdir()
    return root, run_dir


def test_a_run_round_trips_through_add(fake_repo):
    root, run_dir = fake_repo
    assert docs.main(["--root", str(root), "--add", str(run_dir), "--commit", "abc1234"]) == 0
    folder = root / docs.RESULTS
    saved = json.loads((folder / f"{FAKE}.summary.json").read_text())
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["figures"]["auroc"] == str(run_dir / "auroc.html")
    assert saved == {**written, "figures": {"auroc": "auroc.html"}}  # copied, paths made relative to the run
    source = json.loads((folder / f"{FAKE}.config.json").read_text())["source"]
    assert source["command"] == "python analyses/fake.py --n-pairs 12 --no-known-only"  # batch size: not a result
    assert source["commit"] == "abc1234" and source["run"] == run_dir.name

    page = (folder / f"{FAKE}.md").read_text()
    assert page.startswith("# Fake study on tiny\n") and docs.GENERATED in page
    assert "- AUROC 0.875 on 12 pairs." in page and "- fourth line." in page
    assert "`python analyses/fake.py --n-pairs 12 --no-known-only`" in page and "`abc1234`" in page
    readme = (root / "README.md").read_text()
    assert readme.startswith("# title\n\nbefore\n\n") and readme.endswith("\n\nafter\n") and "old" not in readme
    assert f"(docs/results/{FAKE}.md)" in readme and "- third line." in readme and "- fourth line." not in readme
    assert docs.check(root) == []

    # The page and the block are rebuilt from the JSON alone: the run folder is not needed.
    for p in run_dir.iterdir():
        p.unlink()
    assert docs.check(root) == []


def test_another_models_run_gets_its_own_page(fake_repo, tmp_path):
    root, run_dir = fake_repo
    out = tmp_path / "other"
    argv = ["--out-dir", str(out), "--model", "tiny/other", "--no-known-only"]
    assert launch(STUDIES[FAKE], argv=argv) == 0
    (other,) = out.iterdir()
    assert docs.main(["--root", str(root), "--add", str(run_dir), str(other), "--commit", "abc1234"]) == 0
    folder = root / docs.RESULTS
    assert {p.name for p in folder.glob("*.md")} == {f"{FAKE}.md", f"{FAKE}_tiny-other.md", "README.md"}
    assert (folder / f"{FAKE}_tiny-other.md").read_text().startswith("# Fake study on tiny/other\n")
    assert (folder / f"{FAKE}.md").read_text().startswith("# Fake study on tiny\n")  # not replaced
    assert (
        "--model tiny/other" in json.loads((folder / f"{FAKE}_tiny-other.config.json").read_text())["source"]["command"]
    )
    assert docs.check(root) == []


def test_a_page_flag_names_its_own_page():
    """A flag that makes another experiment (steering's --corpus) gets its own page; other flags do not."""
    steering = docs.registered("steering")
    assert steering.page_flags == ("corpus",)
    assert docs.page_name(steering, {"corpus": False, "n_controls": 100}) == "steering"
    assert docs.page_name(steering, {"corpus": True}) == "steering_corpus"
    assert docs.page_name(steering, {"corpus": True, "model": "gemma-3-270m"}) == "steering_gemma-3-270m_corpus"
    assert docs.page_name(docs.registered("localise"), {"corpus": True}) == "localise"  # not its flag


def test_check_lists_hand_edits_missing_and_stale_pages(fake_repo, capsys):
    root, run_dir = fake_repo
    docs.main(["--root", str(root), "--add", str(run_dir), "--commit", "abc1234"])
    folder = root / docs.RESULTS
    page = folder / f"{FAKE}.md"
    page.write_text(page.read_text().replace("0.875", "0.9"))  # a hand-edited number
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("0.875", "0.9"))
    assert docs.main(["--root", str(root), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"docs/results/{FAKE}.md" in out and "README.md" in out
    assert docs.main(["--root", str(root)]) == 0 and docs.check(root) == []

    (folder / f"{FAKE}.summary.json").unlink()  # a study taken out: its page is stale
    stale = f"docs/results/{FAKE}.md (no JSON: stale)"
    assert sorted(docs.check(root)) == ["README.md", "docs/results/README.md", stale]  # and the index
    docs.regenerate(root)
    assert not page.exists() and "No results are committed yet" in readme.read_text()


def test_bad_inputs_are_refused_with_the_reason(fake_repo, tmp_path, capsys):
    root, run_dir = fake_repo
    assert docs.main(["--root", str(root), "--add", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (root / "README.md").write_text("# no markers\n")
    assert docs.main(["--root", str(root), "--add", str(run_dir)]) == 2
    assert "results:begin" in capsys.readouterr().err

    summary = json.loads((run_dir / "summary.json").read_text())
    folder = root / docs.RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    del summary["auroc"]
    (folder / f"{FAKE}.summary.json").write_text(json.dumps(summary))
    with pytest.raises(RunFormatError, match="lacks"):
        docs.expected(root)
    (folder / f"{FAKE}.config.json").unlink()
    with pytest.raises(RunFormatError, match="config.json"):
        docs.committed(root)


def test_reproduce_reruns_resumably_then_adds_and_regenerates(fake_repo, tmp_path, monkeypatch, capsys):
    import importlib.util

    root, _ = fake_repo
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "analyses" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    monkeypatch.setattr(docs, "default_root", lambda: root)
    monkeypatch.chdir(tmp_path)  # the fake study's default out_dir is relative
    for _ in range(2):  # the second run resumes in the same folder
        assert reproduce.main(["--studies", FAKE]) == 0
    out = capsys.readouterr().out
    assert f"== {FAKE}: " in out and "wall (s)" in out
    (run_dir,) = (tmp_path / "results" / "fake").iterdir()
    assert run_dir.name.startswith("default-")
    source = json.loads((root / docs.RESULTS / f"{FAKE}.config.json").read_text())["source"]
    assert source["command"] == "python analyses/fake.py"  # default flags
    assert docs.check(root) == []
    with pytest.raises(SystemExit):
        reproduce.main(["--studies", "no_such_study"])


# ---------------------------------------------------------------------------------------------
# docs/extending.md: its code runs as written, on a tiny model


def extending_blocks() -> dict[str, list[str]]:
    """The ```python blocks of docs/extending.md, by the ``## `` section they sit in."""
    text = (ROOT / "docs" / "extending.md").read_text()
    out = {}
    for section in text.split("\n## ")[1:]:
        title = section.splitlines()[0]
        out[title] = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(out) == 3 and all(out.values()), sorted(out)
    return out


def section(word: str) -> list[str]:
    (blocks,) = [b for title, b in extending_blocks().items() if word in title]
    return blocks


@pytest.fixture
def tiny_words():
    from tiny_models import tiny_model

    return tiny_model(tokenizer=True)


def test_extending_probe_runs(tiny_words):
    from mechlie.read import fits

    ns = {"model": tiny_words}
    try:
        for block in section("probe"):
            exec(compile(block, "docs/extending.md (probe)", "exec"), ns)
        assert "median_diff" in fits.FITTERS  # a probe kind and a direction fit
        n, layers = 2 * len(ns["pairs"]), tiny_words.cfg.n_layers
        assert ns["probe"].score(ns["X"]).shape == (n, layers)
        scores = ns["scores"]
        assert scores.auroc.shape == (layers,) and scores.summary()["fit"] == "median_diff"
        # A planted direction comes back.
        X = torch.randn(40, 1, 8)
        y = (torch.arange(40) % 2).float()
        X[y == 1, 0, 3] += 5.0
        d = ns["fit_median_diff"](X, y).direction[0]
        assert d.abs().argmax() == 3 and d[3] > 0
    finally:
        fits.FITS.pop("median_diff", None)  # the example's name stays in this test


def test_extending_intervention_runs(tiny_words):
    from conftest import no_hooks

    ns = {"model": tiny_words}
    for block in section("intervention"):
        exec(compile(block, "docs/extending.md (intervention)", "exec"), ns)
    plain, steered, stronger, control = (ns[k] for k in ("plain", "steered", "stronger", "control"))
    assert not torch.allclose(plain, steered) and not torch.allclose(steered, control)
    assert (stronger - plain).norm() > (steered - plain).norm()
    n = ns["tokens"].shape[1]
    assert [t.positions for t in ns["state"].log] == [(n - 1,)]  # the final position only
    assert no_hooks(tiny_words)
    nudge = ns["nudge"]
    assert nudge.random_control(1).vector.norm() == pytest.approx(float(nudge.vector.norm()), rel=1e-5)
    with pytest.raises(ValueError):
        nudge.scaled(float("nan")).validate(tiny_words)
    with pytest.raises(ValueError):
        type(nudge)(layer=9, vector=nudge.vector).validate(tiny_words)


def test_extending_study_runs_and_is_documented(tiny_words, tmp_path, monkeypatch, capsys):
    import sys
    import types

    import mechlie.core.models

    study_src, launcher_src = section("study")
    module = types.ModuleType("mechlie.studies.framing_gap")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(mechlie.core.models, "load_model", lambda name, **kw: tiny_words)
    before = dict(STUDIES)
    try:
        exec(compile(study_src, "docs/extending.md (study)", "exec"), module.__dict__)
        out = tmp_path / "results"
        monkeypatch.setattr(sys, "argv", ["framing_gap.py", "--out-dir", str(out), "--n-pairs", "6"])
        with pytest.raises(SystemExit) as done:
            exec(compile(launcher_src, "docs/extending.md (launcher)", "exec"), {"__name__": "__main__"})
        assert done.value.code == 0
        assert "P(truth) honest" in capsys.readouterr().out
        (run_dir,) = out.iterdir()
        # The committed summary gives the page, as for the built-in studies.
        root = tmp_path / "repo"
        (root / "analyses").mkdir(parents=True)
        (root / "analyses" / "framing_gap.py").write_text(launcher_src)
        (root / "README.md").write_text(f"{docs.BEGIN}\n{docs.END}\n")
        assert docs.main(["--root", str(root), "--add", str(run_dir), "--commit", "abc1234"]) == 0
        page = (root / docs.RESULTS / "framing_gap.md").read_text()
        assert page.startswith("# Framing gap: smollm2-135m-instruct, capitals\n")
        assert "`python analyses/framing_gap.py --n-pairs 6`" in page and "(6 pairs)" in page
    finally:
        STUDIES.clear()
        STUDIES.update(before)


def test_usage_page_uses_only_public_names():
    import ast

    import mechlie

    text = (ROOT / "docs" / "usage.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        tree = ast.parse(block)
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "ml"}
        assert used <= set(mechlie.__all__), sorted(used - set(mechlie.__all__))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("mechlie"):
                module = __import__(node.module, fromlist=["_"])
                assert all(hasattr(module, a.name) for a in node.names), ast.unparse(node)
    # AUROCs, effects, probabilities (0.xx): results belong in docs/results/, generated.
    assert not re.search(r"(?<![\w.=])0\.\d{2,}", text), "usage.md holds a result number"
