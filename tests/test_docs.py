"""The documentation keeps its promises: the README example runs, links resolve, every public name is documented."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import re
import unicodedata
from pathlib import Path

import pytest
import torch

import cmd_online
from cmd_online import CMDRecorder, CMDTrajectory

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _section(text: str, heading: str) -> str:
    """The text under a level-2 heading, up to the next one."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link shows its text
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------- README
def test_readme_quick_start_is_the_demo_and_exactly_the_ci_test_command():
    blocks = FENCE.findall(_section(README.read_text(encoding="utf-8"), "Quick start"))
    demo, suite = blocks[0][1].splitlines()
    assert blocks[0][0] == "bash" and demo.endswith("&& cmd-online demo")
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [suite]  # .ci/run runs exactly the README's test command, nothing more
    for command in (demo, suite):  # both install the pinned versions known to pass
        assert "torch==2.13.0" in command and "-c constraints/test.txt" in command


def _pins() -> dict[str, str]:
    text = (ROOT / "constraints" / "test.txt").read_text(encoding="utf-8")
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, re.M)}


def test_constraints_pin_every_test_dependency_and_the_docs_name_those_versions():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pins = _pins()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for requirement in extras["dependencies"] + extras["optional-dependencies"]["test"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        assert name in pins, f"{name} is not pinned in constraints/test.txt"
    page = (ROOT / "docs" / "integrations.md").read_text(encoding="utf-8")
    named = re.search(r"run with Lightning (\S+), transformers (\S+) and accelerate (\S+) on", page.replace("\n", " "))
    assert named, "docs/integrations.md no longer names the tested versions"
    assert named.groups() == (pins["lightning"], pins["transformers"], pins["accelerate"])


def test_readme_usage_example_runs_and_its_files_load(tmp_path, monkeypatch):
    blocks = [code for lang, code in FENCE.findall(_section(README.read_text(encoding="utf-8"), "Usage"))
              if lang == "python"]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model; the suite shares two cores
    out = io.StringIO()
    namespace = {"__name__": "__main__"}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(blocks[0], str(README), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    printed = dict(re.findall(r"^(trained|CMD) accuracy:\s+([0-9.]+)$", out.getvalue(), re.M))
    assert float(printed["trained"]) > 0.9 and float(printed["CMD"]) > 0.9, out.getvalue()
    model, rec = namespace["model"], namespace["rec"]
    assert rec.num_records == 15 and rec.phase == "tracking"
    exported = torch.load(tmp_path / "cmd_model.pt", weights_only=True)
    trajectory = CMDTrajectory.load(tmp_path / "trajectory.pt")
    for name, value in trajectory.state_dict(-1).items():
        assert torch.equal(exported[name], value), name
    # swapped() gave the trained weights back: the live model is not the CMD model
    assert any(not torch.equal(p, exported[n]) for n, p in model.state_dict().items())
    model.load_state_dict(exported, strict=True)


def test_the_readme_links_the_guidance_and_what_we_learned():
    readme = README.read_text(encoding="utf-8")
    assert "](docs/guidance.md)" in readme and "](docs/benchmarks.md#5-what-we-learned)" in readme
    assert "as well as or better" not in readme  # the claim our benchmarks do not support (docs/guidance.md)


# --------------------------------------------------------------------------------------- links
def _relative_links(page: Path):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page):
    broken = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_checker_sees_links_and_catches_a_broken_one(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n[ok](page.md#top) [bad](missing.md) ![img](img.png) [web](https://x.org)\n"
                    "```\n[inside a code block](ignored.md)\n```\n", encoding="utf-8")
    assert list(_relative_links(page)) == ["page.md#top", "missing.md", "img.png"]
    with pytest.raises(AssertionError, match="missing.md"):
        test_every_relative_link_points_to_an_existing_file(page)


# --------------------------------------------------------------------------------------- API reference
def _public_members(cls) -> list[str]:
    return [name for name, _ in inspect.getmembers(cls) if not name.startswith("_")]


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [name for name in cmd_online.__all__ if f"`{name}" not in api]
    assert not missing, f"docs/api.md does not document {missing}"


@pytest.mark.parametrize("cls", [CMDRecorder, CMDTrajectory], ids=lambda c: c.__name__)
def test_every_public_method_and_property_is_in_the_api_reference(cls):
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [name for name in _public_members(cls) if not re.search(rf"`(\w+\.)?{name}\b", api)]
    assert not missing, f"docs/api.md does not document {cls.__name__}.{missing}"


def test_every_public_instance_attribute_is_in_the_api_reference():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = CMDRecorder(optimizer, model, modes=2, samples=10, warmup=3)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        rec.record()
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [f"{type(obj).__name__}.{name}" for obj in (rec, rec.trajectory()) for name in vars(obj)
               if not name.startswith("_") and not re.search(rf"`(\w+\.)?{name}\b", api)]
    rec.close()
    assert not missing, f"docs/api.md does not document the attributes {missing}"


def _documented_signatures(api: str) -> dict[str, str]:
    """`cmdo.Name(...)` at the start of a python block of docs/api.md → the text between its parentheses."""
    found = {}
    for lang, body in FENCE.findall(api):
        m = re.match(r"cmdo\.(\w+)\((.*?)\)(\s*->.*)?\s*$", body, re.S) if lang == "python" else None
        if m:
            found[m.group(1)] = " ".join(m.group(2).split())
    return found


def _signature_mismatch(name: str, documented: str) -> str | None:
    """Why the documented parameters of ``cmd_online.<name>`` differ from the code's, or None."""
    actual = inspect.signature(getattr(cmd_online, name))
    params = [("**" if p.kind is p.VAR_KEYWORD else "") + (p.name if p.default is p.empty else f"{p.name}={p.default!r}")
              for p in actual.parameters.values()]
    written = [d.strip().replace('"', "'") for d in documented.split(",") if d.strip() not in ("*", "")]
    return None if written == params else f"docs/api.md documents {name}({documented}), the code is {name}{actual}"


def test_every_documented_signature_matches_the_code():
    signatures = _documented_signatures((DOCS / "api.md").read_text(encoding="utf-8"))
    assert {"CMDRecorder", "CMDConfig", "CMDTrajectory", "decompose", "fit_affine"} <= set(signatures)
    mismatches = [why for name, documented in signatures.items() if (why := _signature_mismatch(name, documented))]
    assert not mismatches, "\n".join(mismatches)


def test_the_signature_check_catches_a_missing_argument_and_a_wrong_default():
    fields = "modes=None, threshold=None, samples=1000, warmup=20, record_every=None, freeze_modes_after=3, seed=0"
    assert _signature_mismatch("CMDConfig", fields + ', distance="correlation", max_modes=None') is None
    assert _signature_mismatch("CMDConfig", fields + ', distance="correlation"') is not None
    assert _signature_mismatch("CMDConfig", fields.replace("1000", "100") + ', distance="correlation", max_modes=None')


def test_every_cli_subcommand_is_in_the_api_reference():
    from cmd_online.cli import build_parser

    api = (DOCS / "api.md").read_text(encoding="utf-8")
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    missing = [name for name in commands if f"cmd-online {name}" not in api]
    assert not missing, f"docs/api.md does not mention the subcommands {missing}"


# --------------------------------------------------------------------------------------- how-to, claims
def test_every_example_is_linked_from_the_howto_page():
    howto = (DOCS / "howto.md").read_text(encoding="utf-8")
    examples = sorted(p.name for p in (ROOT / "examples").glob("0*.py"))
    assert examples, "no numbered examples found"
    missing = [name for name in examples if f"](../examples/{name})" not in howto]
    assert not missing, f"docs/howto.md does not link {missing}"


def test_shift_claim_in_concepts_holds_float32_welford_needs_the_shift():
    """docs/concepts.md: a weight of mean 1e3 moving by 1e-3 — plain float32 Welford loses a, the shift keeps it."""
    check = _load_script("check_shift_precision")
    W = check.trajectory(mean=1e3, motion=1e-3, records=100, weights=300, seed=0)
    exact = cmd_online.fit_affine(W.double(), [0]).a
    error = lambda a: ((a.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(check.plain_welford_slope(W)) > 1e-3
    assert error(check.shifted_welford_slope(W)) < 1e-5


def test_make_figures_script_writes_the_three_figures(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the plots extra)")
    figures = _load_script("make_figures")
    monkeypatch.setattr("sys.argv", ["make_figures.py", "--epochs", "6", "--warmup", "3", "--modes", "3",
                                     "--samples", "100", "--out", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        figures.main()
    finally:
        torch.set_num_threads(threads)
    for name in ("fig-references.png", "fig-correlation.png", "fig-accuracy.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert re.search(r"modes M = [1-3],", capsys.readouterr().out)
