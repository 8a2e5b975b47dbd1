"""Run the benchmarks and write BENCHMARKS.md from what they measured.

    python -m bench.report                      # full run (~10 min on 2 cores), writes BENCHMARKS.md
    python -m bench.report --quick --out /tmp/x.md    # tiny shapes, seconds: a smoke test
    python -m bench.report --from-json run.json       # re-render a saved run, no measuring
    python -m bench.report --no-gpu-static            # without the "GPU kernels, statically" section
    python -m bench.report --from-json DIR/results.json --gpu-static   # from a `fastkd bench` run (make bench)

BENCHMARKS.md's layout: a summary per op (the committed GPU run and this run), the GPU sections
(the committed runs of ``bench/measured/``, the static check's verdict), then this run's sections
(machine, memory system, targets, per case), the teacher-cache runs and the method. The long
generated tables go to side files (:func:`side_files`): the static check's per-kernel tables and
the raw statistics of every benchmark.

The measurements are the pytest-benchmark suite in ``bench/`` (one ``test_bench_<op>.py`` per
op, run in a subprocess with ``--benchmark-json``); this module only reads that JSON and does
arithmetic on it. Everything it says about an op (its composite, its traffic, its targets) comes
from the run's own records. Nothing in BENCHMARKS.md is typed by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent

METRIC_FMT = {
    "speedup_compile": lambda x: f"{x:.2f}×",
    "speedup_eager": lambda x: f"{x:.2f}×",
    "pct_bound": lambda x: f"{x:.1f} %",
    "peak_units": lambda x: f"{x:.2f} × N·V",
    "peak_ratio_eager": lambda x: f"{x:.1f}× less",
    "time_ratio_eager": lambda x: f"{x:.2f}×",
    "time_ratio_gemms": lambda x: f"{x:.2f}× the bare GEMMs'",
}


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def run_suite(json_path: Path, quick: bool, extra: List[str]) -> int:
    cmd = [
        sys.executable, "-m", "pytest", "bench/", "--benchmark-only", f"--benchmark-json={json_path}",
        "-p", "no:cacheprovider", "-q", "-rs",
    ]
    cmd += ["--bench-quick"] if quick else []
    cmd += extra
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def _gpu_static_module():
    # Loaded from its file: the checker is a tool of the source checkout (tools/), not of the
    # installed package, and its import does not need torch (re-rendering a saved JSON must not).
    name = "_fastkd_gpu_static"
    if name not in sys.modules:
        path = ROOT / "tools" / "gpu_static.py"
        if not path.exists():
            raise RuntimeError(f"{path} is not here: the static GPU check runs from a source checkout of fastkd")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_gpu_static(data: Dict) -> None:
    """Adds the static GPU report (``tools/gpu_static.py``) to the run's data, or why it failed."""
    print("+ python tools/gpu_static.py (GPU kernels compiled for sm_80/sm_90, resources)", flush=True)
    try:
        data["gpu_static"] = _gpu_static_module().collect()
    except Exception as exc:  # noqa: BLE001 - the measured results are still worth writing
        msg = str(exc).strip().splitlines()
        data["gpu_static_error"] = f"{type(exc).__name__}: {msg[0] if msg else ''}"
        print(f"bench.report: the static GPU check failed: {exc}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Arithmetic on the JSON
# ----------------------------------------------------------------------------------------------


PASS_NAMES = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd+bwd"}


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 1e-3 else f"{seconds * 1e3:.1f}"


def _gbs(bytes_per_s: Optional[float]) -> str:
    return "n/a" if bytes_per_s is None else f"{bytes_per_s / 1e9:.1f} GB/s"


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.1f} %"


def _units(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _peak(r: Optional[Dict]) -> Optional[float]:
    """A pass's peak extra memory in N·V units: the larger of the two probes (fwd+bwd only)."""
    extra = (r or {}).get("extra", {})
    probes = [x for x in (extra.get("peak_alloc_units"), extra.get("peak_rss_units")) if x is not None]
    return max(probes) if probes else None


def analyse(data: Dict) -> Dict:
    benches = data["benchmarks"]
    notes = data.get("fastkd", {})

    # Memory system: best copy bandwidth of the run (highest = smallest, i.e. strictest, bound).
    memsys = defaultdict(dict)
    calibration = []
    for b in benches:
        ei = b.get("extra_info", {})
        if ei.get("kind") in ("copy", "write_warm", "write_fresh"):
            key = ei["kind"] + (f"_{ei['when']}" if ei["kind"] == "copy" else "")
            memsys[ei["device"]][key] = {
                "bytes": ei["bytes_moved"],
                "min": b["stats"]["min"],
                "median": b["stats"]["median"],
                "rounds": b["stats"]["rounds"],
                "bw": ei["bytes_moved"] / b["stats"]["min"],
                "bw_median": ei["bytes_moved"] / b["stats"]["median"],
                "buffer_bytes": ei.get("buffer_bytes", ei["bytes_moved"]),
            }
            calibration += ei.get("memory_calibration", [])
            thp = ei.get("fresh_write_thp")
            if thp and "min" in thp:
                memsys[ei["device"]]["write_fresh_thp"] = {
                    "bytes": thp["bytes"], "buffer_bytes": thp["bytes"], "min": thp["min"],
                    "median": thp["median"], "rounds": thp["rounds"],
                    "bw": thp["bytes"] / thp["min"], "bw_median": thp["bytes"] / thp["median"],
                }
    bandwidth = {}
    first_touch = {}  # device -> extra seconds per byte to write fresh pages
    for dev, probes in memsys.items():
        copies = [p["bw"] for k, p in probes.items() if k.startswith("copy")]
        bandwidth[dev] = max(copies) if copies else None
        warm, fresh = probes.get("write_warm"), probes.get("write_fresh")
        if warm and fresh:
            first_touch[dev] = max(0.0, fresh["min"] / fresh["bytes"] - warm["min"] / warm["bytes"])

    # Op results: case -> provider -> pass -> record
    cases: Dict[str, Dict] = {}
    for b in benches:
        ei = b.get("extra_info", {})
        if ei.get("kind") != "op":
            continue
        c = cases.setdefault(ei["case"], {"info": ei, "providers": {}})
        c["providers"].setdefault(ei["provider"], {"title": ei["provider_title"]})[ei["pass_"]] = {
            "stats": b["stats"],
            "extra": ei,
        }

    for name, c in cases.items():
        info = c["info"]
        bw = bandwidth.get(info["device"])
        c["bound_s"] = {}
        for rec in c["providers"].values():
            for pass_ in ("fwd", "bwd", "fwdbwd"):
                r = rec.get(pass_)
                if r is None:
                    continue
                bound = r["extra"]["bound_bytes"] / bw if bw else None
                c["bound_s"][pass_] = bound
                r["median"] = r["stats"]["median"]
                r["min"] = r["stats"]["min"]
                r["half_iqr"] = r["stats"]["iqr"] / 2
                r["pct_bound"] = None if bound is None else 100.0 * bound / r["median"]
                r["pct_bound_min"] = None if bound is None else 100.0 * bound / r["min"]
        for prov, rec in c["providers"].items():
            for pass_ in ("fwd", "bwd", "fwdbwd"):
                r = rec.get(pass_)
                if r is None:
                    continue
                # gemms: a fused head's bare GEMMs, its time bound (time_ratio_gemms)
                for base in ("eager", "compile", "gemms"):
                    b = c["providers"].get(base, {}).get(pass_)
                    r[f"speedup_{base}"] = b["median"] / r["median"] if b else None
                    r[f"speedup_{base}_min"] = b["min"] / r["min"] if b else None
                    r[f"time_ratio_{base}"] = r["median"] / b["median"] if b else None
                    r[f"time_ratio_{base}_min"] = r["min"] / b["min"] if b else None
                    mine, theirs = _peak(r), _peak(b) if b else None
                    r[f"peak_ratio_{base}"] = theirs / mine if mine and theirs else None
    # Unavailable (the provider cannot run such a case) or failed (it raised on this one):
    # case|provider|pass -> reason; fold passes that share a reason.
    unavailable: Dict[str, Dict[str, str]] = defaultdict(dict)
    for key, reason in notes.get("unavailable", {}).items():
        case, prov, pass_ = key.split("|")
        unavailable[case].setdefault(prov, reason)
    for key, reason in notes.get("failed", {}).items():
        case, prov, pass_ = key.split("|")
        unavailable[case].setdefault(prov, f"failed ({PASS_NAMES.get(pass_, pass_)}): {reason}")
    return {
        "memsys": dict(memsys),
        "bandwidth": bandwidth,
        "first_touch": first_touch,
        "calibration": calibration,
        "cases": cases,
        "unavailable": dict(unavailable),
        "notes": notes,
    }


def _case_order(data: Dict, analysed: Dict) -> List[str]:
    order = list(data.get("fastkd", {}).get("cases", []))
    return [c for c in order if c in analysed["cases"] or c in analysed["unavailable"]] + [
        c for c in analysed["cases"] if c not in order
    ]


def evaluate_targets(analysed: Dict) -> List[Dict]:
    """Every target a measured case declares (forward+backward), judged on medians."""
    rows = []
    for name, c in analysed["cases"].items():
        targets = next((r["extra"].get("targets") for rec in c["providers"].values() for r in rec.values()
                        if isinstance(r, dict) and "extra" in r), None) or []
        for prov, metric, cmp, threshold, label in targets:
            value, value_min, why = None, None, None
            r = (c["providers"].get(prov) or {}).get("fwdbwd")
            if r is None:
                why = analysed["unavailable"].get(name, {}).get(prov, f"{prov} was not measured")
            elif metric == "peak_units":
                value = r["extra"].get("peak_alloc_units")
                rss = r["extra"].get("peak_rss_units")
                if value is not None and rss is not None:
                    value = max(value, rss)  # both probes must agree that it is met
            else:
                value = r.get(metric)
                value_min = r.get(metric + "_min")
                if value is None:
                    why = f"{metric} could not be computed (a baseline or the bandwidth probe is missing)"
            if value is None:
                status = "not measured"
            else:
                met = value >= threshold if cmp == ">=" else value <= threshold
                status = "**met**" if met else "**not met**"
            rows.append({
                "case": name, "title": c["info"]["title"], "provider": prov, "label": label, "value": value,
                "value_min": value_min, "metric": metric, "status": status, "why": why,
            })
    return rows


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def side_files(out: Path) -> Dict[str, Path]:
    """Where a report's generated side files go: BENCHMARKS.md's into ``docs/``, any other
    report's beside it (``<stem>-gpu-static.md``, ``<stem>-raw.md``), so that a smoke run never
    overwrites the repository's."""
    out = Path(out).resolve()
    if out == (ROOT / "BENCHMARKS.md").resolve():
        return {"gpu_static": ROOT / "docs" / "gpu-static.md", "raw": ROOT / "docs" / "benchmarks-raw.md"}
    return {"gpu_static": out.with_name(f"{out.stem}-gpu-static.md"), "raw": out.with_name(f"{out.stem}-raw.md")}


def render(
    data: Dict,
    command: str,
    elapsed_s: Optional[float],
    gpu_static: bool = True,
    *,
    gpu_runs: Sequence[Path] = (),
    cache_runs: Sequence[Path] = (),
    links: Optional[Dict[str, str]] = None,
) -> str:
    """The report of a run's pytest-benchmark JSON; ``gpu_static=False`` leaves out the "GPU
    kernels, statically" section (``fastkd bench``'s results.md, which does not run it).

    ``links`` (``{"gpu_static": ..., "raw": ...}``, paths relative to the report) gives
    BENCHMARKS.md's layout: a summary per op first, the GPU sections before this run's, the
    static check's tables and the raw statistics in those files (:func:`render_side_files`
    writes them), only a link here. Without it, one self-contained page in the run's order
    (results.md), the committed runs appended."""
    a = analyse(data)
    notes = a["notes"]
    m = notes.get("machine", {})
    L: List[str] = []
    w = L.append
    w("# fastkd benchmarks")
    w("")
    w(
        f"Generated by `{command}` on {m.get('date_utc', '?')}"
        + (f" in {elapsed_s / 60:.1f} min" if elapsed_s else "")
        + ". Do not edit by hand: every number below comes from that run"
        + (", except in the sections of committed runs, which say where theirs come from." if links and (gpu_runs or cache_runs) else ".")
    )
    if notes.get("quick"):
        w("")
        w("> **Quick run** (`--quick`): tiny shapes and few rounds, a smoke test of the harness. "
          "The numbers say nothing about performance, and the RSS memory probe is not meaningful "
          "at these sizes.")
    elif (notes.get("selection") or {}).get("budget") == "short":
        w("")
        w("> **Short run** (`fastkd bench --quick`): real shapes, few rounds (3 to 10 per benchmark), "
          "so the spreads (± half the IQR) are wider than a full run's.")
    w("")

    if links is not None:
        w("Contents: [summary](#summary) · GPU: [measured](#measured-on-a-gpu-committed-runs), "
          "[compiled without a GPU](#gpu-kernels-statically) · this run: [machine](#machine), "
          "[memory system](#memory-system-measured-in-this-run), [targets](#targets), [results](#results)"
          + (" · [teacher cache](#teacher-cache-the-language-model-job-distilled-from-top-k-committed-runs)" if cache_runs else "")
          + " · [how this is measured](#how-this-is-measured) · [raw statistics](" + links["raw"] + ")"
          + (" · [GPU kernels' resources](" + links["gpu_static"] + ")" if gpu_static else "") + ".")
        w("")
        w(render_summary(a, gpu_runs))
        w(render_gpu_runs(gpu_runs))
        if gpu_static:
            w(render_gpu_static_summary(data.get("gpu_static"), data.get("gpu_static_error"), links["gpu_static"]))

    # Machine
    w("## Machine")
    w("")
    fk = m.get("fastkd") or {}
    mem = m.get("mem_total_bytes")
    la0, la1 = m.get("loadavg"), notes.get("loadavg_end")
    rows = [
        ("CPU", f"{m.get('cpu_model', '?')} ({', '.join(m.get('cpu_flags') or []) or 'no AVX2/AVX-512 flags'})"),
        ("cores", f"{m.get('logical_cpus')} logical, {m.get('cpus_usable')} usable by this process"),
        ("memory", f"{mem / 2**30:.1f} GiB" if mem else "?"),
        ("torch", f"{m.get('torch')}, {m.get('torch_threads')} intra-op threads ({m.get('torch_parallel')})"),
        ("python / OS", f"{m.get('python')} / {m.get('platform')}"),
        ("transparent huge pages", m.get("thp") or "?"),
        ("GPU", m.get("cuda") or "none"),
        ("fastkd", f"{fk.get('version')} from `{fk.get('path')}`; extension: {fk.get('extension')}"
                   + (f"; CPU kernels use {fk['cpu_isa']}" if fk.get("cpu_isa") else "")),
        ("git", f"{m.get('git_commit') or 'no commit'}{' (+ uncommitted changes)' if m.get('git_dirty') else ''}"),
        ("environment", ", ".join(f"{k}={v}" for k, v in (m.get("env") or {}).items()) or "no OMP/MKL/FASTKD overrides"),
        ("load average (1/5/15 min)",
         f"start {', '.join(f'{x:.2f}' for x in la0) if la0 else '?'}; end {', '.join(f'{x:.2f}' for x in la1) if la1 else '?'}"),
    ]
    w("| | |")
    w("|---|---|")
    for k, v in rows:
        w(f"| {k} | {v} |")
    w("")
    w("A load average above the core count means other processes competed for the cores during "
      "the run; all comparisons below are ratios between providers timed back to back in this run.")
    w("")
    for peer in (notes.get("peers") or {}).values():
        w(f"Peer library: {peer['line']}.")
        w("")

    # Memory system
    w("## Memory system (measured in this run)")
    w("")
    for dev, probes in sorted(a["memsys"].items()):
        w(f"| probe ({dev}) | buffer | best time | best bandwidth | median bandwidth | rounds |")
        w("|---|---|---|---|---|---|")
        labels = {
            "copy_start": "copy `dst.copy_(src)`, before the ops (read + write)",
            "copy_end": "copy `dst.copy_(src)`, after the ops (read + write)",
            "write_warm": "write `buf.fill_(1)` into an existing buffer",
            "write_fresh": "write `torch.empty(n).fill_(1)` (fresh pages)",
            "write_fresh_thp": "the same in a subprocess with `THP_MEM_ALLOC_ENABLE=1`",
        }
        for key in ("copy_start", "copy_end", "write_warm", "write_fresh", "write_fresh_thp"):
            p = probes.get(key)
            if p:
                w(f"| {labels[key]} | {p['buffer_bytes'] / 2**20:.0f} MiB | {_ms(p['min'])} ms | "
                  f"{_gbs(p['bw'])} | {_gbs(p['bw_median'])} | {p['rounds']} |")
        w("")
        bw = a["bandwidth"].get(dev)
        w(f"**Copy bandwidth used for the traffic bound ({dev}): {_gbs(bw)}** (the best copy of the run: "
          "the highest bandwidth gives the smallest bound, so the % of bound below is not flattered).")
        ft = a["first_touch"].get(dev)
        if ft:
            thp = probes.get("write_fresh_thp")
            w("")
            w(f"Writing fresh memory costs {ft * 2**30 * 1e3:.1f} ms per GiB more than writing memory "
              "already faulted in: page faults, which the copy probe and the traffic bound do not "
              "include and which every provider pays for each N×V tensor it allocates (the per-case "
              "figure is given below)."
              + (f" With `THP_MEM_ALLOC_ENABLE=1` (torch then asks for 2 MiB pages for large "
                 f"allocations) a fresh write runs at {_gbs(thp['bw'])}." if thp else ""))
        w("")
    if a["calibration"]:
        w("Memory-probe calibration (an op that allocates and keeps exactly one N×V tensor must read "
          "1.00; one with one N×V temporary besides its kept result, `(x.exp() + 1).sum()`, 2.00):")
        w("")
        w("| N×V, dtype | one kept: allocator | one kept: RSS | exp+1 temporaries: allocator | exp+1: RSS |")
        w("|---|---|---|---|---|")
        for c in a["calibration"]:
            w(f"| {c['n']}×{c['v']}, {c['dtype']} | {_units(c['one_kept_alloc'])} | {_units(c['one_kept_rss'])} | "
              f"{_units(c['two_temp_alloc'])} | {_units(c['two_temp_rss'])} |")
        w("")

    # Targets
    w("## Targets")
    w("")
    w("Forward+backward, on each op's headline case (and any other case that declares a target).")
    w("")
    w("| case | provider | target | measured (medians) | status | from best times instead |")
    w("|---|---|---|---|---|---|")
    whys: List[str] = []
    for t in evaluate_targets(a):
        fmt = METRIC_FMT[t["metric"]]
        val = fmt(t["value"]) if t["value"] is not None else "n/a"
        if t["value"] is None and t["why"] and f"{t['provider']}: {t['why']}" not in whys:
            whys.append(f"{t['case']}, {t['provider']}: {t['why']}")
        alt = fmt(t["value_min"]) if t.get("value_min") is not None else "same" if t["metric"] == "peak_units" and t["value"] is not None else "n/a"
        w(f"| {t['title']} | {t['provider']} | {t['label']} | {val} | {t['status']} | {alt} |")
    w("")
    for why in whys:
        w(f"Not measured: {why}")
        w("")
    w("Status is judged on medians. The last column uses each provider's fastest round instead "
      "(other processes on a shared machine only ever add time, so it shows the spread the load "
      "can cause). Memory target: the larger of the two probes (allocator, RSS) is compared with 1.1.")
    w("")

    # Per case
    w("## Results")
    w("")
    w("Times are medians in ms, ± half the interquartile range. `fwd` is the loss alone under "
      "`torch.no_grad()`; `bwd` is `loss.backward()` alone (fresh forward in untimed setup each "
      "round); `fwd+bwd` is both. Speedups are the baseline's median over the provider's, same pass.")
    w("")
    for name in _case_order(data, a):
        c = a["cases"].get(name)
        if c is None:
            w(f"### {name}")
            w("")
            for prov, reason in a["unavailable"].get(name, {}).items():
                w(f"- {prov}: not measured ({reason})")
            w("")
            continue
        info = c["info"]
        unit = info["unit_bytes"]
        w(f"### {info['title']}{' (headline)' if info.get('headline') else ''}")
        w("")
        bounds = c["bound_s"]
        w(f"One N×V tensor = {unit / 2**20:.1f} MiB. Traffic bound at {_gbs(a['bandwidth'].get(info['device']))}: "
          + ", ".join(
              f"{p} {_ms(bounds.get(p))} ms ({c['providers'][next(iter(c['providers']))].get(p, {}).get('extra', {}).get('bound_units', '?')} N·V)"
              for p in ("fwd", "bwd", "fwdbwd") if p in bounds
          ) + ".")
        ft = a["first_touch"].get(info["device"])
        if ft:
            w(f"Faulting in one fresh N×V tensor costs about {_ms(ft * unit)} ms on top of writing it "
              "(from the write probes; included in every provider's times, in none of the bounds).")
        w("")
        w("| provider | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd vs eager | fwd+bwd vs compile | fwd vs eager | fwd vs compile |")
        w("|---|---|---|---|---|---|---|---|")
        provs = list(c["providers"].items())
        for prov, rec in provs:
            cells = []
            for p in ("fwd", "bwd", "fwdbwd"):
                r = rec.get(p)
                cells.append("n/a" if r is None else f"{_ms(r['median'])} ± {_ms(r['half_iqr'])}")
            fb, f = rec.get("fwdbwd") or {}, rec.get("fwd") or {}
            w(f"| {prov} | {' | '.join(cells)} | {_ratio(fb.get('speedup_eager'))} | {_ratio(fb.get('speedup_compile'))} | "
              f"{_ratio(f.get('speedup_eager'))} | {_ratio(f.get('speedup_compile'))} |")
        for prov, reason in a["unavailable"].get(name, {}).items():
            if prov not in c["providers"]:
                w(f"| {prov} | not measured: {reason} | | | | | | |")
        w("")
        w("| provider | % of bound fwd | % of bound bwd | % of bound fwd+bwd | peak extra memory, allocator (N·V) | peak extra memory, RSS (N·V) | loss rel. err | grad rel. err |")
        w("|---|---|---|---|---|---|---|---|")
        for prov, rec in provs:
            fb = rec.get("fwdbwd") or {}
            ex = fb.get("extra", {})
            chk = ex.get("check") or {}
            flag = "" if chk.get("ok", True) else " ⚠"
            err = lambda k: "n/a" if chk.get(k) is None else f"{chk[k]:.1e}"
            w(f"| {prov} | {_pct((rec.get('fwd') or {}).get('pct_bound'))} | {_pct((rec.get('bwd') or {}).get('pct_bound'))} | "
              f"{_pct(fb.get('pct_bound'))} | {_units(ex.get('peak_alloc_units'))} | {_units(ex.get('peak_rss_units'))} | "
              f"{err('loss_rel_err')}{flag} | {err('grad_rel_err')}{flag} |")
        w("")
        bad = [p for p, rec in provs if not ((rec.get("fwdbwd") or {}).get("extra", {}).get("check") or {}).get("ok", True)]
        if bad:
            tol = c["providers"][bad[0]]["fwdbwd"]["extra"]["check"]["tol"]
            w(f"⚠ {', '.join(bad)}: loss or gradient differs from the float32 composite by more than {tol:g} "
              "(relative; gradient error is max |Δ| / max |ref|), and from the float64 composite by more than "
              "twice the float32 composite's own error. Check `tests/` before trusting these times.")
            w("")
        arbitrated = [(p, rec["fwdbwd"]["extra"]["check"]) for p, rec in provs
                      if ((rec.get("fwdbwd") or {}).get("extra", {}).get("check") or {}).get("arbitrated") and p not in bad]
        for p, chk in arbitrated:
            w(f"{p} differs from the float32 composite beyond {chk['tol']:g}, but against the float64 composite its "
              f"gradient error is {chk['fp64_grad_rel_err']:.1e} where the float32 composite's own is "
              f"{chk['composite_fp64_grad_rel_err']:.1e}: within twice that, so not flagged.")
            w("")

    if links is not None and cache_runs:
        w(render_cache_runs(cache_runs))
    if gpu_static and links is None:
        w(_gpu_static_module().render_markdown(data.get("gpu_static")))
        if data.get("gpu_static_error"):
            w(f"The static check failed: `{data['gpu_static_error']}`")
            w("")

    # Method
    w("## How this is measured")
    w("")
    ops: Dict[str, Dict] = {}
    for c in a["cases"].values():
        ops.setdefault(c["info"]["op"], c["info"])
    w("- **Providers.** `eager`: the composite users write today, per op: "
      + "; ".join(f"`{op}`: `{info.get('composite_text', '?')}`" for op, info in ops.items()) + ". "
      "`compile`: `torch.compile(composite, dynamic=False)`, compiled afresh per case (after "
      "`torch._dynamo.reset()`), warm-up calls excluded. `fastkd-<backend>`: the fastkd op with "
      "`backend=...`. A provider that cannot run a case is listed as not measured, with its reason.")
    w("- **Timing.** pytest-benchmark, pedantic mode, one call per round, one warm-up round after two "
      "untimed warm-up calls; rounds = clamp(budget / one call, min, max) so slow providers get fewer "
      "rounds. Student `.grad` is reset to None in the untimed setup of every round. Inputs: "
      "logits ~ N(0, 2²), contiguous, in the case's dtype (each op's `bench/test_bench_<op>.py` "
      "says what else it takes).")
    w("- **Traffic bound.** bytes a fused pass must move ÷ the best copy bandwidth of the run. "
      + " ".join(f"`{op}`: {info.get('traffic_note', '?')}." for op, info in ops.items())
      + " The same bound is applied to every provider; the composites move far more bytes, which "
      "is the point. Copy bandwidth counts bytes read + written (as the bound does); write-allocate "
      "traffic is not counted on either side. The copy itself does pay it (each destination line is "
      "read before it is written, so a copy moves 3 bytes per 2 counted), while fastkd's CPU kernel "
      "writes its gradient with non-temporal stores that skip that read: it can therefore pass 100 % "
      "of this bound, which is a convention for comparing providers, not a physical limit. A "
      "backward with nothing to move (fastkd's, when grad_output is 1) shows a % far above 100.")
    w("- **Peak extra memory** (fwd+bwd, inputs already allocated, no old `.grad`; the new gradient "
      "counts), in units of one N×V tensor of the student dtype, two independent ways: "
      "*allocator*: `torch.profiler.profile(profile_memory=True)` and the running sum of the raw "
      "`[memory]` allocation/free events in time order (torch's CPU allocator has no peak counter); "
      "*RSS*: reset the kernel's peak-RSS mark (`/proc/self/clear_refs`), run, read `VmHWM` minus the "
      "RSS before: this also sees memory a kernel takes outside torch's allocator. The calibration "
      "table above checks both on ops whose answer is known.")
    w("- **Sanity check.** After timing, each provider's loss and gradient are compared with the "
      "composite computed in float32 on the same inputs; beyond tolerance, both are compared with the "
      "composite in float64, and the provider is flagged ⚠ here only if its error there exceeds twice "
      "the float32 composite's own. "
      "Correctness is asserted in `tests/`, not here.")
    w("")

    # Raw stats
    w("## Raw statistics")
    w("")
    if links is not None:
        w(f"Every benchmark of the run (rounds, min, median, max, IQR): [{links['raw']}]({links['raw']}).")
        w("")
    else:
        w("<details><summary>every benchmark of the run (seconds)</summary>")
        w("")
        L += _raw_table(data)
        w("</details>")
        w("")
        for section in (render_gpu_runs(gpu_runs) if gpu_runs else None, render_cache_runs(cache_runs) if cache_runs else None):
            if section:
                w(section)
    return "\n".join(L).rstrip("\n") + "\n"


def _raw_table(data: Dict) -> List[str]:
    L = ["| benchmark | rounds | min | median | max | IQR |", "|---|---|---|---|---|---|"]
    for b in data["benchmarks"]:
        s = b["stats"]
        L.append(f"| `{b['name']}` | {s['rounds']} | {s['min']:.6f} | {s['median']:.6f} | {s['max']:.6f} | {s['iqr']:.6f} |")
    return L + [""]


def render_side_files(data: Dict, command: str, report: str, gpu_static: bool = True) -> Dict[str, str]:
    """The generated side files of BENCHMARKS.md's layout (``report``: the main file's name):
    ``raw`` (every benchmark's statistics) and, with ``gpu_static``, ``gpu_static`` (the static
    check's per-kernel tables)."""
    date = (data.get("fastkd", {}).get("machine") or {}).get("date_utc", "?")
    stamp = f"Generated with {report} by `{command}`. Do not edit by hand."
    pages = {"raw": "\n".join(["# fastkd benchmarks: raw statistics", "", stamp, "",
                               f"Every benchmark of the run of {date}, in seconds.", ""] + _raw_table(data))}
    if gpu_static:
        section = _gpu_static_module().render_markdown(data.get("gpu_static"))
        # A page of its own: the section's heading becomes the title, its subsections level 2.
        body = section.partition("\n")[2].replace("\n### ", "\n## ")
        error = f"\nThe static check failed: `{data['gpu_static_error']}`\n" if data.get("gpu_static_error") else ""
        pages["gpu_static"] = f"# fastkd: GPU kernels, statically\n\n{stamp}\n{body}{error}"
    return {k: v.rstrip("\n") + "\n" for k, v in pages.items()}


def render_gpu_static_summary(report: Optional[Dict], error: Optional[str], link: str) -> str:
    """BENCHMARKS.md's "GPU kernels, statically": what was compiled, the verdict, and the link to
    the per-kernel tables."""
    L = ["## GPU kernels, statically", ""]
    if not report:
        L += ["Not in this run (the static check did not run or failed; see `python tools/gpu_static.py`)."
              + (f" The static check failed: `{error}`" if error else ""), ""]
        return "\n".join(L)
    gs = _gpu_static_module()
    tk, ck = report.get("triton_kernels") or {}, report.get("cuda_kernels") or {}
    archs = " and ".join(f"sm_{a}" for a in report["archs"])
    triton = {r["kernel"] for r in tk.get("launches", [])}
    cuda = ck.get("kernels") or []
    L.append(f"Every GPU kernel compiled without a GPU for {archs} (Triton {report.get('triton', '?')}, ptxas "
             f"{report.get('ptxas', '?')}; `python tools/gpu_static.py`): {len(triton)} Triton kernels in "
             f"{len(tk.get('launches', []))} compilations (the launch configurations their launchers choose from), "
             f"{len(cuda)} CUDA C++ kernel instantiations, with registers, spills, shared memory and occupancy "
             f"read from the cubins. Every kernel's resources and bytes per row: [{link}]({link}).")
    L.append("")
    bad = [(kind, p) for kind, ps in gs.problems(report).items() for p in ps]
    if bad:
        L += [f"**Problems ({len(bad)}):**", ""] + [f"- {kind}: {p}" for kind, p in bad] + [""]
    else:
        L += ["**No problems:** every launch compiled for every architecture, with no spill, and every block fits on an SM.", ""]
    return "\n".join(L)


def _keep_best(best: Dict[str, Dict], op: str, shape: str, fwdbwd: Optional[Dict]) -> None:
    """Keeps, per op, the fastkd backend with the largest forward+backward speed-up over
    torch.compile (over eager where compile was not measured)."""
    fb = fwdbwd or {}
    row = {"shape": shape, "compile": fb.get("speedup_compile"), "eager": fb.get("speedup_eager"), "bound": fb.get("pct_bound")}
    if row["compile"] is None and row["eager"] is None:
        return
    rank = lambda r: (r["compile"] or 0.0, r["eager"] or 0.0)  # noqa: E731
    if op not in best or rank(row) > rank(best[op]):
        best[op] = row


def render_summary(a: Dict, gpu_runs: Sequence[Path]) -> str:
    """One row per op: the best fastkd backend's forward+backward speed-up over ``torch.compile``
    and eager at the op's headline shape, on the latest committed GPU run and on each device of
    this run, with this run's % of the traffic bound."""
    groups: List[Tuple[str, Dict[str, Dict]]] = []  # (label, op -> {shape, compile, eager, bound})
    runs = [json.loads(Path(p).read_text()) for p in gpu_runs]
    if runs:
        r = max(runs, key=lambda r: (r.get("machine") or {}).get("date_utc", ""))
        best: Dict[str, Dict] = {}
        for e in r["results"]:
            if e.get("headline") and e["provider"].startswith("fastkd-"):
                _keep_best(best, e["op"], f"{e['shape']} {e['dtype']}", e.get("fwdbwd"))
        groups.append((f"{(r.get('machine') or {}).get('gpu', 'GPU')} (committed run)", best))
    devices = sorted({c["info"]["device"] for c in a["cases"].values()}, key=lambda d: (d != "cuda", d))
    for dev in devices:
        best = {}
        for c in a["cases"].values():
            info = c["info"]
            if info["device"] != dev or not info.get("headline"):
                continue
            for prov, rec in c["providers"].items():
                if prov.startswith("fastkd-"):
                    _keep_best(best, info["op"], f"{info['n']}x{info['v']} {info['dtype']}", rec.get("fwdbwd"))
        groups.append((f"this run, {dev}", best))
    ops = list(dict.fromkeys(op for _, best in groups for op in best))
    L = ["## Summary", "",
         "The best fastkd backend's forward+backward speed-up over `torch.compile` and over eager PyTorch "
         "(the composite users write today), per op at its headline shape, and the % of the memory-traffic "
         "bound it reaches there (see [how this is measured](#how-this-is-measured)). Every figure is a "
         "ratio of medians timed back to back in one run; the sections below give every pass and provider.", ""]
    if not ops:
        return "\n".join(L + ["No headline case was measured.", ""])
    head, rule = ["op"], ["---"]
    for label, _ in groups:
        head += [f"{label}: shape", "vs compile", "vs eager", "% of bound"]
        rule += ["---"] * 4
    L += ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for op in ops:
        cells = [op]
        for _, best in groups:
            b = best.get(op)
            cells += ["–"] * 4 if b is None else [b["shape"], _ratio(b["compile"]), _ratio(b["eager"]), _pct(b["bound"])]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    return "\n".join(L)


def render_gpu_runs(paths: List[Path]) -> str:
    """A section for GPU runs kept in the repository (``bench/measured/*.json``, each the
    ``results.json`` of a ``fastkd bench`` run on a machine with a GPU), so that BENCHMARKS.md
    shows GPU figures although the machine that runs ``make bench`` has no GPU. What a run found
    beyond its numbers (the GPU tests it passed or failed) is kept as prose beside its JSON
    (``<run>.md``) and shown with it: BENCHMARKS.md holds the dated record, the README none."""
    from fastkd.bench_cli import summary_rows

    L: List[str] = ["## Measured on a GPU (committed runs)", ""]
    if not paths:
        return "\n".join(L + ["None yet: `fastkd bench --device cuda --out DIR` on a GPU host, then keep "
                               "`DIR/results.json` as `bench/measured/<gpu>-<date>.json`.", ""])
    L += ["Each run below was measured on another machine and kept as `bench/measured/<file>`; "
          "`make bench` copies it here unchanged. Ratios are between providers timed back to back in "
          "that run. % of bound: the fused pass's time against its bytes moved at the copy bandwidth "
          "measured in the same run.", ""]
    for path in paths:
        r = json.loads(Path(path).read_text())
        m = r.get("machine", {})
        bw = (r.get("bandwidth_bytes_per_s") or {}).get("cuda")
        L.append(f"### {m.get('gpu', '?')}: `{r.get('command', '?')}` (`{Path(path).name}`)")
        L.append("")
        L.append(f"{m.get('date_utc', '?')}; torch {m.get('torch', '?')}; git {m.get('git_commit', '?')}"
                 f"{' (+ uncommitted changes)' if m.get('git_dirty') else ''}"
                 + (f"; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)" if bw else "") + ".")
        if r.get("note"):
            L += ["", r["note"]]
        findings = Path(path).with_suffix(".md")  # what the run found, written beside its JSON
        if findings.exists():
            L += ["", findings.read_text().strip()]
        L.append("")
        header, rows = summary_rows(r)
        L.append("Forward+backward medians, ms; last column: the best fastkd backend's speed-up over `torch.compile`.")
        L.append("")
        L.append("| " + " | ".join(header) + " |")
        L.append("|" + "---|" * len(header))
        L += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        L.append("")
        L.append("Per pass, fastkd's CUDA backend (the fused forward computes the gradient; the backward "
                 "scales it by grad_output):")
        L.append("")
        L.append("| op | fwd ms | fwd % of bound | bwd ms | fwd+bwd ms | fwd+bwd % of bound | grad error vs fp32 composite | check |")
        L.append("|---|---|---|---|---|---|---|---|")
        for e in r["results"]:
            if e["provider"] != "fastkd-cuda":
                continue
            f, b, fb = e.get("fwd") or {}, e.get("bwd") or {}, e.get("fwdbwd") or {}

            def ms(d):
                return f"{d['median_ms']:.3f}" if d.get("median_ms") is not None else "n/a"

            def pct(d):
                return f"{d['pct_bound']:.1f} %" if d.get("pct_bound") is not None else "n/a"

            err = e.get("grad_rel_err")
            L.append(f"| {e['op']} | {ms(f)} | {pct(f)} | {ms(b)} | {ms(fb)} | {pct(fb)} | "
                     f"{err:.1e} | {'ok' if e.get('check_ok') else '⚠'} |" if err is not None else
                     f"| {e['op']} | {ms(f)} | {pct(f)} | {ms(b)} | {ms(fb)} | {pct(fb)} | n/a | {'ok' if e.get('check_ok') else '⚠'} |")
        L.append("")
    return "\n".join(L)


def render_cache_runs(paths: List[Path]) -> str:
    """A section for the teacher-cache measurements kept in the repository
    (``bench/measured/teacher-cache-*.json``, each written by ``python tools/teacher_cache_experiment.py``):
    the language-model job's KD student distilled from caches against the online teacher, and
    the students' wall time with and without the teacher in the loop."""
    L: List[str] = ["## Teacher cache: the language-model job distilled from top-K (committed runs)", ""]
    if not paths:
        return "\n".join(L + ["None yet: `python tools/teacher_cache_experiment.py run --save bench/measured/teacher-cache-<date>.json`.", ""])
    L += ["`fastkd cache-teacher` writes the teacher's top-K per training token once; `fastkd distill "
          "--teacher-cache` trains the students from it with `sparse_kd_loss` and no teacher. The students "
          "see the same batches from the same initialisation as the online job's, so the rows differ only in "
          "the teacher signal. Test split, per token; agreement and predictive KL against the full teacher. "
          "`students s`: wall time of the students' phase (baseline and KD student together, the teacher's "
          "forward included online; the cache read included from a cache).", ""]
    for path in paths:
        r = json.loads(Path(path).read_text())
        m = r["machine"]
        L.append(f"### `{Path(path).name}`")
        L.append("")
        L.append(f"{m['date_utc']}; {m['cores']} cores ({m['cpu']}); git {m.get('git_commit', '?')}"
                 f"{' (+ uncommitted changes)' if m.get('git_dirty') else ''}; "
                 f"{r['jobs'] or '?'} job(s) at a time.")
        if r.get("note"):
            L += ["", r["note"]]
        L.append("")
        on = r["online"]
        teacher = on["models"]["teacher"]
        L.append(f"Teacher (trained once, {on['phase_wall_s'].get('teachers', 0):.0f} s): perplexity {teacher['perplexity']:.1f}, "
                 f"accuracy {teacher['accuracy']:.3f}.")
        L.append("")
        L.append("| KD student's teacher | stored per token | mass kept | cache | write | students s | perplexity | agreement | predictive KL |")
        L.append("|---|---|---|---|---|---|---|---|---|")

        def row(label, stored, kept, size, write, phase, model):
            return (f"| {label} | {stored} | {kept} | {size} | {write} | {phase} | {model['perplexity']:.1f} | "
                    f"{model['agreement']:.3f} | {model['predictive_kl']:.3f} |")

        def kept(c):
            return f"{100 * c['kept_mass']:.1f} %" if c.get("kept_mass") is not None else "–"

        L.append(row("none (baseline, labels only)", "–", "–", "–", "–", f"{on['phase_wall_s']['students']:.0f}",
                     on["models"]["student_baseline"]))
        L.append(row("online teacher (full distribution)", "–", "100 %", "–", "–", f"{on['phase_wall_s']['students']:.0f}",
                     on["models"]["student_kd"]))
        for c in r["caches"]:
            st = c["student"]
            if st is None:
                continue
            label = f"cache, top-{c['top_k']}" if c["selection"] == "top_k" else f"cache, {c['top_k']} samples"
            bound = 4 * c["top_k"] + 16
            w = c.get("write") or {}
            write = f"{w['seconds']:.0f} s ({w['tokens_per_s']:,.0f} tok/s)" if w else "n/a"
            L.append(row(label, f"{c['bytes_per_token']:.1f} B (bound {bound})", kept(c), f"{c['bytes'] / 2**20:.1f} MiB", write,
                         f"{st['phase_wall_s']['students']:.0f}", st["models"]["student_kd"]))
        renormalized = [c for c in r["caches"] if c.get("student_renormalize")]
        for c in renormalized:
            st = c["student_renormalize"]
            L.append(row(f"cache, top-{c['top_k']}, tail renormalize", f"{c['bytes_per_token']:.1f} B", kept(c), "same", "same",
                         f"{st['phase_wall_s']['students']:.0f}", st["models"]["student_kd"]))
        L.append("")
        L.append("Top-k rows read the cache with `tail = \"uniform\"` (the mass outside the K kept entries spread "
                 "evenly over the rest, the default for log-probabilities)"
                 + ("; `tail renormalize` rows take the K entries as the whole distribution." if renormalized else ".")
                 + " Sample rows: K draws from each token's distribution, their frequencies read with "
                 "`tail = \"renormalize\"`. Mass kept: the teacher's probability on the K stored entries, averaged "
                 "over the cache's tokens.")
        L.append("")
    return "\n".join(L)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (smoke test, seconds)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to write (default: BENCHMARKS.md)")
    ap.add_argument("--json", default=None, help="also keep the pytest-benchmark JSON here")
    ap.add_argument("--from-json", default=None,
                    help="render this saved JSON instead of running: a pytest-benchmark JSON of the suite, "
                         "or the results.json of `fastkd bench`")
    ap.add_argument("--gpu-static", action="store_true",
                    help="with --from-json: run the static GPU kernel report now and add it")
    ap.add_argument("--cases", default="", help="passed to --bench-cases")
    ap.add_argument("--providers", default="", help="passed to --bench-providers")
    ap.add_argument("--no-gpu-static", action="store_true", help="skip the static GPU kernel report")
    ap.add_argument("--gpu-runs", nargs="*", default=[], metavar="RESULTS_JSON",
                    help="results.json files of fastkd bench runs on GPU hosts to include (make bench: bench/measured/*.json)")
    ap.add_argument("--cache-runs", nargs="*", default=[], metavar="RECORD_JSON",
                    help="teacher-cache records of tools/teacher_cache_experiment.py to include (make bench: "
                         "bench/measured/teacher-cache-*.json)")
    args = ap.parse_args(argv)

    shown = "python -m bench.report" + (" --quick" if args.quick else "")
    elapsed = None
    rc = 0
    if args.from_json:
        json_path = Path(args.from_json)
        shown = f"python -m bench.report --from-json {json_path.name}"
        saved = json.loads(json_path.read_text())
        if "pytest_benchmark" in saved:  # a `fastkd bench` run: its own command and duration
            shown = saved.get("command", shown)
            elapsed = saved.get("elapsed_s")
    else:
        tmpdir = tempfile.mkdtemp(prefix="fastkd-bench-")
        json_path = Path(args.json) if args.json else Path(tmpdir) / "bench.json"
        extra = []
        if args.cases:
            extra.append(f"--bench-cases={args.cases}")
            shown += f" --cases {args.cases}"
        if args.providers:
            extra.append(f"--bench-providers={args.providers}")
            shown += f" --providers {args.providers}"
        t0 = time.time()
        rc = run_suite(json_path, args.quick, extra)
        elapsed = time.time() - t0
        if not json_path.exists():
            print(f"bench.report: the benchmark run wrote no JSON (pytest exit code {rc})", file=sys.stderr)
            return rc or 1
        if rc not in (0,):
            print(f"bench.report: pytest exit code {rc}; writing the report from what was measured", file=sys.stderr)
    data = json.loads(json_path.read_text())
    data = data.get("pytest_benchmark", data)
    if (not args.from_json or args.gpu_static) and not args.no_gpu_static:
        run_gpu_static(data)
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1))
    out = Path(args.out)
    with_static = not args.no_gpu_static
    sides = {k: p for k, p in side_files(out).items() if k != "gpu_static" or with_static}
    links = {k: Path(os.path.relpath(p, out.resolve().parent)).as_posix() for k, p in sides.items()}
    text = render(data, shown, elapsed, gpu_static=with_static, gpu_runs=sorted(Path(p) for p in args.gpu_runs),
                  cache_runs=sorted(Path(p) for p in args.cache_runs), links=links)
    out.write_text(text)
    for key, page in render_side_files(data, shown, out.name, gpu_static=with_static).items():
        sides[key].parent.mkdir(parents=True, exist_ok=True)
        sides[key].write_text(page)
    print(f"bench.report: wrote {out} ({', '.join(str(p) for p in sides.values())} beside it)")
    for t in evaluate_targets(analyse(data)):
        val = METRIC_FMT[t["metric"]](t["value"]) if t["value"] is not None else "n/a"
        print(f"  {t['title']}: {t['provider']}: {t['label']}: {val} -> {t['status'].strip('*')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
