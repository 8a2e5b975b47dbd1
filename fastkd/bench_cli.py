"""``fastkd bench``: the kernel microbenchmarks of ``bench/`` (installed as ``fastkd.bench``) as a
command, to decide on one's own machine whether fastkd pays for one's shapes.

    fastkd bench [--ops kd_loss,dkd_loss,...] [--quick] [--device cpu|cuda] [--dtype fp32,bf16]
                 [--shapes NxV,...] [--providers NAME,...] [--suite sweep|headline|report] [--out DIR]

It checks its arguments (a bad one stops it with one line and exit status 2), runs the
pytest-benchmark suite of ``bench/`` in a subprocess (the same code ``make bench`` runs; pytest's
own output goes to ``DIR/pytest.log``, a progress bar per case to the terminal), then writes into
``DIR``: ``results.json`` (the machine, and per op, shape, dtype and provider the fwd, bwd and
fwd+bwd times, peak extra memory, errors against the float32 composite and % of the
memory-traffic bound; the raw pytest-benchmark JSON under ``pytest_benchmark``), ``results.md``
(the tables, rendered by ``bench/report.py`` as BENCHMARKS.md is), ``<op>.png`` (time against
size per provider) and ``overview.png`` (fastkd's speed-up over ``torch.compile`` per op), and
prints a summary table. A provider that fails on a case is reported with its reason; the run goes
on. ``make bench`` is this command on BENCHMARKS.md's cases (``--suite report``), then
``python -m bench.report --from-json DIR/results.json`` rewrites BENCHMARKS.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fastkd.engine.config import ConfigError
from fastkd.ops import table

# The public fused ops (the op table's) and the bench ops (Op.name in bench/test_bench_*.py) that
# measure them: ``<stem>`` and one ``<stem>_<variant>`` per variant (kd_loss: kd, kd_jsd, ...,
# kd_ensemble). tests/test_bench_cli.py checks that these are exactly the registered ops (besides
# linear_ce, PyTorch's own op timed for scale, which is named only by its bench name).
PUBLIC_OPS: Dict[str, Tuple[str, ...]] = {
    op.name: (op.stem,) + tuple(f"{op.stem}_{variant}" for variant in op.variants) for op in table.all_ops()
}
EXTRA_BENCH_OPS = ("linear_ce",)
PUBLIC_OF = {b: p for p, bs in PUBLIC_OPS.items() for b in bs}
DEVICES = ("cpu", "cuda")
SUITES = ("sweep", "headline", "quick", "report")
_SETS = {"sweep": "sweep", "headline": "headline", "quick": "short", "report": "full"}  # conftest's --bench-set
PROVIDER_ORDER = ("eager", "compile", "fastkd-cpu", "fastkd-triton", "fastkd-cuda", "liger", "gemms")
PASSES = ("fwd", "bwd", "fwdbwd")


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench", help="run the kernel microbenchmarks on this machine (results.json, results.md, plots)",
        description="Time fastkd's fused ops against PyTorch eager and torch.compile on this machine.",
    )
    b.add_argument("--ops", default="", metavar="OP,...",
                   help="public ops (kd_loss, dkd_loss, ...; kd_loss = every divergence and an ensemble) "
                        "or bench op names (kd_jsd, ...); default: all")
    b.add_argument("--quick", action="store_true",
                   help="one shape per op (its headline; on CPU a smaller N for the logit family, "
                        "fused_linear_kd and rkd_angle), few rounds: under 5 minutes on 2 cores")
    b.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda if available, else cpu); cpu,cuda or all for both")
    b.add_argument("--dtype", default="", metavar="DT,...", help="fp32, bf16, fp16 (default: each case's own)")
    b.add_argument("--shapes", default="", metavar="NxV,...",
                   help="measure each op's headline case at these sizes instead (N rows x V classes; "
                        "B x D for relational ops, B x C*H*W for feature maps)")
    b.add_argument("--providers", default="", metavar="NAME,...",
                   help="only these providers besides the baselines eager and compile "
                        "(fastkd-cpu, fastkd-triton, fastkd-cuda, liger; gemms: a fused head's bare GEMMs)")
    b.add_argument("--suite", default=None, choices=SUITES,
                   help="which sizes: sweep (a size sweep per op; the default), quick (one shape per op: the "
                        "headline, smaller on CPU for the slowest composites; the default with --quick), "
                        "headline (each op's headline shape), report (the cases of BENCHMARKS.md: make bench)")
    b.add_argument("--out", default=None, metavar="DIR", help="output folder (default: bench-<time>/)")


# ----------------------------------------------------------------------------------------------
# Where the suite is, and its two modules the command uses (loaded by path: neither imports the
# rest of the suite, and the suite itself runs in a subprocess)
# ----------------------------------------------------------------------------------------------


def bench_dir() -> Path:
    """The suite next to the fastkd code that is running: ``fastkd/bench`` when installed,
    ``<checkout>/bench`` in a checkout (also under an editable install)."""
    import fastkd

    pkg = Path(fastkd.__file__).resolve().parent
    for cand in (pkg / "bench", pkg.parent / "bench"):
        if (cand / "conftest.py").is_file() and (cand / "common.py").is_file():
            return cand
    spec = importlib.util.find_spec("fastkd.bench")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    raise ConfigError(f"the benchmark suite (fastkd.bench) is not installed next to {pkg}; reinstall fastkd")


def _load(name: str):
    key = f"_fastkd_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, bench_dir() / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[key]


_find_spec = importlib.util.find_spec  # tests replace it to simulate a missing package


def missing_runtime() -> List[str]:
    return [name for name, mod in (("pytest", "pytest"), ("pytest-benchmark", "pytest_benchmark")) if _find_spec(mod) is None]


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    ops: List[str]  # bench op names; empty: every op of the suite
    devices: List[str]
    dtypes: List[str]
    shapes: List[Tuple[int, int]]
    providers: List[str]
    suite: str
    budget: str
    out: Path
    argv: List[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        return "fastkd bench" + "".join(" " + shlex.quote(a) for a in self.argv)


def _split(value: str) -> List[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def plan_from_args(args, argv: List[str]) -> Plan:
    """Checks every argument; a bad one raises ConfigError with one line naming it."""
    ops: List[str] = []
    for name in _split(args.ops):
        if name in PUBLIC_OPS:
            ops += [o for o in PUBLIC_OPS[name] if o not in ops]
        elif name in PUBLIC_OF or name in EXTRA_BENCH_OPS:
            ops += [name] if name not in ops else []
        else:
            raise ConfigError(f"--ops: unknown op {name!r} (known: {', '.join(PUBLIC_OPS)}; or a bench op such as kd_jsd)")
    if args.ops is not None and args.ops.strip() and not ops:
        raise ConfigError("--ops: no op given")

    import torch

    has_cuda = torch.cuda.is_available()
    devices = _split(args.device) if args.device is not None else []
    if args.device is not None and not devices:
        raise ConfigError("--device: no device given (cpu or cuda)")
    if not devices:
        devices = ["cuda" if has_cuda else "cpu"]
    elif devices == ["all"]:
        devices = ["cpu"] + (["cuda"] if has_cuda else [])
    for device in devices:
        if device not in DEVICES:
            raise ConfigError(f"--device: unknown device {device!r} (cpu or cuda)")
        if device == "cuda" and not has_cuda:
            raise ConfigError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    devices = list(dict.fromkeys(devices))

    common = _load("common")
    dtypes = _split(args.dtype)
    for d in dtypes:
        if d not in common.DTYPES:
            raise ConfigError(f"--dtype: unknown dtype {d!r} (known: {', '.join(common.DTYPES)})")
    shapes = []
    for text in (args.shapes.split(",") if args.shapes else []):
        try:
            shapes.append(common.parse_shape(text))
        except ValueError as exc:
            raise ConfigError(f"--shapes: {exc}") from None
    providers = _split(args.providers)
    for p in providers:
        if p not in common.PROVIDER_BY_NAME:
            raise ConfigError(f"--providers: unknown provider {p!r} (known: {', '.join(common.PROVIDER_BY_NAME)})")

    suite = args.suite or ("quick" if args.quick else "sweep")
    budget = "short" if args.quick else "full"
    out = (Path(args.out) if args.out else Path(f"bench-{time.strftime('%Y%m%d-%H%M%S')}")).absolute()
    if (out / "results.json").exists():
        raise ConfigError(f"--out {out}: the folder already holds a run (results.json); choose another")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: not a folder")
    missing = missing_runtime()
    if missing:
        raise ConfigError(
            f"fastkd bench needs {' and '.join(missing)}, not installed here: "
            "pip install pytest pytest-benchmark (or pip install 'fastkd[bench]')"
        )
    return Plan(ops, devices, dtypes, shapes, providers, suite, budget, out, list(argv))


# ----------------------------------------------------------------------------------------------
# Running the suite
# ----------------------------------------------------------------------------------------------


def pytest_command(plan: Plan, json_path: Path) -> List[str]:
    cmd = [
        sys.executable, "-m", "pytest", str(bench_dir()), "--benchmark-only", f"--benchmark-json={json_path}",
        "-p", "no:cacheprovider", "-q", "-rs", "--bench-progress",
        f"--bench-set={_SETS[plan.suite]}", f"--bench-budget={plan.budget}",
        f"--bench-devices={','.join(plan.devices)}",
    ]
    if plan.ops:
        cmd.append(f"--bench-ops={','.join(plan.ops)}")
    if plan.shapes:
        cmd.append(f"--bench-shapes={','.join(f'{n}x{v}' for n, v in plan.shapes)}")
    if plan.dtypes:
        cmd.append(f"--bench-dtypes={','.join(plan.dtypes)}")
    if plan.providers:
        cmd.append(f"--bench-providers={','.join(plan.providers)}")
    return cmd


def run(args, argv: List[str]) -> int:
    plan = plan_from_args(args, argv)
    plan.out.mkdir(parents=True, exist_ok=True)
    json_path = plan.out / "pytest-benchmark.json"
    log_path = plan.out / "pytest.log"
    cmd = pytest_command(plan, json_path)
    what = f"{len(plan.ops)} ops" if plan.ops else "every op"
    print(f"fastkd bench: {what}, {plan.suite} sizes, {'+'.join(plan.devices)}, "
          f"{'few rounds (--quick)' if plan.budget == 'short' else 'full rounds'}; output in {plan.out}/", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("+ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=plan.out, env=env, stdout=log, stderr=None).returncode
    elapsed = time.time() - t0
    if not json_path.exists():
        lines = log_path.read_text(errors="replace").strip().splitlines()
        errors = [x for x in lines if x.startswith(("E ", "ERROR", "INTERNALERROR"))]
        why = (errors or lines or ["(empty log)"])[-1].lstrip("E ").strip()
        print(f"fastkd bench: the benchmark run stopped before writing results (pytest exit code {rc}): "
              f"{why}; see {log_path}", file=sys.stderr)
        return 1
    data = json.loads(json_path.read_text())
    json_path.unlink()  # kept inside results.json
    try:
        (plan.out / ".benchmarks").rmdir()  # pytest-benchmark's storage folder, left empty
    except OSError:
        pass

    report = _load("report")
    analysed = report.analyse(data)
    results = reduce_results(plan, data, analysed, elapsed, rc)
    plots = write_plots(plan.out, results)
    results["plots"] = [p.name for p in plots]
    (plan.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    summary = summary_markdown(results)
    md = report.render(data, plan.command, elapsed, gpu_static=False)
    head, _, rest = md.partition("\n## Machine")
    (plan.out / "results.md").write_text(head + "\n" + summary + "\n## Machine" + rest + "\n")

    print()
    print(summary_text(results))
    print(f"\nfastkd bench: {elapsed / 60:.1f} min; wrote {plan.out}/results.json, results.md and "
          f"{len(plots)} plots ({', '.join(p.name for p in plots[:3])}{', ...' if len(plots) > 3 else ''}); "
          f"pytest's log: {log_path}")
    if rc not in (0, 1):  # 1: some benchmark raised, reported above; anything else: pytest itself failed
        print(f"fastkd bench: pytest exit code {rc}; the results hold what was measured (see {log_path})", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# results.json
# ----------------------------------------------------------------------------------------------


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else x * 1e3


def reduce_results(plan: Plan, data: Dict, analysed: Dict, elapsed: float, rc: int) -> Dict:
    notes = data.get("fastkd", {})
    machine = dict(notes.get("machine") or {})
    machine["loadavg_start"] = machine.pop("loadavg", None)
    machine["loadavg_end"] = notes.get("loadavg_end")
    machine["gpu"] = machine.pop("cuda", None)
    machine["cpu_isa"] = (machine.get("fastkd") or {}).get("cpu_isa")

    problems: Dict[Tuple[str, str], Dict[str, Dict[str, str]]] = {}
    for kind in ("unavailable", "failed"):
        for key, reason in (notes.get(kind) or {}).items():
            case, prov, pass_ = key.split("|")
            problems.setdefault((case, prov), {}).setdefault(kind, {})[pass_] = reason

    infos = dict(notes.get("case_info") or {})
    infos.update({name: c["info"] for name, c in analysed["cases"].items()})
    rows = []
    for name in list(dict.fromkeys(list(notes.get("cases", [])) + list(analysed["cases"]))):
        c = analysed["cases"].get(name)
        info = infos.get(name)
        provs = dict(c["providers"]) if c else {}
        for (case, prov) in problems:
            if case == name and prov not in provs:
                provs[prov] = None
        if info is None:
            continue
        for prov in sorted(provs, key=lambda p: (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else 99, p)):
            rec = provs[prov] or {}
            prob = problems.get((name, prov), {})
            row = {
                "op": info["op"], "public_op": PUBLIC_OF.get(info["op"], info["op"]), "title": info["title"],
                "case": name, "n": info["n"], "v": info["v"], "shape": f"{info['n']}x{info['v']}",
                "dtype": info["dtype"], "device": info["device"], "params": info.get("params", {}),
                "headline": bool(info.get("headline")), "provider": prov,
                "provider_title": rec.get("title") or getattr(_load("common").PROVIDER_BY_NAME.get(prov), "title", None),
            }
            for p in PASSES:
                r = rec.get(p)
                row[p] = None if r is None else {
                    "median_ms": _ms(r["median"]), "iqr_ms": _ms(r["stats"]["iqr"]), "min_ms": _ms(r["min"]),
                    "max_ms": _ms(r["stats"]["max"]), "rounds": r["stats"]["rounds"],
                    "pct_bound": r.get("pct_bound"), "bound_ms": _ms(c["bound_s"].get(p)),
                    "bound_units": r["extra"].get("bound_units"),
                    "speedup_eager": r.get("speedup_eager"), "speedup_compile": r.get("speedup_compile"),
                }
            ex = ((rec.get("fwdbwd") or {}).get("extra")) or {}
            probes = [x for x in (ex.get("peak_alloc_bytes"), ex.get("peak_rss_bytes")) if x is not None]
            row["peak_extra_bytes"] = max(probes) if probes else None
            row["peak_extra_units"] = (max(probes) / info["unit_bytes"]) if probes else None
            row["peak_alloc_units"] = ex.get("peak_alloc_units")
            row["peak_rss_units"] = ex.get("peak_rss_units")
            chk = ex.get("check") or {}
            row["loss_rel_err"] = chk.get("loss_rel_err")
            row["grad_rel_err"] = chk.get("grad_rel_err")
            row["check_ok"] = chk.get("ok")
            measured = any(row[p] for p in PASSES)
            if prob.get("failed"):
                row["status"] = "failed"
                by_reason: Dict[str, List[str]] = {}
                for p, why in prob["failed"].items():
                    by_reason.setdefault(why, []).append(_pass_name(p))
                row["reason"] = "; ".join(f"{', '.join(ps)}: {why}" for why, ps in by_reason.items())
            elif prob.get("unavailable") and not measured:
                row["status"] = "unavailable"
                row["reason"] = next(iter(prob["unavailable"].values()))
            else:
                row["status"] = "ok"
                row["reason"] = None
            rows.append(row)
    return {
        "schema": "fastkd-bench/1",
        "command": plan.command,
        "elapsed_s": elapsed,
        "pytest_exit_code": rc,
        "selection": {
            "suite": plan.suite, "budget": plan.budget, "devices": plan.devices, "ops": plan.ops or "all",
            "dtypes": plan.dtypes or "as registered", "shapes": [f"{n}x{v}" for n, v in plan.shapes] or "as registered",
            "providers": plan.providers or "all",
        },
        "machine": machine,
        "bandwidth_bytes_per_s": analysed["bandwidth"],
        "peers": notes.get("peers", {}),
        "results": rows,
        "targets": [
            {k: t[k] for k in ("case", "provider", "label", "metric", "value", "value_min", "status", "why")}
            for t in _load("report").evaluate_targets(analysed)
        ],
        "pytest_benchmark": data,
    }


def _pass_name(p: str) -> str:
    return {"fwdbwd": "fwd+bwd"}.get(p, p)


# ----------------------------------------------------------------------------------------------
# Summary (terminal and results.md)
# ----------------------------------------------------------------------------------------------


def _providers_in(results: Dict) -> List[str]:
    seen = list(dict.fromkeys(r["provider"] for r in results["results"]))
    return sorted(seen, key=lambda p: (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else 99, p))


def summary_rows(results: Dict):
    provs = _providers_in(results)
    by_case: Dict[str, Dict[str, Dict]] = {}
    for r in results["results"]:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    header = ["op", "shape", "dtype", "device"] + provs + ["fastkd vs compile"]
    rows = []
    for case, recs in by_case.items():
        any_r = next(iter(recs.values()))
        cells = [any_r["op"], any_r["shape"], any_r["dtype"], any_r["device"]]
        for p in provs:
            r = recs.get(p)
            if r is None:
                cells.append("")
            elif r["status"] == "failed" and not r["fwdbwd"]:
                cells.append("failed")
            elif r["fwdbwd"]:
                cells.append(f"{r['fwdbwd']['median_ms']:.3g}" + ("*" if r["status"] == "failed" else ""))
            else:
                cells.append("n/a")
        best = [r["fwdbwd"]["speedup_compile"] for p, r in recs.items()
                if p.startswith("fastkd-") and r["fwdbwd"] and r["fwdbwd"].get("speedup_compile")]
        cells.append(f"{max(best):.2f}×" if best else "n/a")
        rows.append(cells)
    return header, rows


def _notes_lines(results: Dict, peers: bool = True) -> List[str]:
    lines = []
    for r in results["results"]:
        if r["status"] == "failed":
            lines.append(f"{r['provider']} failed on {r['case']}: {r['reason']}")
    unavailable: Dict[Tuple[str, str], List[str]] = {}
    for r in results["results"]:
        if r["status"] == "unavailable":
            unavailable.setdefault((r["provider"], r["reason"]), []).append(r["case"])
    for (prov, reason), cases in unavailable.items():
        lines.append(f"{prov} not measured on {len(cases)} case{'s' if len(cases) > 1 else ''} ({cases[0]}"
                     f"{', ...' if len(cases) > 1 else ''}): {reason}")
    for peer in (results.get("peers", {}) if peers else {}).values():
        lines.append(f"Peer library: {peer['line']}")
    return lines


def summary_text(results: Dict) -> str:
    header, rows = summary_rows(results)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i >= 4 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = ["fwd+bwd median, ms (lower is better); last column: the best fastkd backend's speed-up over torch.compile",
           fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(r) for r in rows]
    out += [""] + _notes_lines(results) if _notes_lines(results) else []
    return "\n".join(out)


def summary_markdown(results: Dict) -> str:
    header, rows = summary_rows(results)
    L = ["## Summary", "",
         "Forward+backward medians in ms (lower is better); the last column is the best fastkd backend's "
         "speed-up over `torch.compile`. A `*` marks a provider that failed on one of the passes. Every "
         "pass, the memory and the errors are in the sections below and in `results.json`.", ""]
    L.append("| " + " | ".join(header) + " |")
    L.append("|" + "---|" * len(header))
    L += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    L.append("")
    for line in _notes_lines(results, peers=False):  # the report below says it
        L.append(f"- {line}")
    if results.get("plots"):
        L += ["", "![fastkd's speed-up over torch.compile](overview.png)", ""]
        L.append("Per op, time against size: " + ", ".join(f"[{p}]({p})" for p in results["plots"] if p != "overview.png") + ".")
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

_AXES = {
    "hint": ("B (batch)", "C·H·W"), "attention_transfer": ("B (batch)", "C·H·W"),
    "rkd_distance": ("B (batch)", "D (width)"), "rkd_angle": ("B (batch)", "D (width)"),
    "sp": ("B (batch)", "D (width)"), "pkt": ("B (batch)", "D (width)"),
}


def _colour(provider: str) -> str:
    return {"eager": "tab:gray", "compile": "tab:orange", "fastkd-cpu": "tab:blue", "fastkd-triton": "tab:green",
            "fastkd-cuda": "tab:purple", "liger": "tab:red"}.get(provider, "tab:brown")


def write_plots(out: Path, results: Dict) -> List[Path]:
    """``<op>.png`` per op (time against size per provider; a bar per pass and provider when the op
    was measured at one size) and ``overview.png``; nothing (and one line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"fastkd bench: no plots ({type(exc).__name__}: {exc})", file=sys.stderr)
        return []
    m = results["machine"]
    devices = results["selection"]["devices"]
    where = " / ".join(str(m.get("gpu") if d == "cuda" else m.get("cpu_model")) for d in devices)
    stamp = f"{'+'.join(devices)}: {where}, {m.get('date_utc', '')[:10]}"
    # With several devices, the baselines appear once per device: name them with it.
    who = (lambda r: r["provider"]) if len(devices) == 1 else (lambda r: f"{r['provider']} ({r['device']})")
    written = []
    ok = [r for r in results["results"] if r["fwdbwd"]]
    for op in dict.fromkeys(r["op"] for r in ok):
        rows = [r for r in ok if r["op"] == op]
        sizes = sorted({(r["n"], r["v"]) for r in rows})
        fig, ax = plt.subplots(figsize=(7, 4.2))
        if len(sizes) == 1:
            title = f"{rows[0]['title']}\n{stamp}"
        else:  # the op, its params, not one size
            params = ", ".join(f"{k}={v}" for k, v in rows[0]["params"].items() if k not in ("C", "H", "W"))
            title = f"{op} ({rows[0]['public_op']}{', ' + params if params else ''})\n{stamp}"
        if len(sizes) == 1:
            provs = list(dict.fromkeys(who(r) for r in rows))
            dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
            width = 0.8 / (len(dtypes) * 3)
            for i, p in enumerate(provs):
                for j, dt in enumerate(dtypes):
                    r = next((x for x in rows if who(x) == p and x["dtype"] == dt), None)
                    if r is None:
                        continue
                    for k, pas in enumerate(PASSES):
                        val = (r[pas] or {}).get("median_ms")
                        if val is None:
                            continue
                        x = i + (j * 3 + k - (len(dtypes) * 3 - 1) / 2) * width
                        ax.bar(x, val, width, color=_colour(r["provider"]), alpha=(0.45, 0.7, 1.0)[k],
                               label=f"{_pass_name(pas)}" + (f" {dt}" if len(dtypes) > 1 else "") if i == 0 else None)
            ax.set_xticks(range(len(provs)), provs)
            ax.set_ylabel("median time, ms")
            ax.set_yscale("log")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8, title="pass (shade)", title_fontsize=8)
        else:
            n_vary = len({n for n, _ in sizes}) > 1
            v_vary = len({v for _, v in sizes}) > 1
            xn, xv = _AXES.get(op, ("N (rows)", "V (classes)"))
            xlabel = xn if n_vary and not v_vary else xv if v_vary and not n_vary else f"{xn} × {xv}"
            key = (lambda r: r["n"]) if n_vary and not v_vary else (lambda r: r["v"]) if v_vary and not n_vary else (lambda r: r["n"] * r["v"])
            styles = ["-", "--", ":", "-."]
            dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
            for p in dict.fromkeys(who(r) for r in rows):
                for j, dt in enumerate(dtypes):
                    mine = [r for r in rows if who(r) == p and r["dtype"] == dt]
                    if not mine:
                        continue
                    xs, ys, es = zip(*sorted((key(r), r["fwdbwd"]["median_ms"], r["fwdbwd"]["iqr_ms"] / 2) for r in mine))
                    ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, ls=styles[j % 4], color=_colour(mine[0]["provider"]),
                                label=p + (f" {dt}" if len(dtypes) > 1 else ""))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel + (f" (other dimension fixed at {sizes[0][0] if v_vary and not n_vary else sizes[0][1]})" if n_vary != v_vary else ""))
            ax.set_ylabel("forward+backward, median ms")
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    overview = _overview(plt, out, results, stamp)
    if overview:
        written.insert(0, overview)
    return written


def _overview(plt, out: Path, results: Dict, stamp: str) -> Optional[Path]:
    """fastkd's forward+backward speed-up over torch.compile, per op and fastkd backend, at each
    op's headline case where measured (else its largest size), in the first dtype measured."""
    bars = []  # (label, provider, speed-up)
    for op in dict.fromkeys(r["op"] for r in results["results"]):
        rows = [r for r in results["results"] if r["op"] == op and r["fwdbwd"]]
        if not rows:
            continue
        dtype = rows[0]["dtype"]
        rows = [r for r in rows if r["dtype"] == dtype]
        heads = [r for r in rows if r["headline"]]
        pick = heads or [r for r in rows if r["n"] * r["v"] == max(x["n"] * x["v"] for x in rows)]
        shape = pick[0]["shape"]
        for r in pick:
            if r["provider"].startswith("fastkd-") and r["fwdbwd"].get("speedup_compile"):
                bars.append((f"{op}\n{shape}", r["provider"], r["fwdbwd"]["speedup_compile"]))
    if not bars:
        return None
    labels = list(dict.fromkeys(b[0] for b in bars))
    provs = list(dict.fromkeys(b[1] for b in bars))
    width = 0.8 / len(provs)
    fig, ax = plt.subplots(figsize=(max(7, 0.75 * len(labels) + 2), 4.5))
    for j, p in enumerate(provs):
        xs, ys = [], []
        for i, lab in enumerate(labels):
            v = next((b[2] for b in bars if b[0] == lab and b[1] == p), None)
            if v is not None:
                xs.append(i + (j - (len(provs) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width, color=_colour(p), label=p)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}×", (x, y), ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over torch.compile\n(forward+backward medians)")
    shown = re.sub(r"\s--out(\s+|=)\S+", "", results["command"])  # where it was written says nothing
    ax.set_title(f"fastkd vs torch.compile, {stamp}\n{shown}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = out / "overview.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
