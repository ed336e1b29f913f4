"""The package as a user installs it: typed for type checkers, licensed as declared, its
version written once, every package it imports declared, each framework's layer naming
the extra that installs the framework; and the quick loop running code in every module."""

import ast
import email
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jbn

ROOT = Path(__file__).resolve().parent.parent
# A user's file: right calls, and one wrong call a type checker must catch from jbn's
# annotations (jax and numpy themselves are not analysed, which is slow and not the point).
USER_FILE = """\
import jax.numpy as jnp

import jbn

params, state = jbn.init(3)
y, new_state = jbn.batchnorm(params, state, jnp.ones((4, 3)), True, momentum=None)
scale, shift = jbn.fold(params, new_state)
wrong = jbn.init("3")
"""
# Runs the quick loop with a profiler that notes each file of jbn/ whose functions are
# called (a module merely imported does not count: its body is "<module>").
QUICK_LOOP_TRACER = """\
import json, sys, threading
import pytest
import jbn

package = jbn.__path__[0]
called = set()

def note(frame, event, arg):
    code = frame.f_code
    if event == "call" and code.co_filename.startswith(package) and code.co_name != "<module>":
        called.add(code.co_filename[len(package):])

sys.setprofile(note)
threading.setprofile(note)
code = pytest.main(["-m", "quick", "-n", "0", "-q", "-p", "no:cacheprovider", sys.argv[1]])
sys.setprofile(None)
print(json.dumps({"code": int(code), "called": sorted(called)}))
"""
MYPY_CONFIG = """\
[mypy]
[mypy-jax.*,jaxlib.*,numpy.*]
follow_imports = skip
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """jbn built and installed from this checkout, as pip installs it, into a folder."""
    target = tmp_path_factory.mktemp("site-packages")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True)
    return target


def test_type_checkers_read_the_annotations_of_the_installed_package(installed, tmp_path):
    (tmp_path / "user.py").write_text(USER_FILE)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", "mypy.ini",
         "user.py"], capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(installed), "PATH": ""})
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    # Without py.typed, mypy would skip jbn ("missing library stubs or py.typed marker").
    assert errors == ['user.py:8: error: Argument 1 to "init" has incompatible type "str"; '
                      'expected "int"  [arg-type]'], done.stdout


def test_the_installed_package_has_every_module_and_the_marker(installed):
    for module in ("__init__.py", "py.typed", "_stats.py", "nnx.py", "equinox.py",
                   "interop/__init__.py", "interop/torch.py"):
        assert (installed / "jbn" / module).is_file(), module


def test_the_license_file_is_the_declared_apache_2_license(installed):
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text().splitlines()
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text
    [dist_info] = installed.glob("jbn-*.dist-info")
    metadata = email.message_from_string((dist_info / "METADATA").read_text())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert (dist_info / "licenses" / "LICENSE").read_text() == text


def test_the_version_is_written_once_and_installed_as_jbn_version(installed):
    project = (ROOT / "pyproject.toml").read_text().split("[project]")[1].split("\n[")[0]
    assert re.search(r'^dynamic = \["version"\]', project, re.MULTILINE), project
    assert not re.search(r"^version\s*=", project, re.MULTILINE), project
    [dist_info] = installed.glob("jbn-*.dist-info")
    metadata = email.message_from_string((dist_info / "METADATA").read_text())
    assert metadata["Version"] == jbn.__version__


def test_every_package_jbn_imports_is_declared_a_dependency_or_an_extra():
    imported = set()
    for source in (ROOT / "jbn").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "framework"):  # a layer's guarded framework import
                imported.add(node.args[0].value.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"jbn", "__future__"}
    pyproject = (ROOT / "pyproject.toml").read_text()

    def names(key):  # the packages of a one-line list of requirements, such as `flax = [...]`
        [requirements] = re.findall(rf"^{key} = \[(.*)\]$", pyproject, re.MULTILINE)
        return {re.split(r"[<>=!\[ ]", requirement.strip(' "'))[0]
                for requirement in requirements.split(",")}

    assert third_party == {"jax", "numpy", "flax", "equinox", "torch"}
    assert {"jax", "numpy"} <= names("dependencies")
    for framework in ("flax", "equinox", "torch"):
        assert names(framework) == {framework}, framework


@pytest.mark.parametrize("module, framework", [("jbn.nnx", "flax"), ("jbn.linen", "flax"),
                                               ("jbn.equinox", "equinox")])
def test_a_layer_module_without_its_framework_names_the_extra_to_install(module, framework,
                                                                         monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == framework]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ModuleNotFoundError,
                       match=rf"^{module} is jbn's layer for .*, which is not installed: pip "
                             rf"install 'jbn\[{framework}\]'$"):
        importlib.import_module(module)


def test_options_from_torch_without_torch_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'jbn\[torch\]'$"):
        jbn.options_from_torch(object())


def test_the_quick_loop_runs_code_in_every_module_of_jbn(tmp_path):
    tracer = tmp_path / "quick_loop_tracer.py"
    tracer.write_text(QUICK_LOOP_TRACER)
    run = subprocess.run([sys.executable, str(tracer), str(ROOT / "tests")], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    modules = {"/" + str(path.relative_to(ROOT / "jbn")) for path in (ROOT / "jbn").rglob("*.py")}
    assert report["code"] == 0
    assert modules - {"/__init__.py", "/interop/__init__.py"} <= set(report["called"])
