"""The documentation works as written.

Every Python block of README.md and of the guides in docs/ runs as written, each in a fresh
process as a user would run it (forked from one that imported what the blocks import, before
JAX starts a backend, so that no block pays for the imports): on the CPU, with 8 virtual
devices for the blocks that split a batch, x64 off. A block may be marked
``<!-- not run: why -->`` on the line before its fence; only the examples page's are, whose
blocks include whole example scripts that their own tests run. Blocks that make a mesh run
twice: with ``jax.make_mesh``'s default (Explicit axes) and with Auto axes.

The site builds with ``mkdocs build --strict`` (every page in the nav, every link, anchor
and included file found), its API reference documents every public name, and no page
retypes a figure the benchmarks record.
"""

import concurrent.futures
import doctest
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

import jbn

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = sorted(page for page in (ROOT / "docs").rglob("*.md") if "api" not in page.parts)
API_PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))
TIMEOUT_S = 240
# Run before a block to give jax.make_mesh Auto axes by default instead of Explicit ones.
AUTO_AXES = """
import jax as _jax
_make_mesh = _jax.make_mesh
def _auto_make_mesh(shape, names, **kwargs):
    kwargs.setdefault("axis_types", (_jax.sharding.AxisType.Auto,) * len(shape))
    return _make_mesh(shape, names, **kwargs)
_jax.make_mesh = _auto_make_mesh
"""
# The commands users and CI copy from the README's first screen, verbatim.
SET_UP = [
    'python3 -m venv .venv && .venv/bin/pip install -e ".[examples]" && '
    ".venv/bin/python examples/train.py",
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest',
]


def blocks(page: Path):
    """(name, code, reason it is not run or None) of each ```python block of a page."""
    found, heading = [], "top"
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("# ")
        if line.strip() == "```python":
            end = lines.index("```", i + 1)
            marker = re.match(r"<!-- not run: (.*) -->", lines[i - 1].strip())
            name = f"{page.relative_to(ROOT)}, line {i + 1}, {heading}"
            found.append((name, "\n".join(lines[i + 1: end]), marker and marker.group(1)))
            i = end
        i += 1
    return found


BLOCKS = [block for page in [README, *GUIDES] for block in blocks(page)]
RUNS = {f"{name}{' (Auto axes)' if auto else ''}": (AUTO_AXES if auto else "") + code
        for name, code, skipped in BLOCKS if not skipped
        for auto in ((False, True) if "jax.make_mesh" in code else (False,))}


# Reads [(code, output file)] from stdin; runs each block in a child forked after the imports
# (no backend is started before the fork), its stdout and stderr to its file, killed after
# TIMEOUT_S; prints the exit statuses as JSON.
RUNNER = """
import json, os, signal, sys, traceback
import flax.linen, jax, jbn, jbn.equinox, jbn.nnx, numpy, optax
statuses = []
for code, output in json.load(sys.stdin):
    pid = os.fork()
    if pid == 0:
        signal.alarm(TIMEOUT_S)
        file = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, 1)
        os.dup2(file, 2)
        try:
            exec(compile(code, "<block>", "exec"), {"__name__": "__main__"})
            status = 0
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(statuses))
""".replace("TIMEOUT_S", str(TIMEOUT_S))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every block's (exit status, output), in two runners side by side."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cwd = tmp_path_factory.mktemp("blocks")  # no file of this repository is at hand

    def run(names):
        outputs = [cwd / f"block-{list(RUNS).index(name)}.txt" for name in names]
        done = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True,
                              env=env, cwd=cwd, input=json.dumps(
                                  [(RUNS[name], str(output)) for name, output in
                                   zip(names, outputs, strict=True)]))
        assert done.returncode == 0, done.stdout + done.stderr
        statuses = json.loads(done.stdout.splitlines()[-1])
        return {name: (status, output.read_text() if output.exists() else "")
                for name, status, output in zip(names, statuses, outputs, strict=True)}

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        halves = pool.map(run, (list(RUNS)[0::2], list(RUNS)[1::2]))
        return {name: outcome for half in halves for name, outcome in half.items()}


@pytest.mark.parametrize("name", RUNS)
def test_block_runs_as_written(name, outcomes):
    status, output = outcomes[name]
    assert status == 0, f"{name}:\n{RUNS[name]}\n---\n{output}"


def test_only_the_included_examples_are_not_run():
    assert [(name.split(",")[0], why) for name, _, why in BLOCKS if why] == [
        ("docs/examples.md", f"examples/{script}, which tests/{test} runs")
        for script, test in [("train.py", "test_examples.py"),
                             ("data_parallel.py", "test_examples.py"),
                             ("port_from_torch.py", "test_interop.py"),
                             ("resnet_from_torch.py", "test_examples.py"),
                             ("accumulation.py", "test_examples.py"),
                             ("fused.py", "test_examples.py")]]
    for _, code, why in BLOCKS:
        if why:  # the block is the script itself, included when the site is built
            assert code == f'--8<-- "{why.split(",")[0]}"', code
    assert len(RUNS) >= 18  # the test finds the blocks


def test_api_pages_have_no_blocks_of_their_own():
    assert [name for page in API_PAGES for name, _, _ in blocks(page)] == []


def test_the_api_reference_documents_every_public_name():
    documented = [line.split(":::", 1)[1].strip() for page in API_PAGES
                  for line in page.read_text().splitlines() if line.startswith(":::")]
    public = [f"jbn.{name}" for name in jbn.__all__]
    for module in ("linen", "nnx", "equinox"):  # their __all__, without importing a framework
        source = (ROOT / "jbn" / f"{module}.py").read_text()
        names = re.search(r"^__all__ = \[(.*?)\]", source, re.MULTILINE | re.DOTALL).group(1)
        public += [f"jbn.{module}.{name}" for name in re.findall(r'"(\w+)"', names)]
    assert sorted(documented) == sorted(public)


def test_the_readme_is_an_entrance_that_starts_with_the_set_up_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    first_screen = lines[:50]
    for command in SET_UP:
        assert command in first_screen, command
    assert SET_UP[1] in (ROOT / ".ci" / "run").read_text()


def test_the_readme_tells_how_to_get_pytorchs_cpu_build_before_the_extras_that_need_it():
    """pip's default PyTorch on Linux is the CUDA build; a CPU-only machine wants the CPU
    build first, from the command PyTorch's own install selector gives (no index is named:
    the selector stays right when the index moves)."""
    text = README.read_text()
    install = text.split("[start:install]")[1].split("[end:install]")[0]
    paragraphs = [" ".join(paragraph.split()) for paragraph in install.split("\n\n")]
    found = [paragraph for paragraph in paragraphs if "CPU build" in paragraph]
    assert len(found) == 1, install
    (paragraph,) = found
    assert "pytorch.org" in paragraph and "Get Started" in paragraph, paragraph
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    needing_torch = [extra for extra, requirements in extras.items()
                     if any(re.match(r"torch\b", requirement) for requirement in requirements)]
    assert {"torch", "test"} <= set(needing_torch), extras
    for extra in needing_torch:
        assert f"`{extra}`" in paragraph, extra
    pins = {requirement for requirements in extras.values() for requirement in requirements
            if requirement.startswith("torch==")}
    assert pins and all(f"`{pin}`" in paragraph for pin in pins), (pins, paragraph)
    # Read before the command that installs the test extra, and no package host named.
    assert install.index("CPU build") < install.index(SET_UP[1])
    assert not re.search(r"https?://|index-url|download\.pytorch", install), install


HISTORY = re.compile(r'changed in\b|^!!! \w+ "changed|renamed from|\bpreviously\b|\bformerly\b'
                     r"|earlier versions?\b|\bused to be\b|\bno longer\b|\bdeprecated\b",
                     re.IGNORECASE | re.MULTILINE)


def test_no_page_carries_a_history_note():
    """The documentation says what jbn does, not what it did."""
    notes = [f"{page.relative_to(ROOT)}: {match.group(0)}"
             for page in [README, *GUIDES, *API_PAGES]
             for match in HISTORY.finditer(page.read_text())]
    assert notes == []


def test_the_home_page_links_every_example_and_counts_none():
    """A count typed into prose goes stale when an example is added; a list shows it."""
    programs = sorted(path.name for path in (ROOT / "examples").glob("*.py"))
    index = (ROOT / "docs" / "index.md").read_text()
    linked = re.findall(r"\[`([\w.]+\.py)`\]\(examples\.md#[\w-]+\)", index)
    assert sorted(linked) == programs
    numbers = "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|dozen|\\d+"
    count = re.compile(rf"\b(?:{numbers})\s+(?:[\w-]+\s+)?(?:programs|examples|scripts)\b",
                       re.IGNORECASE)
    pages = [README, ROOT / "docs" / "index.md", ROOT / "docs" / "examples.md"]
    counted = [f"{page.relative_to(ROOT)}: {match.group(0)}" for page in pages
               for match in count.finditer(page.read_text())]
    assert counted == []


def test_no_measured_figure_is_typed_into_the_docs():
    """Times, speed-up ratios and measured errors live in the files the benchmarks write
    (benchmarks/*.md), which the pages include; a page that retyped one would drift."""
    figure = re.compile(r"\d\s?(µs|ms)\b|\d\.\d+ ?×|\d\.\de-\d\d")
    typed = [f"{page.relative_to(ROOT)}: {line}" for page in [README, *GUIDES]
             for line in page.read_text().splitlines() if figure.search(line)]
    assert typed == []


# A figure a measurement gives, as the package would carry one in a comment or docstring:
# those of the pages, copies of x, an error "of" a reference, a comparison.
PACKAGE_FIGURE = re.compile(r"\d\s?(µs|ms)\b|\d\.\d+ ?×|\d\.\de-\d|\d(\.\d+)? copies|\de-\d+ of "
                            r"|e-\d+·|\d\.\d+ vs ")


def test_no_measured_figure_is_typed_into_the_package():
    """A figure in a code comment or docstring ages the day the code changes: the package
    gives the reason and names the command that measures it; the figure lives in its
    record."""
    package = sorted((ROOT / "jbn").rglob("*.py"))
    typed = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in package
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if PACKAGE_FIGURE.search(line)]
    assert typed == []


def test_the_package_figure_pattern_catches_the_figures_it_is_for():
    for line in ("in about 1.3 copies of x, instead of 2.9", "y within 1e-5 of float64",
                 "reached 1.2e-5 of the variance", "grows as about ``1e-6·d²``",
                 "7.4 vs 4.1 copies", "took 3.2 ms"):
        assert PACKAGE_FIGURE.search(line), line
    for line in ("eps: float = 1e-5,", "momentum=0.99 is jbn's 0.01", "__version__ = \"0.1.0\"",
                 "Ioffe 2017, arXiv:1702.03275"):
        assert not PACKAGE_FIGURE.search(line), line


def test_public_docstrings_are_contracts_of_at_most_60_lines():
    import jbn.equinox
    import jbn.nnx

    lengths = {f"{module.__name__}.{name}": len(inspect.getdoc(getattr(module, name)).splitlines())
               for module in (jbn, jbn.nnx, jbn.equinox) for name in module.__all__}
    assert {name: n for name, n in lengths.items() if n > 60} == {}


def test_the_batchnorm_docstrings_example_runs():
    import jax.numpy as jnp

    examples = doctest.DocTestFinder().find(jbn.batchnorm, "batchnorm",
                                            globs={"jbn": jbn, "jnp": jnp})
    assert sum(len(example.examples) for example in examples) == 2
    runner = doctest.DocTestRunner()
    for example in examples:
        runner.run(example)
    assert runner.summarize(verbose=False).failed == 0


def test_the_site_builds_without_a_warning(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path),
         "--config-file", str(ROOT / "mkdocs.yml")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    built = {path.parent.relative_to(tmp_path).as_posix()
             for path in tmp_path.rglob("index.html")}
    pages = {"." if page.stem == "index" else page.relative_to(ROOT / "docs").with_suffix("")
             .as_posix() for page in (ROOT / "docs").rglob("*.md")}
    assert pages <= built, sorted(pages - built)
    # The API reference is rendered from the docstrings, and the recorded tables included.
    assert "Batch normalization of each channel of" in (
        tmp_path / "api" / "core" / "index.html").read_text()
    assert "<table>" in (tmp_path / "results" / "accuracy" / "index.html").read_text()
