"""tools/mutate.py, the mutation checker behind `make mutate`: its list applies to this tree, it
refuses an entry whose snippet is missing or ambiguous, and on a toy project it reports a caught,
a surviving and an invalid mutation as such without touching the project. No build, a few
seconds."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fastkd_mutate_tool", ROOT / "tools" / "mutate.py")
mutate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutate  # dataclasses look their module up there
_spec.loader.exec_module(mutate)

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="the tool copies the tree that git lists")


def test_the_projects_list_applies_to_this_tree(capsys):
    # Every snippet is found exactly once: an edit that moves one fails here, in `make test`, with
    # the entry to fix named, rather than only when `make mutate` next runs.
    assert mutate.main(["--list"]) == 0
    out = capsys.readouterr().out
    mutations = mutate.load(mutate.DEFAULT_LIST)
    assert f"{len(mutations)} mutations, every snippet found exactly once" in out
    assert all(m.id in out for m in mutations)
    assert len([m for m in mutations if m.backend != "cuda"]) >= 20
    # The four bugs the suite once let through are among them.
    for known in ("kd-triton-ignore-index", "sparse-kd-op-ignore-index", "kd-cpu-stream-ce", "engine-cache-fidelity-agreement"):
        assert known in {m.id for m in mutations}


TOY_LIST = """
[[mutation]]
id = "{id}"
area = "toy"
backend = "python"
file = "calc.py"
description = "toy"
tests = ["tests/test_calc.py"]
original = '{original}'
replacement = 'return a - b'
"""


@pytest.mark.parametrize("original,problem", [("return a / b", "is not found"), ("return a", "is found 2 times")])
def test_a_snippet_not_found_exactly_once_is_refused(tmp_path, capsys, original, problem):
    (tmp_path / "calc.py").write_text("def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_calc.py").write_text("")
    listing = tmp_path / "mutations.toml"
    listing.write_text(TOY_LIST.format(id="bad", original=original))
    assert mutate.main(["--root", str(tmp_path), "--mutations", str(listing), "--list"]) == 2
    err = capsys.readouterr().err
    assert f"mutation bad: edit 1's original snippet {problem} in calc.py" in err


def test_a_malformed_entry_is_refused(tmp_path, capsys):
    listing = tmp_path / "mutations.toml"
    listing.write_text(TOY_LIST.format(id="a", original="return a + b") + TOY_LIST.format(id="a", original="return a * b"))
    assert mutate.main(["--root", str(tmp_path), "--mutations", str(listing), "--list"]) == 2
    assert "the id 'a' is used twice" in capsys.readouterr().err


@needs_git
def test_toy_mutations_are_reported_caught_survived_and_invalid(tmp_path, capsys):
    project = tmp_path / "toy"
    (project / "tests").mkdir(parents=True)
    source = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
    (project / "calc.py").write_text(source)
    # add is tested, mul is not.
    (project / "tests" / "test_calc.py").write_text("from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    listing = tmp_path / "mutations.toml"
    entries = [("add-minus", "return a + b", "return a - b"), ("mul-plus", "return a * b", "return a + b"),
               ("add-syntax", "return a + b", "return a +")]
    listing.write_text("".join(
        f'[[mutation]]\nid = "{i}"\narea = "toy"\nbackend = "python"\nfile = "calc.py"\ndescription = "{i}"\n'
        f'tests = ["tests/test_calc.py"]\noriginal = \'{o}\'\nreplacement = \'{r}\'\n\n' for i, o, r in entries))

    code = mutate.main(["--root", str(project), "--mutations", str(listing), "--no-build", "--timeout", "120"])
    out = capsys.readouterr().out
    assert code == 1  # a survivor (and an invalid one) make the run fail
    status = {line.split()[0]: line.split()[4] for line in out.splitlines() if line.split()[:1] in (["add-minus"], ["mul-plus"], ["add-syntax"])}
    assert status == {"add-minus": "caught", "mul-plus": "survived", "add-syntax": "invalid"}
    assert "1 caught, 1 survived, 1 invalid" in out
    # The project itself was never edited, and no temporary copy is left behind.
    assert (project / "calc.py").read_text() == source
    assert "the copy is kept" not in out

    assert mutate.main(["--root", str(project), "--mutations", str(listing), "--no-build", "--only", "add-minus"]) == 0
    assert "1 caught;" in capsys.readouterr().out


@needs_git
def test_the_copy_holds_uncommitted_and_new_files_but_nothing_ignored(tmp_path):
    project, tree = tmp_path / "p", tmp_path / "tree"
    project.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    (project / ".gitignore").write_text("build/\n")
    (project / "kept.py").write_text("x = 1\n")
    (project / "build").mkdir()
    (project / "build" / "junk.o").write_text("")
    assert mutate.sync_tree(project, tree) == 2
    assert (tree / "kept.py").read_text() == "x = 1\n" and not (tree / "build").exists()
    # A re-sync rewrites only what changed and removes what is gone.
    before = (tree / ".gitignore").stat().st_mtime_ns
    (project / "kept.py").write_text("x = 2\n")
    (project / "new.py").write_text("")
    assert mutate.sync_tree(project, tree) == 2
    assert (tree / "kept.py").read_text() == "x = 2\n" and (tree / ".gitignore").stat().st_mtime_ns == before
    (project / "new.py").unlink()
    mutate.sync_tree(project, tree)
    assert not (tree / "new.py").exists()


def test_package_dirs_are_linked_into_the_copy(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackages = ["pkg", "pkg.sub"]\n'
                                             '[tool.setuptools.package-dir]\n"pkg.sub" = "sub"\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("")
    mutate.link_package_dirs(tmp_path)
    mutate.link_package_dirs(tmp_path)  # idempotent on a reused tree
    assert (tmp_path / "pkg" / "sub").resolve() == (tmp_path / "sub").resolve()
    mutate.check_imports(tmp_path, ["pkg", "pkg.sub"])


def test_the_build_snapshot_comes_back_with_its_modification_times(tmp_path):
    obj = tmp_path / "build" / "temp" / "kernel.o"
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"pristine")
    ext = tmp_path / "fastkd" / "_C.cpython-x.so"
    ext.parent.mkdir()
    ext.write_bytes(b"pristine so")
    os.utime(obj, ns=(1_000_000_000, 1_000_000_123))
    build = mutate.Build(tmp_path, cuda=False, log_dir=tmp_path)
    build.take_snapshot()
    obj.write_bytes(b"mutant")
    ext.write_bytes(b"mutant so")
    (obj.parent / "extra.o").write_bytes(b"")
    build.restore_snapshot()
    assert obj.read_bytes() == b"pristine" and obj.stat().st_mtime_ns == 1_000_000_123
    assert ext.read_bytes() == b"pristine so" and not (obj.parent / "extra.o").exists()
