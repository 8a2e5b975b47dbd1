"""Mutation checks: plant small, plausible bugs one at a time and see whether the tests catch them.

Each mutation of ``tools/mutations.toml`` names a file, the exact snippet(s) it replaces and the
tests that should catch the bug (pytest paths or node ids, optionally ``-k``). For each one this
tool applies the edit in a copy of the tree, runs those tests there, and reverts it: "caught" when
they fail, "survived" when they pass, "invalid" when the mutant does not build or its tests cannot
be collected (a bug that does not compile is not a plausible bug: fix the mutation). A mutation
whose snippet is not found exactly once is refused before anything runs, so the list cannot rot
silently when the code moves. Before the mutations, the union of their tests runs once on the
unmutated copy (with a test failing there, its mutations would look caught).

The developer's working tree is never touched. The copy holds what ``git ls-files --cached
--others --exclude-standard`` lists, read from the working tree: the tracked files with their
uncommitted changes and the new files not yet added, nothing that git ignores (no .venv, no
build, no compiled extension). Package folders mapped elsewhere by pyproject's
``[tool.setuptools.package-dir]`` (``fastkd.kernels`` -> ``kernels/``) are linked into place in
the copy, and the tests run with the copy first on ``PYTHONPATH``, so that they import the copy's
modules, not the developer's editable install (checked before anything runs).

The C++ extension is built in the copy once (CPU only, ``FASTKD_NO_CUDA=1``); that build is
snapshotted, and a C++ mutation rebuilds only the objects that depend on the file it edits (ninja's
dependency tracking), after which the source (with its modification time) and the snapshot are put
back, so that the next mutation starts from the pristine build without recompiling it. The CPU
kernels are compiled once per instruction set (csrc/cpu/isa_*.cpp); a mutant is compiled into the
set this CPU runs, which the tests use by default, and the other sets keep the unmutated code (a
third of the rebuild). CUDA mutations are listed but only run where a GPU is present (the build
then includes CUDA; that path has not run yet: no GPU where this was written).

Usage::

    python tools/mutate.py                 # every mutation; the table; exit 1 unless all are caught
    python tools/mutate.py --list          # the mutations, checked against the tree, without running
    python tools/mutate.py --only ID[,ID]  # just these
    python tools/mutate.py --keep          # keep the copy (its path is printed; logs in .mutate/logs)
    python tools/mutate.py --tree DIR      # work in DIR and keep it: a later run re-syncs it and
                                           # rebuilds only what changed since
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIST = Path(__file__).resolve().parent / "mutations.toml"
BACKENDS = ("reference", "cpu", "triton", "cuda", "python")
CPP_SUFFIXES = (".h", ".hpp", ".cpp", ".cc", ".cu", ".cuh")
EXTENSION = "fastkd._C"
STATE = ".mutate"  # in the work tree: the file manifest, the build snapshot, the logs

# pytest's exit codes: 0 all passed, 1 some failed; anything else (interrupted, e.g. by a
# collection error; internal error; usage error; no tests collected) means the check did not run.
PYTEST_PASSED, PYTEST_FAILED = 0, 1


class MutationListError(Exception):
    """The list is malformed, or a snippet is not found exactly once: nothing runs."""


@dataclass
class Edit:
    original: str
    replacement: str


@dataclass
class Mutation:
    id: str
    area: str
    backend: str
    file: str
    description: str
    tests: List[str]
    k: Optional[str]
    edits: List[Edit] = field(default_factory=list)

    @property
    def is_cpp(self) -> bool:
        return self.file.endswith(CPP_SUFFIXES)

    @property
    def needs_cuda(self) -> bool:
        return self.backend == "cuda"


@dataclass
class Result:
    mutation: Mutation
    status: str  # caught | survived | invalid | timeout | not run
    seconds: float
    detail: str = ""


# -- the list ----------------------------------------------------------------------------------


def load(path: Path) -> List[Mutation]:
    """The mutations of a TOML list (``[[mutation]]`` tables); a malformed entry is an error
    naming it."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MutationListError(f"{path}: {exc}") from None
    out: List[Mutation] = []
    seen = set()
    for i, entry in enumerate(data.get("mutation", [])):
        where = f"{path.name}: mutation #{i + 1} ({entry.get('id', 'no id')})"
        missing = [k for k in ("id", "area", "backend", "file", "description", "tests") if k not in entry]
        if missing:
            raise MutationListError(f"{where}: missing {', '.join(missing)}")
        if entry["id"] in seen:
            raise MutationListError(f"{where}: the id {entry['id']!r} is used twice")
        seen.add(entry["id"])
        if entry["backend"] not in BACKENDS:
            raise MutationListError(f"{where}: backend must be one of {', '.join(BACKENDS)}, got {entry['backend']!r}")
        tests = entry["tests"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t for t in tests):
            raise MutationListError(f"{where}: tests must be a non-empty list of pytest paths or node ids")
        if "original" in entry or "replacement" in entry:
            if "edit" in entry or "original" not in entry or "replacement" not in entry:
                raise MutationListError(f"{where}: give original and replacement, or a list of [[mutation.edit]], not both")
            raw_edits = [{"original": entry["original"], "replacement": entry["replacement"]}]
        else:
            raw_edits = entry.get("edit", [])
        if not raw_edits:
            raise MutationListError(f"{where}: no edit (original and replacement)")
        edits = []
        for e in raw_edits:
            if not e.get("original") or "replacement" not in e:
                raise MutationListError(f"{where}: every edit needs a non-empty original and a replacement")
            if e["original"] == e["replacement"]:
                raise MutationListError(f"{where}: an edit's replacement equals its original")
            edits.append(Edit(e["original"], e["replacement"]))
        out.append(Mutation(entry["id"], entry["area"], entry["backend"], entry["file"], entry["description"],
                            list(tests), entry.get("k"), edits))
    if not out:
        raise MutationListError(f"{path}: no [[mutation]] entries")
    return out


def mutated_text(m: Mutation, text: str) -> str:
    """``text`` with every edit of ``m`` applied; each original must occur exactly once (in the
    text as the edits before it left it)."""
    for n, e in enumerate(m.edits, 1):
        count = text.count(e.original)
        if count != 1:
            found = "is not found" if count == 0 else f"is found {count} times"
            snippet = e.original.strip().splitlines()[0][:70]
            raise MutationListError(f"mutation {m.id}: edit {n}'s original snippet {found} in {m.file} (it begins: {snippet!r})")
        text = text.replace(e.original, e.replacement)
    return text


def check(mutations: Sequence[Mutation], root: Path) -> List[str]:
    """Every problem that keeps a mutation from applying to ``root``: a missing file, a snippet
    found zero or several times, a test path that does not exist."""
    problems = []
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            problems.append(f"mutation {m.id}: {m.file} does not exist")
            continue
        try:
            mutated_text(m, path.read_text())
        except MutationListError as exc:
            problems.append(str(exc))
        for t in m.tests:
            if not (root / t.split("::")[0]).exists():
                problems.append(f"mutation {m.id}: test path {t.split('::')[0]} does not exist")
    return problems


# -- the work tree -------------------------------------------------------------------------------


def listed_files(root: Path) -> List[str]:
    """What the copy holds: tracked and untracked-but-not-ignored files, as they are now."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sorted({p for p in out.decode().split("\0") if p and (root / p).is_file()})


def sync_tree(root: Path, tree: Path) -> int:
    """Makes ``tree`` hold ``root``'s listed files; returns how many were (re)written. Unchanged
    files keep their modification time, so that a reused tree's build redoes only what changed;
    a changed one is written with the current time (newer than any object built from it)."""
    state = tree / STATE
    state.mkdir(parents=True, exist_ok=True)
    manifest = state / "files"
    files = listed_files(root)
    previous = manifest.read_text().split("\0") if manifest.exists() else []
    for gone in set(previous) - set(files) - {""}:
        (tree / gone).unlink(missing_ok=True)
    written = 0
    for rel in files:
        src, dst = root / rel, tree / rel
        data = src.read_bytes()
        if dst.is_file() and not dst.is_symlink() and dst.read_bytes() == data:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        dst.write_bytes(data)
        shutil.copymode(src, dst)
        written += 1
    manifest.write_text("\0".join(files))
    return written


def unusable_tree(root: Path, tree: Path) -> Optional[str]:
    """Why ``tree`` cannot be the work tree for ``root``, or None."""
    if tree == root or tree in root.parents:
        return "it holds the tree it would copy"
    if root in tree.parents and subprocess.run(["git", "check-ignore", "-q", str(tree)], cwd=root).returncode != 0:
        return "inside the repository, it must be a folder git ignores (e.g. .mutate/)"
    if tree.exists() and any(tree.iterdir()) and not (tree / STATE / "files").is_file():
        return "it is not empty and was not made by this tool"
    return None


def package_dirs(tree: Path) -> Dict[str, str]:
    """pyproject's ``[tool.setuptools.package-dir]``: sub-package -> folder (e.g. fastkd.kernels ->
    kernels), where an editable install would find it."""
    pyproject = tree / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    tool = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {})
    return {k: v for k, v in tool.get("package-dir", {}).items() if k}


def top_packages(tree: Path) -> List[str]:
    pyproject = tree / "pyproject.toml"
    if not pyproject.is_file():
        return []
    tool = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {})
    return [p for p in tool.get("packages", []) if "." not in p]


def link_package_dirs(tree: Path) -> None:
    """Links each mapped folder where Python looks for the sub-package (fastkd/kernels ->
    ../kernels), so that importing the copy's package finds the copy's sub-packages."""
    for pkg, folder in package_dirs(tree).items():
        link = tree / Path(*pkg.split("."))
        target = os.path.relpath(tree / folder, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.exists() or link.is_symlink():
            raise RuntimeError(f"{link} exists and is not the link to {folder} the copy needs")
        link.symlink_to(target, target_is_directory=True)


def test_env(tree: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # No bytecode: a mutation and its revert can share a size and a modification second, and a
    # cached .pyc of the other version would then be loaded.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports(tree: Path, modules: Sequence[str]) -> None:
    """Fails unless each module imports from inside ``tree`` (not from an editable install
    pointing at the developer's tree)."""
    if not modules:
        return
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    print(m, importlib.import_module(m).__file__)"
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=tree, env=test_env(tree), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the copy's modules do not import:\n{out.stderr[-3000:]}")
    real_tree = tree.resolve()
    for line in out.stdout.splitlines():
        name, path = line.split(" ", 1)
        if real_tree not in Path(path).resolve().parents:
            raise RuntimeError(f"{name} imports from {path}, outside the copy {tree}: the tests would not see the mutations")


def host_isa(tree: Path) -> str:
    """The instruction set the copy's CPU kernels pick on this machine."""
    code = "import fastkd, torch\nprint(torch.ops.fastkd.cpu_isa())"
    env = test_env(tree)
    env.pop("FASTKD_CPU_ISA", None)  # as the tests' conftest does: they run the widest
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()[-1]


# -- the build -----------------------------------------------------------------------------------


class Build:
    """The copy's extension, built in place with setup.py (never pip: that would repoint the
    developer's editable install), and a snapshot of it to return to after each C++ mutation."""

    def __init__(self, tree: Path, cuda: bool, log_dir: Path):
        self.tree, self.cuda, self.log_dir = tree, cuda, log_dir
        self.snapshot = tree / STATE / "pristine"
        self.host_isa: Optional[str] = None  # the instruction set the CPU kernels pick here

    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        if self.cuda:
            env.pop("FASTKD_NO_CUDA", None)
        else:
            env["FASTKD_NO_CUDA"] = "1"
        return env

    def _products(self) -> List[Path]:
        """The build folder and the extension files copied in place."""
        return [self.tree / "build"] + sorted(self.tree.glob(EXTENSION.replace(".", "/") + "*.so"))

    def run(self, log_name: str) -> Tuple[bool, str]:
        """Builds (ninja redoes only what is out of date); returns (ok, log path)."""
        log = self.log_dir / f"{log_name}.log"
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--force"], cwd=self.tree,
                                  env=self._env(), stdout=fh, stderr=subprocess.STDOUT)
        return proc.returncode == 0, str(log)

    def dependents(self, source: Path) -> List[Path]:
        """The objects whose compilation read ``source`` (ninja's record of the compiler's
        dependency files)."""
        target = source.resolve()
        found = []
        for build_dir in (self.tree / "build").glob("temp*"):
            out = subprocess.run(["ninja", "-C", str(build_dir), "-t", "deps"], capture_output=True, text=True, check=True).stdout
            obj = None
            for line in out.splitlines():
                if line and not line[0].isspace() and ": #deps" in line:
                    obj = Path(line.split(": #deps")[0])
                elif line.strip() and obj is not None:
                    dep = Path(line.strip())
                    if (dep if dep.is_absolute() else build_dir / dep).resolve() == target and obj not in found:
                        found.append(obj if obj.is_absolute() else build_dir / obj)
        return found

    def rebuild_mutant(self, source: Path, log_name: str) -> Tuple[bool, str]:
        """Recompiles the objects that read ``source`` (already mutated, its modification time
        put back) and relinks. Ninja's view of what is out of date goes by modification times, so
        the objects to redo are removed instead; of those compiled once per instruction set
        (csrc/cpu/isa_*.cpp), only this CPU's is, and the others keep the unmutated code."""
        if shutil.which("ninja") is None:
            return False, "ninja is not on PATH (the rebuild goes by its dependency records)"
        objects = self.dependents(source)
        if not objects:
            return False, f"no object of the build reads {source.relative_to(self.tree)}"
        for obj in objects:
            if self.host_isa and obj.stem.startswith("isa_") and obj.stem != f"isa_{self.host_isa}":
                continue
            obj.unlink()
        return self.run(log_name)

    def take_snapshot(self) -> None:
        shutil.rmtree(self.snapshot, ignore_errors=True)
        self.snapshot.mkdir(parents=True)
        for p in self._products():
            dst = self.snapshot / p.name
            if p.is_dir():
                shutil.copytree(p, dst, symlinks=True)  # copy2: modification times kept, so ninja's
            else:  # view of what is up to date comes back with the files
                shutil.copy2(p, dst)

    def restore_snapshot(self) -> None:
        for p in self._products():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in self.snapshot.iterdir():
            dst = self.tree / p.name if p.is_dir() else self.tree / Path(*EXTENSION.split(".")[:-1]) / p.name
            shutil.copytree(p, dst, symlinks=True) if p.is_dir() else shutil.copy2(p, dst)


# -- running -------------------------------------------------------------------------------------


def run_tests(tree: Path, tests: Sequence[str], k: Optional[str], log: Path, timeout: float, stop_first: bool = True,
              selections: Optional[list] = None) -> Tuple[Optional[int], str]:
    """pytest's exit code (None on timeout) and the last line of its output. ``selections``
    (``[(tests, k), ...]``): run exactly the union of these instead (the baseline)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={tree}", *tests]
    env = test_env(tree)
    if stop_first:
        cmd.append("-x")
    if k:
        cmd += ["-k", k]
    if selections is not None:
        cmd += ["-p", "_mutate_select"]
        env["PYTHONPATH"] += os.pathsep + str(Path(__file__).resolve().parent)
        env["FASTKD_MUTATE_SELECTIONS"] = json.dumps(selections)
    with open(log, "w") as fh:
        try:
            code: Optional[int] = subprocess.run(cmd, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return code, lines[-1].strip("= ") if lines else ""


def run_one(m: Mutation, tree: Path, build: Optional[Build], logs: Path, timeout: float) -> Result:
    start = time.monotonic()
    path = tree / m.file
    original = path.read_text()
    stat = path.stat()
    try:
        path.write_text(mutated_text(m, original))
        if m.is_cpp:
            if build is None:
                return Result(m, "invalid", time.monotonic() - start, "C++ mutation, but the extension is not built here")
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # see Build.rebuild_mutant
            ok, log = build.rebuild_mutant(path, f"{m.id}.build")
            if not ok:
                return Result(m, "invalid", time.monotonic() - start, f"the mutant does not build ({log})")
        log = logs / f"{m.id}.log"
        code, last = run_tests(tree, m.tests, m.k, log, timeout)
        seconds = time.monotonic() - start
        if code is None:
            return Result(m, "timeout", seconds, f"its tests ran past {timeout:.0f} s (see {log})")
        if code == PYTEST_FAILED:
            return Result(m, "caught", seconds, last)
        if code == PYTEST_PASSED:
            return Result(m, "survived", seconds, last)
        return Result(m, "invalid", seconds, f"pytest exit code {code}: {last} (see {log})")
    finally:
        path.write_text(original)
        if m.is_cpp and build is not None:
            # The source as it was, modification time included, and the pristine objects: ninja then
            # sees nothing to redo.
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            build.restore_snapshot()


def cuda_available() -> bool:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    return out.stdout.strip() == "True"


def table(results: Sequence[Result]) -> str:
    rows = [("id", "area", "backend", "file", "result", "s", "the bug")]
    for r in results:
        m = r.mutation
        rows.append((m.id, m.area, m.backend, m.file, r.status, f"{r.seconds:.0f}", m.description))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the mutations (checked against the tree) and exit")
    ap.add_argument("--only", help="comma-separated mutation ids to run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy and print where it is")
    ap.add_argument("--tree", type=Path, help="work in this folder (kept; re-synced and rebuilt incrementally on reuse)")
    ap.add_argument("--mutations", type=Path, default=DEFAULT_LIST, help="the list (default: tools/mutations.toml)")
    ap.add_argument("--root", type=Path, default=ROOT, help="the tree to copy (default: this repository)")
    ap.add_argument("--no-build", action="store_true", help="build no extension (C++ mutations are then invalid)")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the selected tests on the unmutated copy first")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one mutation's tests may take (default 900)")
    args = ap.parse_args(argv)
    root = args.root.resolve()

    try:
        mutations = load(args.mutations)
    except MutationListError as exc:
        print(f"mutate: {exc}", file=sys.stderr)
        return 2
    problems = check(mutations, root)
    if problems:
        print("mutate: the list does not apply to this tree (fix these entries):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    if args.only:
        wanted = [i.strip() for i in args.only.split(",") if i.strip()]
        unknown = [i for i in wanted if i not in {m.id for m in mutations}]
        if unknown:
            print(f"mutate: --only names unknown mutation(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
            return 2
        mutations = [m for m in mutations if m.id in wanted]
    if args.list:
        for m in mutations:
            sel = " ".join(m.tests) + (f" -k {m.k!r}" if m.k else "")
            print(f"{m.id}  [{m.area}, {m.backend}]  {m.file}\n    {m.description}\n    tests: {sel}")
        print(f"{len(mutations)} mutations, every snippet found exactly once")
        return 0

    started = time.monotonic()
    has_cuda = any(m.needs_cuda for m in mutations) and cuda_available()
    skipped = [m for m in mutations if m.needs_cuda and not has_cuda]
    runnable = [m for m in mutations if m not in skipped]
    keep = args.keep or args.tree is not None
    if args.tree is not None:
        problem = unusable_tree(root, args.tree.resolve())
        if problem:
            print(f"mutate: --tree {args.tree}: {problem}", file=sys.stderr)
            return 2
    tree = args.tree.resolve() if args.tree else Path(tempfile.mkdtemp(prefix="fastkd-mutate-"))
    logs = tree / STATE / "logs"
    results: List[Result] = []
    try:
        n_written = sync_tree(root, tree)
        logs.mkdir(parents=True, exist_ok=True)
        link_package_dirs(tree)
        print(f"mutate: work tree {tree} ({n_written} files written)", flush=True)
        build = None
        needs_build = not args.no_build and (tree / "setup.py").is_file()
        if needs_build:
            build = Build(tree, cuda=has_cuda, log_dir=logs)
            if not has_cuda:
                # The tests (which inherit this) then know the CUDA build was skipped on purpose.
                os.environ["FASTKD_NO_CUDA"] = "1"
            print(f"mutate: building the extension ({'with' if has_cuda else 'without'} CUDA) ...", flush=True)
            t0 = time.monotonic()
            ok, log = build.run("build")
            if not ok:
                print(f"mutate: the unmutated tree does not build: see {log}", file=sys.stderr)
                return 1
            build.take_snapshot()
            print(f"mutate: built in {time.monotonic() - t0:.0f} s", flush=True)
        check_imports(tree, top_packages(tree) + list(package_dirs(tree)) + ([EXTENSION] if needs_build else []))
        if build is not None:
            # A C++ mutant is compiled into this instruction set's object only (the kernels are
            # compiled once per instruction set, and the tests run the CPU's widest by default):
            # a third of the rebuild.
            build.host_isa = host_isa(tree)

        if not args.no_baseline and runnable:
            # One run of the union of every selection: a test failing already would make its
            # mutations look caught.
            paths = list(dict.fromkeys(t for m in runnable for t in m.tests))
            selections = list(dict.fromkeys((tuple(m.tests), m.k) for m in runnable))
            print("mutate: baseline: the unmutated copy on every selected test ...", flush=True)
            t0 = time.monotonic()
            code, last = run_tests(tree, paths, None, logs / "baseline.log", args.timeout * 4, stop_first=False,
                                   selections=[list(s) for s in selections])
            if code != PYTEST_PASSED:
                print(f"mutate: the unmutated copy fails its tests ({last}); fix that first: see {logs / 'baseline.log'}",
                      file=sys.stderr)
                return 1
            print(f"mutate: baseline passed in {time.monotonic() - t0:.0f} s ({last})", flush=True)

        for n, m in enumerate(runnable, 1):
            print(f"[{n:2d}/{len(runnable)}] {m.id} ({m.backend}, {m.file}) ...", end=" ", flush=True)
            r = run_one(m, tree, build, logs, args.timeout)
            results.append(r)
            print(f"{r.status} in {r.seconds:.0f} s" + (f": {r.detail}" if r.status != "caught" and r.detail else ""), flush=True)
        results += [Result(m, "not run", 0.0, "needs a CUDA device") for m in skipped]
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"mutate: {exc}", file=sys.stderr)
        return 1
    finally:
        if keep:
            print(f"mutate: the copy is kept in {tree} (logs in {logs})")
        else:
            shutil.rmtree(tree, ignore_errors=True)

    print()
    print(table(results))
    counts = {s: sum(r.status == s for r in results) for s in ("caught", "survived", "invalid", "timeout", "not run")}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    if skipped:
        summary += " (CUDA mutations need a GPU)"
    print(f"\n{summary}; {time.monotonic() - started:.0f} s in all")
    return 0 if counts["caught"] == len(runnable) else 1


if __name__ == "__main__":
    sys.exit(main())
