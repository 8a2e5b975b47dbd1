"""GPU readiness without a GPU: compile every GPU kernel for sm_80 and sm_90 and read its resources.

No GPU is available where fastkd is built and tested. What can still be known about the GPU code
is known here, statically:

* **Triton kernels** (``kernels/<family>.py``): every launch its launcher can make, as listed
  by the module's ``static_launches()`` (the convention is in ``kernels/__init__.py``), is
  compiled ahead of time with ``triton.compile`` for ``GPUTarget("cuda", 80)`` and
  ``GPUTarget("cuda", 90)``: the same PTX and cubin a launch on an A100 / H100 would build, with
  the argument specialisation Triton's launcher would apply (the launcher's own binder is used).
* **CUDA C++ kernels** (``csrc/cuda``): every kernel in the compiled extension ``fastkd/_C*.so``
  (its sm_80 and sm_90 code, built by nvcc for ``TORCH_CUDA_ARCH_LIST``), with the block sizes
  its launcher declares with ``FASTKD_GPU_KERNEL_INFO`` (``csrc/cuda/gpu_kernel_info.h``).

For each kernel and architecture, ``cuobjdump --dump-resource-usage`` (shipped in Triton's
NVIDIA backend) gives registers per thread, spill stack, local memory and static shared memory;
Triton's compile metadata gives the dynamic shared memory of its launches. From those and the
launch's threads per block follows the theoretical occupancy (:func:`occupancy`, the rules of the
CUDA toolkit's ``cuda_occupancy.h``). ``tests/test_gpu_static.py`` fails on a kernel that does not
compile for both architectures, on any spill (STACK or LOCAL above 0), on a launch that could not
start (a block that does not fit on an SM) and on a kernel outside the conventions; ``make bench``
writes the resource table to docs/gpu-static.md (:func:`render_markdown`) and its verdict to
BENCHMARKS.md.

Compiled results are cached in ``.gpu-static-cache/`` at the repository root (``make clean``
removes it; ``FASTKD_GPU_STATIC_CACHE`` overrides the folder), keyed by a hash of the kernel's
source (Triton's ``cache_key``: the source of the kernel and of the jit functions it calls,
taken without their line numbers, so that an edit elsewhere in the file recompiles nothing), the
specialisation, the options, the architecture and the Triton and ptxas versions.
``FASTKD_GPU_STATIC_JOBS`` sets the number of compile processes (default: 2, or 1 on a single
core). Everything runs offline from the torch/Triton wheels.

A developer's tool of the source checkout (it reads ``kernels/``, ``csrc/`` and the built
extension in place), not part of the installed package.

Command line: ``python tools/gpu_static.py [--json FILE] [--markdown FILE] [--jobs N]`` prints
a summary and exits 1 when there is a problem.

What this cannot tell: speed, and the numerics of the compiled code. Those need a GPU
(``make test`` and ``make bench`` on a GPU host run ``tests/test_kd_gpu.py`` and the CUDA
benchmark cases).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

ARCHS: Tuple[int, ...] = (80, 90)
# Bump when the shape of a cached result changes.
_SCHEMA = 1
_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# Occupancy
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of one architecture (CUDA C Programming Guide, "Technical Specifications
    per Compute Capability"; granularities and the per-block reservation from the toolkit's
    ``cuda_occupancy.h``)."""

    name: str
    smem_per_sm: int  # shared memory per SM at the largest carveout
    smem_per_block: int  # largest shared memory one block may opt in to
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reg_alloc_unit: int = 256  # registers are given to a warp in multiples of this
    sub_partitions: int = 4  # the register file is split between 4 schedulers
    smem_alloc_unit: int = 128
    smem_reserved_per_block: int = 1024  # taken by the driver for every block (sm_80 on)


SM_LIMITS: Dict[int, SMLimits] = {
    80: SMLimits("sm_80 (A100)", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: SMLimits("sm_90 (H100)", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(arch: int, regs: int, threads: int, smem: int = 0) -> Dict[str, Any]:
    """Theoretical occupancy of blocks of ``threads`` threads using ``regs`` registers per thread
    and ``smem`` bytes of shared memory (static + dynamic) per block.

    Returns ``blocks`` (resident blocks per SM), ``warps`` (resident warps per SM),
    ``occupancy`` (warps / the SM's 64) and ``limiter`` ("warps", "blocks", "registers",
    "shared memory", or why a block cannot start at all when ``blocks`` is 0). Follows
    cudaOccMaxActiveBlocksPerMultiprocessor: a warp's registers are ``regs * 32`` rounded up to
    256; they come from one of 4 sub-partitions of 16384; shared memory per block is rounded up
    to 128 bytes after adding the driver's 1 KiB reservation.
    """
    lim = SM_LIMITS[arch]
    if threads <= 0:
        raise ValueError(f"threads per block must be positive, got {threads}")
    warps = -(-threads // 32)
    if threads > 1024:
        return {"blocks": 0, "warps": 0, "occupancy": 0.0, "limiter": f"{threads} threads > 1024 per block"}
    limits = {"warps": lim.max_warps_per_sm // warps, "blocks": lim.max_blocks_per_sm}

    regs_per_warp = _round_up(max(regs, 0) * 32, lim.reg_alloc_unit)
    if regs > lim.max_regs_per_thread:
        return {"blocks": 0, "warps": 0, "occupancy": 0.0, "limiter": f"{regs} registers > {lim.max_regs_per_thread}"}
    # The hardware checks a block's registers as if its warps were spread over all 4
    # sub-partitions, hence the rounding of the warp count.
    if regs_per_warp * _round_up(warps, lim.sub_partitions) > lim.regs_per_block:
        return {"blocks": 0, "warps": 0, "occupancy": 0.0,
                "limiter": f"{regs} registers x {threads} threads exceed the {lim.regs_per_block} registers of a block"}
    if regs_per_warp:
        warps_per_sub = (lim.regs_per_sm // lim.sub_partitions) // regs_per_warp
        limits["registers"] = (warps_per_sub * lim.sub_partitions) // warps

    smem_alloc = _round_up(smem + lim.smem_reserved_per_block, lim.smem_alloc_unit)
    if smem > lim.smem_per_block:
        return {"blocks": 0, "warps": 0, "occupancy": 0.0,
                "limiter": f"{smem} bytes of shared memory > {lim.smem_per_block} per block"}
    limits["shared memory"] = lim.smem_per_sm // smem_alloc

    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return {
        "blocks": blocks,
        "warps": blocks * warps,
        "occupancy": blocks * warps / lim.max_warps_per_sm,
        "limiter": limiter,
    }


# ----------------------------------------------------------------------------------------------
# cuobjdump
# ----------------------------------------------------------------------------------------------


def cuobjdump_path() -> str:
    """The cuobjdump shipped with Triton's NVIDIA backend (or TRITON_CUOBJDUMP_PATH), else the
    CUDA toolkit's."""
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - fall back to the toolkit's copy
        pass
    for folder in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if folder and os.path.exists(os.path.join(folder, "bin", "cuobjdump")):
            return os.path.join(folder, "bin", "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        return found
    raise FileNotFoundError(
        "cuobjdump not found: it ships with Triton's NVIDIA backend (triton/backends/nvidia/bin) and "
        "with the CUDA toolkit; set TRITON_CUOBJDUMP_PATH to one"
    )


_FUNC_RE = re.compile(r"^\s*Function (\S+):\s*$")
_RES_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> List[Dict[str, Any]]:
    """Parses ``cuobjdump --dump-resource-usage`` output: one dict per (arch, function) with
    ``arch`` (e.g. 80), ``function`` (mangled name) and ``regs``, ``stack``, ``shared``,
    ``local`` (bytes, except regs)."""
    out: List[Dict[str, Any]] = []
    arch: Optional[int] = None
    func: Optional[str] = None
    for line in text.splitlines():
        m = re.match(r"^\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = _FUNC_RE.match(line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in line:
            fields = dict((k, int(v)) for k, v in _RES_RE.findall(line))
            out.append({
                "arch": arch, "function": func, "regs": fields.get("REG", 0), "stack": fields.get("STACK", 0),
                "shared": fields.get("SHARED", 0), "local": fields.get("LOCAL", 0),
            })
            func = None
    return out


def resource_usage(path: str) -> List[Dict[str, Any]]:
    run = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path], capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"cuobjdump --dump-resource-usage {path} failed ({run.returncode}): {run.stderr.strip()[:500]}")
    return parse_resource_usage(run.stdout)


# ----------------------------------------------------------------------------------------------
# Triton: discovery
# ----------------------------------------------------------------------------------------------


def _kernels_package():
    import fastkd.kernels as pkg

    return pkg


def discover_triton() -> Tuple[List[Tuple[str, Any]], List[List[str]]]:
    """Every (module name, StaticLaunch) of every module in ``fastkd.kernels``, and its problems
    as [kind, message]: a module that does not import ("compile"), a ``static_launches`` that
    fails or lists nothing, a ``@triton.jit`` function that no listed launch reaches ("convention").

    A module may be a helper (``kernels/_softmax.py``): ``@triton.jit`` functions that other
    modules' kernels call, and no ``static_launches`` of its own. Its functions are compiled
    inside the kernels that call them, so each must be reached by a listed launch; one that is
    not is a kernel without launches or a helper nothing calls, and both are reported."""
    from triton.runtime.jit import JITFunction

    pkg = _kernels_package()
    launches: List[Tuple[str, Any]] = []
    problems: List[List[str]] = []
    modules = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        name = f"{pkg.__name__}.{info.name}"
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report, do not crash the other families
            problems.append(["compile", f"{name} does not import: {type(exc).__name__}: {exc}"])
            continue
        jitted = {k: v for k, v in vars(module).items() if isinstance(v, JITFunction) and v.fn.__module__ == name}
        modules.append((module, jitted))
        if not hasattr(module, "static_launches"):
            continue
        try:
            listed = list(module.static_launches())
        except Exception as exc:  # noqa: BLE001 - report, do not crash the other families
            problems.append(["convention", f"{_module_file(module)}: static_launches() raised {type(exc).__name__}: {exc}"])
            continue
        if not listed:
            problems.append(["convention", f"{_module_file(module)}: static_launches() returned no launches"])
        launches += [(name, l) for l in listed]

    reached = _reached({id(l.kernel): l.kernel for _, l in launches})
    for module, jitted in modules:
        missed = sorted(f for f, fn in jitted.items() if id(fn) not in reached)
        if not missed:
            continue
        if hasattr(module, "static_launches"):
            problems += [["convention", f"{_module_file(module)}: @triton.jit function {f} is neither in static_launches() "
                          "nor called by a kernel that is"] for f in missed]
        else:
            problems.append([
                "convention",
                f"{_module_file(module)} defines @triton.jit functions that no listed launch reaches "
                f"({', '.join(missed)}): a kernel needs a static_launches() listing its launches, a helper a kernel "
                "that calls it (see kernels/__init__.py)"
            ])
    return launches, problems


def _reached(roots: Dict[int, Any]) -> Dict[int, Any]:
    """The jit functions ``roots`` call, helpers of helpers included, by identity: a name called
    in a function's source (``f(`` or ``module.f(``) is looked up in that function's module, so a
    helper imported from another module counts where it is called."""
    from triton.runtime.jit import JITFunction

    reached, frontier = dict(roots), list(roots.values())
    while frontier:
        fn = frontier.pop()
        scope = fn.fn.__globals__
        for dotted in set(re.findall(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\(", fn.src)):
            head, *rest = dotted.split(".")
            obj = scope.get(head)
            for attr in rest:
                obj = getattr(obj, attr, None)
            if isinstance(obj, JITFunction) and id(obj) not in reached:
                reached[id(obj)] = obj
                frontier.append(obj)
    return reached


def _module_file(module) -> str:
    path = Path(getattr(module, "__file__", module.__name__))
    try:
        return str(path.resolve().relative_to(_ROOT))
    except ValueError:
        return str(path)


def _load_launches(select: str) -> List[Tuple[str, Any]]:
    """``module:function``: launches from that function instead of the kernels package."""
    mod_name, _, func = select.partition(":")
    module = importlib.import_module(mod_name)
    return [(mod_name, l) for l in getattr(module, func or "static_launches")()]


# ----------------------------------------------------------------------------------------------
# Triton: specialisation, cache, compile
# ----------------------------------------------------------------------------------------------


def _specialize(launch, arch: int) -> Dict[str, Any]:
    """Signature, constexprs and attributes as a real launch with these arguments would give
    them: Triton's own binder and argument packing, with a backend for ``arch`` (no driver)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    kernel = launch.kernel
    names = [p.name for p in kernel.params]
    missing = [n for n in names if n not in launch.args]
    extra = [n for n in launch.args if n not in names]
    if missing or extra:
        raise TypeError(
            f"the launch's args do not match {kernel.fn.__name__}'s parameters: "
            + (f"missing {', '.join(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unknown {', '.join(extra)}" if extra else "")
        )
    args = {k: MockTensor(v) if isinstance(v, torch.dtype) else v for k, v in launch.args.items()}
    options = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, parsed = binder(**args, **options)
    _, signature, constexprs, attrs = kernel._pack_args(backend, dict(options), bound, specialization, parsed)
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs, "options": options}


_TOOL_VERSIONS: Dict[str, str] = {}


def _ptxas_version() -> str:
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.version
    except Exception:  # noqa: BLE001
        return "?"


def _tool_versions() -> str:
    """The compiler versions, as they enter the cache key."""
    if not _TOOL_VERSIONS:
        import triton

        _TOOL_VERSIONS["v"] = f"triton {triton.__version__}; ptxas {_ptxas_version()}"
    return _TOOL_VERSIONS["v"]


@contextlib.contextmanager
def _keys_without_line_numbers(modules: Iterable[str]):
    """While active, the jit functions of ``modules`` hash as if they started on line 0.

    Triton's ``cache_key`` ends with each jit function's first line number, which only the
    cubin's line table depends on, not the registers, spills or shared memory this module reports
    (the same launch compiled at different line offsets gave identical resources for every kd
    launch). Keyed without it, adding an import above a kernel does not recompile it.
    """
    from triton.runtime.jit import JITFunction

    fns = []
    for name in modules:
        module = sys.modules.get(name)
        fns += [v for v in vars(module).values() if isinstance(v, JITFunction)] if module else []
    saved = [(f, f.starting_line_number) for f in fns]
    try:
        for f in fns:
            f.starting_line_number = 0
            f.hash = None
        yield
    finally:
        for f, line in saved:
            f.starting_line_number = line
            f.hash = None  # recomputed with the real line numbers when Triton compiles


def _cache_key(launch, spec: Dict[str, Any], arch: int) -> str:
    payload = json.dumps(
        {
            "schema": _SCHEMA,
            "tools": _tool_versions(),
            "kernel": launch.kernel.fn.__name__,
            "source": launch.kernel.cache_key,  # see _keys_without_line_numbers
            "signature": spec["signature"],
            "constexprs": sorted((str(k), repr(v)) for k, v in spec["constexprs"].items()),
            "attrs": sorted((str(k), repr(v)) for k, v in spec["attrs"].items()),
            "options": spec["options"],
            "arch": arch,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    env = os.environ.get("FASTKD_GPU_STATIC_CACHE")
    if env:
        return Path(env)
    if (_ROOT / "kernels").is_dir() and (_ROOT / "setup.py").exists():
        return _ROOT / ".gpu-static-cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastkd" / "gpu-static"


def default_jobs() -> int:
    env = os.environ.get("FASTKD_GPU_STATIC_JOBS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _job_kernel(job: Dict[str, Any]):
    """The job's kernel (imported in the worker) with its constexprs and attributes, as
    ASTSource takes them (JSON turned their tuple keys into lists)."""
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    return kernel, {tuple(k): v for k, v in job["constexprs"]}, {tuple(k): v for k, v in job["attrs"]}


def _frontend_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Lowers one launch to Triton IR under torch.compile's argument types, stopping there.

    Inductor types a Python float passed to a user's Triton kernel as fp64 (torch/_inductor/
    codegen/triton_utils.py, signature_of), where a direct launch gives fp32. A kernel that mixes
    such a scalar into a float32 loop-carried value then fails to compile under torch.compile
    alone, on a GPU (first seen on an H200). Typing is settled in the front end, so the later
    stages (LLVM, ptxas) add nothing here and are skipped. Lowered with the direct launch's
    types too, to compare the fp64 arithmetic of both.
    """
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    result = dict(job["record"])
    t0 = time.perf_counter()
    try:
        kernel, constexprs, attrs = _job_kernel(job)
        target = GPUTarget("cuda", job["arch"], 32)
        backend = make_backend(target)

        def f64_ops(signature) -> List[str]:
            src = ASTSource(kernel, signature, constexprs, attrs)
            options = backend.parse_options(dict(job["options"], **src.parse_options()))
            context = ir.context()
            ir.load_dialects(context)
            backend.load_dialects(context)
            ttir = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
            # A call passes its arguments on (a helper that casts them, kernels/_softmax.py); the
            # arithmetic is counted in the callee's own body.
            return [ln.strip() for ln in str(ttir).splitlines() if "f64" in ln and "tt.func" not in ln
                    and "tt.call" not in ln and not re.search(r"arith\.truncf %\w+ : f64 to f32", ln)]

        compiled_typing = f64_ops(job["signature"])
        result["lowered"] = True
        # A kernel may compute in fp64 on purpose; more fp64 than under a direct launch's types
        # means a float scalar left uncast (kernels/__init__.py).
        extra = len(compiled_typing) - len(f64_ops(job["eager_signature"]))
        if extra > 0:
            result["error"] = (f"{extra} more fp64 ops than a direct launch compiles (a float scalar not cast to "
                               "fp32), e.g. " + " | ".join(compiled_typing[:3])[:600])
    except Exception as exc:  # noqa: BLE001 - a compile error is a result, reported per launch
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        result["error"] = f"{type(exc).__name__}: " + " | ".join(lines[-6:])[:1500]
    result["compile_s"] = round(time.perf_counter() - t0, 3)
    _write_atomic(Path(job["cache_dir"]) / f"{job['key']}.json", json.dumps(result, sort_keys=True).encode())
    return result


def _compile_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Compiles one launch for one architecture (in a worker process) and reads its resources."""
    if job.get("frontend"):
        return _frontend_job(job)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = dict(job["record"])
    t0 = time.perf_counter()
    try:
        kernel, constexprs, attrs = _job_kernel(job)
        src = ASTSource(kernel, job["signature"], constexprs, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=dict(job["options"]))
        cubin = compiled.asm["cubin"]
        cache = Path(job["cache_dir"])
        cubin_path = cache / f"{job['key']}.cubin"
        _write_atomic(cubin_path, cubin)
        usage = resource_usage(str(cubin_path))
        if len(usage) != 1:
            raise RuntimeError(f"expected one function in the cubin, cuobjdump found {len(usage)}")
        u = usage[0]
        result.update(
            regs=u["regs"], stack=u["stack"], local=u["local"], shared_static=u["shared"],
            shared_dynamic=int(compiled.metadata.shared), function=u["function"],
            compile_s=round(time.perf_counter() - t0, 3),
        )
        _write_atomic(cache / f"{job['key']}.json", json.dumps(result, sort_keys=True).encode())
    except Exception as exc:  # noqa: BLE001 - a compile error is a result, reported per launch
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        result["error"] = f"{type(exc).__name__}: " + " | ".join(lines[-6:])[:1500]
        result["compile_s"] = round(time.perf_counter() - t0, 3)
    return result


def _plan(launches, archs, cache: Path, results: List[Dict[str, Any]], frontend: List[Dict[str, Any]],
          todo: List[Dict[str, Any]]) -> None:
    """For each launch and arch: its cached result into ``results``, or a compile job into
    ``todo``; likewise, once a launch, its torch.compile-typed lowering into ``frontend``."""
    for _, launch in launches:
        spec = None
        for arch in archs:
            record = {
                "module": launch.kernel.fn.__module__, "kernel": launch.kernel.fn.__name__, "label": launch.label,
                "variant": launch.variant, "arch": arch, "num_warps": launch.num_warps,
                "threads": 32 * launch.num_warps, "row_bytes": list(launch.row_bytes),
            }
            try:
                spec = _specialize(launch, arch)
            except Exception as exc:  # noqa: BLE001
                results.append(dict(record, error=f"{type(exc).__name__}: {exc}", cached=False))
                spec = None
                continue
            record["signature"] = ", ".join(
                f"{k}={spec['constexprs'].get((i,), '?')!r}" if v == "constexpr" else f"{k}:{v}"
                for i, (k, v) in enumerate(spec["signature"].items())
            )
            key = _cache_key(launch, spec, arch)
            record["cache_key"] = key  # the cubin is <cache_dir>/<cache_key>.cubin
            hit = _cached(cache, key, record)
            if hit is not None:
                results.append(hit)
            else:
                todo.append(_job(record, spec, key, cache))
        if spec is not None and any(_is_float_scalar(v) for v in spec["signature"].values()):
            _plan_frontend(launch, spec, archs[-1], record, cache, frontend, todo)


def _is_float_scalar(typ: str) -> bool:
    return typ in ("fp32", "fp16", "bf16")


def _plan_frontend(launch, spec, arch, record, cache: Path, frontend: List[Dict[str, Any]], todo: List[Dict[str, Any]]) -> None:
    """The launch again with its float scalars typed as torch.compile types them (fp64): see
    :func:`_frontend_job`. One arch: typing does not depend on it."""
    eager_signature = spec["signature"]
    signature = {k: ("fp64" if _is_float_scalar(v) else v) for k, v in eager_signature.items()}
    spec = dict(spec, signature=signature)
    key = _cache_key(launch, spec, arch) + "-frontend"
    record = {k: record[k] for k in ("module", "kernel", "label", "variant")}
    record["arch"] = arch
    hit = _cached(cache, key, record)
    if hit is not None:
        frontend.append(hit)
    else:
        todo.append(dict(_job(record, spec, key, cache), frontend=True, eager_signature=eager_signature))


def _cached(cache: Path, key: str, record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A cached result, with the labels of the launch as listed now; None to compile (again, for
    a torn or unreadable entry)."""
    hit = cache / f"{key}.json"
    if not hit.exists():
        return None
    try:
        return dict(json.loads(hit.read_text()), **record, cached=True)
    except (OSError, ValueError):
        return None


def _job(record: Dict[str, Any], spec: Dict[str, Any], key: str, cache: Path) -> Dict[str, Any]:
    """A worker's job (:func:`_compile_job`): plain JSON-able values, tuple keys as lists."""
    return {
        "record": record, "module": record["module"], "kernel": record["kernel"], "arch": record["arch"],
        "signature": spec["signature"], "constexprs": [[list(k), v] for k, v in spec["constexprs"].items()],
        "attrs": [[list(k), v] for k, v in spec["attrs"].items()], "options": spec["options"],
        "key": key, "cache_dir": str(cache),
    }


def check_triton(
    archs: Sequence[int] = ARCHS,
    jobs: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    select: Optional[str] = None,
) -> Dict[str, Any]:
    """Compiles every Triton launch (or those of ``select``, "module:function") for each arch.

    Must run where the kernels were imported without ``TRITON_INTERPRET=1`` (the interpreter
    replaces them with functions Triton cannot compile): :func:`collect` sees to that.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("check_triton() needs TRITON_INTERPRET unset; use collect(), which runs it in a subprocess")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if select:
        launches, problems = _load_launches(select), []
    else:
        launches, problems = discover_triton()

    results: List[Dict[str, Any]] = []
    frontend: List[Dict[str, Any]] = []
    todo: List[Dict[str, Any]] = []
    prefix = _kernels_package().__name__  # may import the package: before reading sys.modules
    jit_modules = {m for m in list(sys.modules) if m.startswith(prefix)}
    jit_modules |= {l.kernel.fn.__module__ for _, l in launches}
    with _keys_without_line_numbers(jit_modules):
        _plan(launches, archs, cache, results, frontend, todo)

    n_jobs = jobs or default_jobs()
    # Largest integer constexprs (block sizes) first: those compile longest, and a pool ends
    # sooner when they do not come last.
    todo.sort(key=lambda j: -sum(v for k, v in j["constexprs"] if isinstance(v, int) and not isinstance(v, bool)))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastkd-gpu-static-triton-") as triton_cache:
        # Triton's own cache would keep every stage of every compile (~200 kB each); this
        # module caches what it needs.
        old = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = triton_cache
        try:
            # A worker process costs seconds to start (it imports torch and Triton): not worth it
            # for a handful of compiles.
            if n_jobs == 1 or len(todo) <= 4:
                fresh = [_compile_job(j) for j in todo]
            else:
                import concurrent.futures as cf
                import multiprocessing as mp

                # spawn, not fork: the parent has imported torch and Triton, which fork badly.
                with cf.ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn")) as pool:
                    fresh = list(pool.map(_compile_job, todo, chunksize=1))
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old
    for job, r in zip(todo, fresh):
        (frontend if job.get("frontend") else results).append(dict(r, cached=False))
    for r in results:
        if "regs" in r:
            r["shared"] = r["shared_static"] + r["shared_dynamic"]
            r["occupancy"] = occupancy(r["arch"], r["regs"], r["threads"], r["shared"])
    order = {(l.kernel.fn.__module__, l.label, l.variant): i for i, (_, l) in enumerate(launches)}
    results.sort(key=lambda r: (order.get((r["module"], r["label"], r["variant"]), 0), r["arch"]))
    frontend.sort(key=lambda r: order.get((r["module"], r["label"], r["variant"]), 0))
    return {
        "launches": results,
        "torch_compile_typing": frontend,
        "problems": problems,
        "compiled": sum(1 for j in todo if not j.get("frontend")),
        "lowered": sum(1 for j in todo if j.get("frontend")),
        "cached": sum(1 for r in results if r.get("cached")),
        "compile_wall_s": round(time.perf_counter() - t0, 1),
        "jobs": n_jobs,
        "cache_dir": str(cache),
    }


# ----------------------------------------------------------------------------------------------
# CUDA C++: the compiled extension
# ----------------------------------------------------------------------------------------------

# FASTKD_GPU_KERNEL_INFO (csrc/cuda/gpu_kernel_info.h) leaves this string in the library.
_INFO_RE = re.compile(rb"fastkd-gpu-kernel;([A-Za-z_][A-Za-z_0-9]*);threads=([0-9, ]+);row_bytes=([^;\x00]*);")

_CXX_TYPE_BYTES = {
    "float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "at::Half": 2, "at::BFloat16": 2,
    "__half": 2, "__nv_bfloat16": 2, "int": 4, "unsigned int": 4, "long": 8, "unsigned long": 8,
    "long long": 8, "short": 2, "signed char": 1, "unsigned char": 1, "char": 1, "bool": 1,
}
_CXX_SHORT = {"float": "fp32", "double": "fp64", "c10::Half": "fp16", "c10::BFloat16": "bf16"}


def extension_path() -> Optional[str]:
    import importlib.util

    spec = importlib.util.find_spec("fastkd._C")
    return spec.origin if spec and spec.origin else None


def _demangle(names: Iterable[str]) -> Dict[str, str]:
    names = list(names)
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    run = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60)
    out = run.stdout.splitlines()
    return dict(zip(names, out)) if run.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def _short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::k<float, 4>(float const*, ...)`` -> ``k<float, 4>``."""
    text = demangled.strip()
    if text.endswith(")"):
        depth = 0
        for j in range(len(text) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(text[j], 0)
            if depth == 0:
                text = text[:j]
                break
    depth, cut = 0, 0
    for j, c in enumerate(text):
        depth += {"<": 1, ">": -1, "(": 1, ")": -1}.get(c, 0)
        if depth == 0 and (text.startswith("::", j) or c == " "):
            cut = j + (2 if c == ":" else 1)
    return text[cut:]


def _template_args(demangled: str, base: str) -> Optional[List[str]]:
    i = demangled.find(base + "<")
    if i < 0:
        return None
    depth, start, args = 0, i + len(base) + 1, []
    for j in range(start - 1, len(demangled)):
        c = demangled[j]
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
            if depth == 0:
                args.append(demangled[start:j].strip())
                return args
        elif c == "," and depth == 1:
            args.append(demangled[start:j].strip())
            start = j + 1
    return None


def _eval_row_bytes(formula: str, sizes: List[Optional[int]]) -> Optional[Tuple[int, int]]:
    """``formula`` in V (the row length) and $i (bytes of the i-th template argument), affine in
    V: returns (bytes per entry, bytes per row), or None when it cannot be evaluated."""

    def value(v: int) -> Optional[int]:
        text = re.sub(r"\$(\d+)", lambda m: str(sizes[int(m.group(1))]) if int(m.group(1)) < len(sizes) and sizes[int(m.group(1))] else "None", formula)
        if "None" in text:
            return None
        tree = ast.parse(text, mode="eval")

        def ev(node):
            if isinstance(node, ast.Expression):
                return ev(node.body)
            if isinstance(node, ast.Constant) and isinstance(node.value, int):
                return node.value
            if isinstance(node, ast.Name) and node.id == "V":
                return v
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult, ast.Sub)):
                a, b = ev(node.left), ev(node.right)
                return a + b if isinstance(node.op, ast.Add) else a * b if isinstance(node.op, ast.Mult) else a - b
            raise ValueError(f"unsupported expression in row_bytes formula {formula!r}")

        return ev(tree)

    try:
        b0, b1, b2 = value(0), value(1), value(1000)
    except (ValueError, SyntaxError):
        return None
    if None in (b0, b1, b2) or b2 != b0 + 1000 * (b1 - b0):
        return None
    return (b1 - b0, b0)


def check_cuda(so_path: Optional[str] = None, archs: Sequence[int] = ARCHS) -> Dict[str, Any]:
    """Resources of every CUDA kernel in the compiled extension, for each arch it holds."""
    path = so_path or extension_path()
    out: Dict[str, Any] = {"path": path, "kernels": [], "problems": [], "built_with_cuda": None}
    if path is None:
        out["problems"].append(["compile", "the compiled extension fastkd._C was not found (run make build)"])
        return out
    if so_path is None:
        try:
            import torch

            import fastkd  # noqa: F401  (loads the extension and its op schemas)

            out["built_with_cuda"] = bool(torch.ops.fastkd.built_with_cuda())
        except Exception as exc:  # noqa: BLE001
            out["problems"].append(["compile", f"could not ask the extension whether it was built with CUDA: {exc}"])
    if out["built_with_cuda"] is False:
        return out  # FASTKD_NO_CUDA=1: no device code, which cuobjdump would refuse to read
    usage = resource_usage(path)
    if out["built_with_cuda"] is None:
        out["built_with_cuda"] = bool(usage)
    if not out["built_with_cuda"]:
        return out
    if not usage:
        out["problems"].append(["compile", f"{Path(path).name} says it was built with CUDA but holds no GPU code (cuobjdump found none)"])
        return out
    blob = Path(path).read_bytes()
    info = {}
    for name, threads, row_bytes in _INFO_RE.findall(blob):
        info[name.decode()] = {
            "threads": [int(t) for t in threads.decode().replace(" ", "").split(",") if t],
            "row_bytes": row_bytes.decode(),
        }
    demangled = _demangle({u["function"] for u in usage})
    by_func: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for u in usage:
        by_func.setdefault(u["function"], {})[u["arch"]] = u
    undeclared: Dict[str, List[str]] = {}
    for func, per_arch in sorted(by_func.items(), key=lambda kv: demangled[kv[0]]):
        pretty = demangled[func]
        base = next((b for b in sorted(info, key=len, reverse=True) if f"{len(b)}{b}" in func), None)
        record: Dict[str, Any] = {"function": func, "demangled": pretty, "arch": {}}
        if base is None:
            record["name"] = _short_name(pretty)
            undeclared.setdefault(record["name"].split("<")[0], []).append(record["name"])
            threads: List[int] = []
        else:
            targs = _template_args(pretty, base) or []
            record["name"] = f"{base}<{', '.join(_CXX_SHORT.get(a, a) for a in targs)}>" if targs else base
            threads = info[base]["threads"]
            record["threads"] = threads
            record["row_bytes_formula"] = info[base]["row_bytes"]
            rb = _eval_row_bytes(info[base]["row_bytes"], [_CXX_TYPE_BYTES.get(a) for a in targs])
            record["row_bytes"] = list(rb) if rb else None
            for t in threads:
                if t % 32 or t > 1024:
                    out["problems"].append(["convention", f"{record['name']}: declared block size {t} is not a multiple of 32 up to 1024"])
        for arch in archs:
            u = per_arch.get(arch)
            if u is None:
                out["problems"].append([
                    "compile",
                    f"{record['name']} has no sm_{arch} code in {Path(path).name}: build with "
                    "TORCH_CUDA_ARCH_LIST including "
                    f"{arch // 10}.{arch % 10} (the default is 8.0;9.0)"
                ])
                continue
            occ = {str(t): occupancy(arch, u["regs"], t, u["shared"]) for t in threads}
            record["arch"][str(arch)] = dict(
                regs=u["regs"], stack=u["stack"], local=u["local"], shared=u["shared"], occupancy=occ,
            )
        out["kernels"].append(record)
    for base, names in undeclared.items():
        out["problems"].append([
            "convention",
            f"CUDA kernel {base} ({len(names)} instantiation{'s' if len(names) > 1 else ''}) has no "
            "FASTKD_GPU_KERNEL_INFO declaration of the block sizes its launcher uses and the bytes it moves "
            "per row (see csrc/cuda/gpu_kernel_info.h)"
        ])
    return out


# ----------------------------------------------------------------------------------------------
# Everything, and what is wrong with it
# ----------------------------------------------------------------------------------------------


def collect(
    archs: Sequence[int] = ARCHS,
    jobs: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    select: Optional[str] = None,
    pythonpath: Sequence[str] = (),
    cuda: bool = True,
) -> Dict[str, Any]:
    """The whole static report (Triton and CUDA), computed in a fresh Python process.

    A subprocess because the caller may have imported the kernels under ``TRITON_INTERPRET=1``
    (the test suite does, having no GPU), and those cannot be compiled.
    """
    with tempfile.TemporaryDirectory(prefix="fastkd-gpu-static-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--json", str(out), "--archs", ",".join(map(str, archs)), "--quiet"]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        if cache_dir:
            cmd += ["--cache-dir", str(cache_dir)]
        if select:
            cmd += ["--select", select]
        if not cuda:
            cmd += ["--no-cuda"]
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        paths = list(pythonpath) + [str(_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(
                f"python tools/gpu_static.py wrote no report (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
            )
        return json.loads(out.read_text())


def build_report(
    archs: Sequence[int] = ARCHS,
    jobs: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    select: Optional[str] = None,
    cuda: bool = True,
) -> Dict[str, Any]:
    """The report, in this process (see :func:`collect`)."""
    import triton

    t0 = time.perf_counter()
    report: Dict[str, Any] = {"archs": list(archs), "triton": triton.__version__, "ptxas": _ptxas_version()}
    report["triton_kernels"] = check_triton(archs, jobs, cache_dir, select)
    report["cuda_kernels"] = check_cuda(archs=archs) if cuda else None
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return report


def problems(report: Dict[str, Any]) -> Dict[str, List[str]]:
    """What is wrong, by kind: ``compile`` (a launch that did not compile for an arch, or a CUDA
    kernel missing an arch), ``spill`` (STACK or LOCAL above 0), ``launch`` (a block that could
    not start: too many registers or too much shared memory), ``convention`` (a kernel outside
    the conventions of kernels/__init__.py and csrc/cuda/gpu_kernel_info.h)."""
    out: Dict[str, List[str]] = {"compile": [], "spill": [], "launch": [], "convention": []}
    tk = report.get("triton_kernels") or {}
    for kind, message in tk.get("problems", []):
        out[kind].append(message)
    for r in tk.get("launches", []):
        where = f"{r['kernel']} [{r['label']}; {r['variant']}] sm_{r['arch']}"
        if "error" in r:
            out["compile"].append(f"{where}: {r['error']}")
            continue
        if r["stack"] or r["local"]:
            out["spill"].append(f"{where}: {r['regs']} registers, STACK {r['stack']} B, LOCAL {r['local']} B")
        if r["occupancy"]["blocks"] == 0:
            out["launch"].append(f"{where}: cannot start ({r['occupancy']['limiter']})")
    for r in tk.get("torch_compile_typing", []):
        if "error" in r:
            out["compile"].append(
                f"{r['kernel']} [{r['label']}; {r['variant']}] with torch.compile's argument types "
                f"(Python floats as fp64): {r['error']}"
            )
    ck = report.get("cuda_kernels") or {}
    for kind, message in ck.get("problems", []):
        out[kind].append(message)
    for k in ck.get("kernels", []):
        for arch, a in k["arch"].items():
            where = f"{k['name']} sm_{arch}"
            if a["stack"] or a["local"]:
                out["spill"].append(f"{where}: {a['regs']} registers, STACK {a['stack']} B, LOCAL {a['local']} B")
            for t, occ in a["occupancy"].items():
                if occ["blocks"] == 0:
                    out["launch"].append(f"{where} at {t} threads: cannot start ({occ['limiter']})")
    return out


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _bytes_formula(rb: Optional[Sequence[int]]) -> str:
    if not rb:
        return "?"
    a, b = rb
    return f"{a}·V + {b}" if b else f"{a}·V"


def _span(values: List[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _natural(text: str) -> List[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def summary_rows(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per kernel and architecture: how many launches, the range of registers and
    occupancy, the largest stack and local memory."""
    rows: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
    for r in (report.get("triton_kernels") or {}).get("launches", []):
        row = rows.setdefault(("Triton", r["kernel"], r["arch"]), {"launches": 0, "failed": 0, "regs": [], "occ": [], "stack": 0, "local": 0})
        row["launches"] += 1
        if "error" in r:
            row["failed"] += 1
            continue
        row["regs"].append(r["regs"])
        row["occ"].append(r["occupancy"]["occupancy"])
        row["stack"] = max(row["stack"], r["stack"])
        row["local"] = max(row["local"], r["local"])
    for k in (report.get("cuda_kernels") or {}).get("kernels", []):
        base = k["name"].split("<")[0]
        for arch, a in k["arch"].items():
            row = rows.setdefault(("CUDA C++", base, int(arch)), {"launches": 0, "failed": 0, "regs": [], "occ": [], "stack": 0, "local": 0})
            row["launches"] += max(1, len(a["occupancy"]))
            row["regs"].append(a["regs"])
            row["occ"] += [o["occupancy"] for o in a["occupancy"].values()]
            row["stack"] = max(row["stack"], a["stack"])
            row["local"] = max(row["local"], a["local"])
    return [dict(kind=kind, kernel=kernel, arch=arch, **row) for (kind, kernel, arch), row in rows.items()]


def render_markdown(report: Optional[Dict[str, Any]], heading: str = "##") -> str:
    """The resource tables of docs/gpu-static.md ("GPU kernels, statically")."""
    L: List[str] = []
    w = L.append
    w(f"{heading} GPU kernels, statically")
    w("")
    if not report:
        w("Not in this run (the static check did not run or failed; see `python tools/gpu_static.py`).")
        w("")
        return "\n".join(L)
    archs = report["archs"]
    names = [SM_LIMITS[a].name for a in archs]
    arch_names = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    tk = report.get("triton_kernels") or {}
    ck = report.get("cuda_kernels") or {}
    n_tl = len(tk.get("launches", []))
    w(f"Every GPU kernel compiled on this machine, without a GPU, for {arch_names} (Triton "
      f"{report.get('triton', '?')}, ptxas {report.get('ptxas', '?')}), "
      "and its resources read from the cubin with `cuobjdump --dump-resource-usage` "
      f"(`python tools/gpu_static.py`; {n_tl} Triton compilations, {tk.get('compiled', 0)} of them done now "
      f"and {tk.get('cached', 0)} from the cache). Triton kernels: the launch configurations the launchers "
      "choose from, as listed by `static_launches()` in `kernels/<family>.py` (its docstring says which "
      "combinations are compiled). CUDA C++ kernels: every kernel in the compiled extension `fastkd/_C`, "
      "at each block size its launcher chooses from.")
    w("")
    n_typed = len(tk.get("torch_compile_typing", []))
    if n_typed:
        w(f"Every Triton launch with float arguments ({n_typed}) is also lowered to Triton IR with the "
          "types torch.compile gives them (a Python float as fp64, where a direct launch passes fp32): it "
          "must compile and do no more fp64 arithmetic than the direct launch (`kernels/__init__.py`).")
        w("")
    w("*Registers* are per thread; *stack* (spill stack) and *local* are bytes of local memory per "
      "thread, which must be 0 (`tests/test_gpu_static.py` fails otherwise); *shared* is static "
      "shared memory plus, for Triton, the dynamic shared memory its launch requests, per block. "
      "*Occupancy* is theoretical: resident warps per SM over 64, from 65536 registers per SM "
      "(allocated per warp in units of 256, from 4 sub-partitions), 2048 threads, 32 blocks, and "
      + ", ".join(f"{SM_LIMITS[a].smem_per_sm // 1024} KiB of shared memory on sm_{a}" for a in archs)
      + " (plus the driver's 1 KiB per block), as in the CUDA toolkit's `cuda_occupancy.h`. "
      "*Bytes per row* is what one row must move to or from memory at least once (V = row length; "
      "reads and writes each counted once): times the rows, divided by a kernel's time measured on a "
      "GPU, it is the bandwidth the kernel reaches, to compare with the GPU's peak. The kd kernels "
      "read each row twice; the second read is meant to hit L2 and is not counted.")
    w("")
    probs = problems(report)
    bad = [(kind, p) for kind, ps in probs.items() for p in ps]
    if bad:
        w(f"**Problems ({len(bad)}):**")
        w("")
        for kind, p in bad[:40]:
            w(f"- {kind}: {p}")
        if len(bad) > 40:
            w(f"- … and {len(bad) - 40} more (run `python tools/gpu_static.py`)")
    else:
        w("**No problems:** every launch compiled for every architecture, with no spill, and every "
          "block fits on an SM" + (", and lowered with torch.compile's types." if n_typed else "."))
    w("")

    summary = summary_rows(report)
    if summary:
        w("| kernel | arch | launch configurations | registers | stack / local (largest) | occupancy |")
        w("|---|---|---|---|---|---|")
        for row in summary:
            failed = f" ({row['failed']} did not compile)" if row["failed"] else ""
            regs = _span(row["regs"]) if row["regs"] else "n/a"
            occ = f"{_pct(min(row['occ']))} – {_pct(max(row['occ']))}" if row["occ"] else "n/a"
            if row["occ"] and min(row["occ"]) == max(row["occ"]):
                occ = _pct(row["occ"][0])
            w(f"| {row['kind']} `{row['kernel']}` | sm_{row['arch']} | {row['launches']}{failed} | {regs} | "
              f"{row['stack']} / {row['local']} | {occ} |")
        w("")
        w("(CUDA C++: one configuration per instantiation and block size.) Every configuration follows.")
        w("")

    launches = [r for r in tk.get("launches", [])]
    if launches:
        w("### Triton kernels")
        w("")
        w("One row per configuration; where several switch combinations are compiled at that "
          "configuration (the *variants* column), registers show the range over them, stack, "
          "local and shared the largest, occupancy the lowest, bytes per row the largest.")
        w("")
        head = "| kernel | configuration | variants | threads | " + " | ".join(
            f"sm_{a} registers | sm_{a} stack / local | sm_{a} shared | sm_{a} occupancy" for a in archs
        ) + " | bytes per row |"
        w(head)
        w("|" + "---|" * (4 + 4 * len(archs) + 1))
        groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
        for r in launches:
            groups.setdefault((r["kernel"], r["label"]), []).append(r)
        for (kernel, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], _natural(kv[0][1]))):
            cells = []
            variants = {r["variant"] for r in rs}
            threads = {r["threads"] for r in rs}
            for a in archs:
                ok = [r for r in rs if r["arch"] == a and "regs" in r]
                failed = [r for r in rs if r["arch"] == a and "error" in r]
                if not ok:
                    cells += ["compile error" if failed else "n/a", "", "", ""]
                    continue
                occ = min(ok, key=lambda r: r["occupancy"]["occupancy"])["occupancy"]
                cells += [
                    _span([r["regs"] for r in ok]) + (f" ({len(failed)} failed)" if failed else ""),
                    f"{max(r['stack'] for r in ok)} / {max(r['local'] for r in ok)}",
                    str(max(r["shared"] for r in ok)),
                    f"{_pct(occ['occupancy'])} ({occ['limiter']})",
                ]
            rb = max((r["row_bytes"] for r in rs), key=lambda x: (x[0], x[1]))
            w(f"| `{kernel}` | {label} | {len(variants)} | {'/'.join(map(str, sorted(threads)))} | "
              + " | ".join(cells) + f" | {_bytes_formula(rb)} |")
        w("")

    kernels = ck.get("kernels") or []
    if kernels:
        w("### CUDA C++ kernels")
        w("")
        w(f"From `{Path(ck['path']).name}`. Registers do not depend on the block size (one binary per "
          "kernel); occupancy is given at each block size the launcher chooses from. Bytes per row: "
          "with labels and a gradient (the formula the kernel declares: "
          + "; ".join(sorted({f"`{k['name'].split('<')[0]}`: `{k.get('row_bytes_formula', '?')}`" for k in kernels}))
          + ", `$i` = bytes of the i-th template argument).")
        w("")
        w("| kernel | " + " | ".join(
            f"sm_{a} registers | sm_{a} stack / local | sm_{a} shared | sm_{a} occupancy by block size" for a in archs
        ) + " | bytes per row |")
        w("|" + "---|" * (1 + 4 * len(archs) + 1))
        for k in kernels:
            cells = []
            for a in archs:
                d = k["arch"].get(str(a))
                if d is None:
                    cells += ["missing", "", "", ""]
                    continue
                occ = ", ".join(f"{t}: {_pct(o['occupancy'])}" for t, o in d["occupancy"].items())
                cells += [str(d["regs"]), f"{d['stack']} / {d['local']}", str(d["shared"]), occ or "?"]
            w(f"| `{k['name']}` | " + " | ".join(cells) + f" | {_bytes_formula(k.get('row_bytes'))} |")
        w("")
    elif ck and ck.get("built_with_cuda") is False:
        w("CUDA C++ kernels: the extension was built without CUDA (`FASTKD_NO_CUDA=1` or no nvcc), "
          "so there are none to report.")
        w("")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_static.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the whole report here")
    ap.add_argument("--markdown", help="write the resource tables (docs/gpu-static.md's section) here")
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: FASTKD_GPU_STATIC_JOBS or 2)")
    ap.add_argument("--cache-dir", default=None, help="cache folder (default: FASTKD_GPU_STATIC_CACHE or .gpu-static-cache)")
    ap.add_argument("--select", default=None, help="module:function returning the StaticLaunch list to compile instead")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels of the extension")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The kernels were imported (with fastkd) as interpreter functions, which cannot be compiled.
        print("python tools/gpu_static.py: unset TRITON_INTERPRET (or call gpu_static.collect())", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.archs.split(",") if a]
    report = build_report(archs, args.jobs, Path(args.cache_dir) if args.cache_dir else None, args.select, not args.no_cuda)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True))
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(report) + "\n")
    probs = problems(report)
    n_bad = sum(len(v) for v in probs.values())
    if not args.quiet:
        tk = report["triton_kernels"]
        ck = report["cuda_kernels"] or {}
        print(f"tools/gpu_static.py: {len(tk['launches'])} Triton compilations ({tk['compiled']} now with {tk['jobs']} "
              f"processes in {tk['compile_wall_s']} s, {tk['cached']} cached in {tk['cache_dir']}); "
              f"{len(tk.get('torch_compile_typing', []))} lowered with torch.compile's argument types; "
              f"{len(ck.get('kernels', []))} CUDA kernels; {report['elapsed_s']} s")
        for kind, ps in probs.items():
            for p in ps:
                print(f"  {kind}: {p}")
        print("  no problems" if not n_bad else f"  {n_bad} problems")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
