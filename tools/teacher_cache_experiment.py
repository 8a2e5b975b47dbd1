"""The teacher cache measured on the language-model job: students distilled from top-K caches
(and a sampled one) against the online teacher, and the wall time of a student run with and
without the teacher in the loop.

``python tools/teacher_cache_experiment.py run [--out DIR] [--top-k 8 32 128] [--sample 32]
[--renormalize 8 32] [--jobs N] [--save FILE]`` runs, with the shipped language-model job
(``fastkd distill --data lm``):

1. the online job (teacher trained, then baseline and KD students with the teacher in the loop);
2. ``fastkd cache-teacher`` at each K (the first trains the teacher, exactly as the online job
   does: same seed, batches and epochs; the others reuse it);
3. ``fastkd distill --teacher-cache`` from each cache (the students' phase alone, on the same
   batches from the same initialisation as the online job's students), with the tail that
   reads it as written (top-k log-probabilities: ``uniform``), and, for the top-K caches named
   by ``--renormalize``, once more with ``tail = "renormalize"`` (the kept entries as the whole
   distribution).

It then collects every run into one JSON (``--save``; ``bench/measured/teacher-cache-<date>.json``
is what ``make bench`` renders into BENCHMARKS.md with ``bench.report --cache-runs``).
``collect DIR --save FILE`` collects a finished ``run`` folder again. ``--jobs 2`` runs two jobs at
a time (quicker, and each job's wall time then includes sharing the machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent


def _cache_name(kind: str, k: int) -> str:
    return f"{'top' if kind == 'top_k' else 'sample'}{k}"


def _fastkd(out: Path, log: str, *args) -> Dict:
    """One fastkd command, its output kept in ``out/<log>.log``; returns its wall time and status."""
    started = time.perf_counter()
    with open(out / f"{log}.log", "w") as f:
        rc = subprocess.call([sys.executable, "-m", "fastkd", *map(str, args)], cwd=out, stdout=f, stderr=subprocess.STDOUT)
    seconds = round(time.perf_counter() - started, 2)
    print(f"  {log}: exit {rc}, {seconds:.0f} s", flush=True)
    return {"command": "fastkd " + " ".join(map(str, args)), "rc": rc, "seconds": seconds}


def run(out: Path, top_k: List[int], sample: List[int], renormalize: List[int], jobs: int) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    caches = [("top_k", k) for k in top_k] + [("sample", k) for k in sample]
    if not caches:
        raise SystemExit("teacher_cache_experiment: nothing to measure (no --top-k and no --sample)")
    teacher = f"{_cache_name(*caches[0])}-teacher"
    commands: Dict[str, Dict] = {}

    def job(name: str, *args) -> None:
        # The run's folder, its log and its entry in commands.json share the name.
        commands[name] = _fastkd(out, name, *args)

    def write_caches() -> None:
        # The first cache trains the teacher; the others reuse it.
        for i, (kind, k) in enumerate(caches):
            name = _cache_name(kind, k)
            job(f"cache-{name}", "cache-teacher", "--data", "lm", "--top-k" if kind == "top_k" else "--sample", k,
                "--out", name, *(["--teacher-out", teacher] if i else []))

    distill = ("distill", "--data", "lm", "--no-progress")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for f in [pool.submit(job, "online", *distill, "--out", "online"), pool.submit(write_caches)]:
            f.result()
        futures = [pool.submit(job, f"from-{n}", *distill, "--teacher-cache", n, "--out", f"from-{n}")
                   for n in (_cache_name(*c) for c in caches)]
        futures += [pool.submit(job, f"renormalize-{n}", *distill, "--teacher-cache", n, "--out", f"renormalize-{n}",
                                "--set", 'loss.0.tail="renormalize"')
                    for n in (_cache_name("top_k", k) for k in renormalize if k in top_k)]
        for f in futures:
            f.result()
    (out / "commands.json").write_text(json.dumps({"jobs": jobs, "commands": commands}, indent=1))
    return collect(out)


def _git() -> Dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    return {"git_commit": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _kept_mass(directory: Path) -> float:
    """The teacher's probability mass a top-K log-probability cache keeps, averaged over its
    rows: what the uniform tail has to stand in for is the rest."""
    import torch

    from fastkd.teacher_cache import TeacherCache

    cache = TeacherCache(directory)
    total = 0.0
    for start in range(0, cache.tokens, 1 << 16):
        _, values = cache.rows(start, min(cache.tokens, start + (1 << 16)))
        total += float(values.double().exp().sum())
    return round(total / cache.tokens, 4)


def _student(run: Optional[Dict]) -> Optional[Dict]:
    if run is None:
        return None
    return {"models": run["models"], "phase_wall_s": run.get("phase_wall_s"), "wall_time_s": run["wall_time_s"],
            "training": run["training"], "tail": run["teacher_cache"].get("tail"),
            "reference": run["teacher_cache"].get("reference")}


def collect(out: Path) -> Dict:
    """Every run of a ``run`` folder as one record."""
    def load(p: Path) -> Optional[Dict]:
        return json.loads(p.read_text()) if p.is_file() else None

    meta = load(out / "commands.json") or {"jobs": None, "commands": {}}
    online = load(out / "online" / "summary.json")
    if online is None:
        raise SystemExit(f"teacher_cache_experiment: {out}/online/summary.json is missing: the online job did not finish")
    record = {
        "what": "the language-model job (configs/lm.toml) distilled online and from teacher caches",
        "machine": {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), **_git()},
        "jobs": meta["jobs"],
        "online": {"models": online["models"], "phase_wall_s": online.get("phase_wall_s"),
                   "wall_time_s": online["wall_time_s"], "training": online["training"],
                   "seconds": meta["commands"].get("online", {}).get("seconds")},
        "caches": [],
    }
    for manifest_path in sorted(out.glob("*/manifest.json")):
        name = manifest_path.parent.name
        manifest = json.loads(manifest_path.read_text())
        spec = manifest["spec"]
        size = sum(p.stat().st_size for p in manifest_path.parent.iterdir() if p.is_file())
        run = load(out / f"from-{name}" / "summary.json")
        kept = _kept_mass(manifest_path.parent) if spec.get("selection", "top_k") == "top_k" and spec["values"] == "logprobs" else None
        renormalized = load(out / f"renormalize-{name}" / "summary.json")
        record["caches"].append({
            "name": name, "selection": spec.get("selection", "top_k"), "top_k": spec["top_k"], "values": spec["values"],
            "value_dtype": spec["value_dtype"], "tokens": spec["tokens"], "bytes": size,
            "bytes_per_token": round(size / spec["tokens"], 3),
            "write": manifest.get("info", {}).get("write"),
            "kept_mass": kept,
            "cache_teacher_seconds": meta["commands"].get(f"cache-{name}", {}).get("seconds"),
            "student": _student(run),
            "student_renormalize": _student(renormalized),
        })
    record["caches"].sort(key=lambda c: (c["selection"] != "top_k", c["top_k"]))
    return record


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/teacher_cache_experiment.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the online job, the caches and the students distilled from them")
    r.add_argument("--out", default=".bench/teacher-cache", help="folder of the runs (default .bench/teacher-cache)")
    r.add_argument("--top-k", type=int, nargs="*", default=[8, 32, 128])
    r.add_argument("--sample", type=int, nargs="*", default=[32])
    r.add_argument("--renormalize", type=int, nargs="*", default=[8, 32],
                   help="top-K caches distilled from a second time with tail = 'renormalize'")
    r.add_argument("--jobs", type=int, default=1, help="jobs at a time (default 1: undisturbed wall times)")
    r.add_argument("--save", help="write the collected record here (e.g. bench/measured/teacher-cache-<date>.json)")
    c = sub.add_parser("collect", help="collect a finished run folder")
    c.add_argument("out")
    c.add_argument("--save", required=True)
    for p in (r, c):
        p.add_argument("--note", default="", help="a line kept with the record (e.g. what code the runs used)")
    args = ap.parse_args(argv)
    if args.command == "run":
        if Path(args.out).exists() and any(Path(args.out).iterdir()):
            raise SystemExit(f"teacher_cache_experiment: {args.out} is not empty (its runs would be refused): choose another --out")
        record = run(Path(args.out), args.top_k, args.sample, args.renormalize, args.jobs)
    else:
        record = collect(Path(args.out))
    if args.note:
        record["note"] = args.note
    text = json.dumps(record, indent=1) + "\n"
    if args.save:
        Path(args.save).write_text(text)
        print(f"teacher_cache_experiment: wrote {args.save}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
