"""GPU readiness without a GPU (tools/gpu_static.py).

Every Triton launch the launchers can make (``static_launches()`` of each ``kernels/<family>.py``)
must compile for sm_80 and sm_90 with no register spill, and lower with torch.compile's argument
types (Python floats as fp64) to no more fp64 arithmetic than a direct launch; every CUDA kernel in
the compiled extension must compile with no spill; the checker itself must catch each failure. Nothing here needs a
GPU or the network. The first run compiles a few hundred kernels (minutes on 2 cores); later runs
read them from ``.gpu-static-cache/`` (``make clean`` removes it).
"""

import dataclasses
import inspect
import itertools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: there are no Triton kernels to compile")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import gpu_static  # noqa: E402  (tools/gpu_static.py: a tool of the checkout, not of the package)
from fastkd.kernels import _softmax, kd as kd_kernels  # noqa: E402
from fastkd.ops.divergences import TAKE_BETA  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report():
    return gpu_static.collect()


@pytest.fixture(scope="module")
def found(report):
    return gpu_static.problems(report)


def _listing(items, limit=25):
    shown = "\n  ".join(items[:limit])
    return f"\n  {shown}" + (f"\n  ... and {len(items) - limit} more" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------
# The real kernels
# ----------------------------------------------------------------------------------------------


def test_every_triton_launch_compiles_for_sm80_and_sm90(report, found):
    assert not found["compile"], "GPU kernels that do not compile:" + _listing(found["compile"])
    launches = report["triton_kernels"]["launches"]
    archs = {}
    for r in launches:
        archs.setdefault((r["module"], r["label"], r["variant"]), set()).add(r["arch"])
    missing = [f"{k}: {sorted(set(gpu_static.ARCHS) - a)}" for k, a in archs.items() if a != set(gpu_static.ARCHS)]
    assert not missing, "launches not compiled for every architecture:" + _listing(missing)
    # The kd family is found by discovery, with every launch its static_launches() lists.
    kd = {(r["label"], r["variant"]) for r in launches if r["module"] == "fastkd.kernels.kd"}
    assert kd == {(l.label, l.variant) for l in kd_kernels.static_launches()}


def test_no_register_spills(found):
    assert not found["spill"], "kernels that spill registers to local memory:" + _listing(found["spill"])


def test_every_block_fits_on_an_sm(found):
    assert not found["launch"], "launches that could not start on the GPU:" + _listing(found["launch"])


def test_kernels_follow_the_conventions(found):
    assert not found["convention"], "see kernels/__init__.py and csrc/cuda/gpu_kernel_info.h:" + _listing(found["convention"])


def test_cuda_kernels_of_the_extension(report):
    ck = report["cuda_kernels"]
    if not ck["built_with_cuda"]:
        pytest.skip("the extension was built without CUDA (FASTKD_NO_CUDA=1 or no nvcc)")
    kernels = {k["name"]: k for k in ck["kernels"]}
    assert kernels, f"no CUDA kernels found in {ck['path']}"
    for name, k in kernels.items():
        assert sorted(k["arch"]) == [str(a) for a in gpu_static.ARCHS], f"{name}: compiled for {sorted(k['arch'])}"
        assert k.get("threads"), f"{name}: no block sizes declared"
    # The kd kernel, one instantiation per (student, teacher) dtype pair and load width, moves as
    # many bytes per row as the Triton kernel with labels and a gradient.
    kd = kernels["kd_forward_kernel<fp32, fp32, fp32, 4>"]
    assert kd["threads"] == [64, 128, 256, 512]
    richest_fp32 = [l for l in kd_kernels.static_launches() if _richest(l) and l.label.startswith("fp32 ·")]
    assert kd["row_bytes"] == list(richest_fp32[0].row_bytes) == [12, 12]
    assert kernels["kd_forward_kernel<bf16, fp32, fp32, 1>"]["row_bytes"] == [8, 12]
    assert len([n for n in kernels if n.startswith("kd_forward_kernel<")]) == 4 * 4 * 2


def _richest(launch):
    return all(launch.args[k] == v for k, v in kd_kernels.RICHEST_SWITCHES.items())


def test_report_renders(report):
    text = gpu_static.render_markdown(report)
    assert text.startswith("## GPU kernels, statically")
    assert "**No problems:**" in text
    assert "| `_kd_forward_kernel` | fp32 · BLOCK_V=4096 · 8 warps | 16 | 256 |" in text
    assert "12·V + 12" in text
    if report["cuda_kernels"]["built_with_cuda"]:
        assert "| `kd_forward_kernel<fp32, fp32, fp32, 4>` |" in text and "512: " in text


# ----------------------------------------------------------------------------------------------
# The checker itself
# ----------------------------------------------------------------------------------------------


def deliberate_failures():
    """Launches the checker must flag; tools/gpu_static.py imports this in its own process.

    Neither is a configuration the launcher uses: the kd kernel at BLOCK_V=4096 with 1 warp (128
    elements of each input per thread) runs out of registers and spills; BLOCK_V=3000 is refused by
    tl.arange (not a power of two).
    """
    base = next(
        l for l in kd_kernels.static_launches()
        if _richest(l) and l.label == "fp32 · BLOCK_V=4096 · 8 warps"
    )
    return [
        dataclasses.replace(base, num_warps=1, label="spill demo: BLOCK_V=4096 at 1 warp"),
        dataclasses.replace(base, args={**base.args, "BLOCK_V": 3000}, label="error demo: BLOCK_V=3000"),
    ]


@triton.jit
def _uncast_loop_demo(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    # fp32 accumulator updated with an uncast scalar: fine launched directly, a compile error
    # under torch.compile (scale arrives as fp64), as _kd_forward_kernel was on an H200.
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc = acc + tl.load(x_ptr + offs, mask=offs < n, other=0.0) * scale
    tl.store(out_ptr + tl.arange(0, BLOCK), acc)


@triton.jit
def _uncast_scale_demo(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    # Compiles either way, but under torch.compile the product is computed in fp64.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)


@triton.jit
def _cast_scale_demo(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    scale = tl.cast(scale, tl.float32)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)


def scalar_typing_demos():
    from fastkd.kernels import StaticLaunch

    args = dict(x_ptr=torch.float32, out_ptr=torch.float32, n=1000, scale=0.5, BLOCK=128)
    return [StaticLaunch(k, args, 4, k.fn.__name__) for k in (_uncast_loop_demo, _uncast_scale_demo, _cast_scale_demo)]


def test_checker_flags_uncast_float_scalars():
    demo = gpu_static.collect(select=f"{__name__}:scalar_typing_demos", pythonpath=[str(Path(__file__).parent)], cuda=False)
    assert not any("error" in r for r in demo["triton_kernels"]["launches"]), "all three compile when launched directly"
    typing = {r["kernel"]: r for r in demo["triton_kernels"]["torch_compile_typing"]}
    assert set(typing) == {"_uncast_loop_demo", "_uncast_scale_demo", "_cast_scale_demo"}
    assert "Loop-carried variable acc" in typing["_uncast_loop_demo"]["error"], typing["_uncast_loop_demo"]
    assert "more fp64 ops than a direct launch" in typing["_uncast_scale_demo"]["error"], typing["_uncast_scale_demo"]
    assert "error" not in typing["_cast_scale_demo"], typing["_cast_scale_demo"]
    flagged = gpu_static.problems(demo)["compile"]
    assert len(flagged) == 2 and all("torch.compile's argument types" in p for p in flagged), flagged


def test_checker_flags_a_spill_and_a_compile_error(report):
    used = {(r["label"], r["num_warps"]) for r in report["triton_kernels"]["launches"]}
    assert not any(num_warps == 1 and "BLOCK_V=4096" in label for label, num_warps in used)

    demo = gpu_static.collect(select=f"{__name__}:deliberate_failures", pythonpath=[str(Path(__file__).parent)], cuda=False)
    found = gpu_static.problems(demo)
    for arch in gpu_static.ARCHS:
        spills = [p for p in found["spill"] if "spill demo" in p and f"sm_{arch}:" in p]
        assert len(spills) == 1, found
        assert "255 registers" in spills[0] and "STACK 0 B" not in spills[0], spills[0]
        errors = [p for p in found["compile"] if "error demo" in p and f"sm_{arch}:" in p]
        assert len(errors) == 1 and "power of 2" in errors[0], found["compile"]
    assert not found["launch"] and not found["convention"]


_CACHE_DEMO = """
import torch
import triton
import triton.language as tl


@triton.jit
def _scale_kernel(p, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(p + offs, tl.load(p + offs, mask=offs < n) * FACTOR, mask=offs < n)


def launches():
    from fastkd.kernels import StaticLaunch

    return [StaticLaunch(_scale_kernel, dict(p=torch.float32, n=100, BLOCK=128), 4, "cache demo")]
"""


def test_cache_follows_the_kernel_source(tmp_path):
    """A cached result must never outlive a change to its kernel (a stale entry could hide a
    spill), while moving the kernel down its file recompiles nothing."""
    (tmp_path / "mods").mkdir()
    module = tmp_path / "mods" / "gpu_static_cache_demo.py"

    def run(source):
        module.write_text(source)
        return gpu_static.collect(
            select="gpu_static_cache_demo:launches", pythonpath=[str(tmp_path / "mods")], cuda=False,
            cache_dir=tmp_path / "cache", archs=(90,),
        )["triton_kernels"]

    first = run(_CACHE_DEMO.replace("FACTOR", "2"))
    assert (first["compiled"], first["cached"]) == (1, 0), first
    moved = run("# one more line above the kernel\n" + _CACHE_DEMO.replace("FACTOR", "2"))
    assert (moved["compiled"], moved["cached"]) == (0, 1), moved
    changed = run(_CACHE_DEMO.replace("FACTOR", "3"))
    assert (changed["compiled"], changed["cached"]) == (1, 0), changed
    assert "error" not in changed["launches"][0], changed["launches"][0]


_DISCOVERY_DEMO = {
    "__init__.py": "from fastkd.kernels import StaticLaunch\n",
    # A helper module: jit functions the family's kernel calls, no launches of its own.
    "_helper.py": """
import triton
import triton.language as tl


@triton.jit
def twice(x):
    return inner(x) * 2.0


@triton.jit
def inner(x):
    return x + 1.0
""",
    "family.py": """
import torch
import triton
import triton.language as tl

from . import StaticLaunch, _helper
from ._helper import twice


@triton.jit
def _kernel(out_ptr):
    tl.store(out_ptr, twice(1.0) + _helper.inner(2.0))


def static_launches():
    return [StaticLaunch(_kernel, dict(out_ptr=torch.float32), 1, "demo")]
""",
}


def _discovery_problems(tmp_path, files):
    """discover_triton()'s problems on a package of ``files`` (in a process of its own: kernels
    imported here run in the interpreter and are not JIT functions)."""
    import json
    import os
    import subprocess

    pkg = tmp_path / "demo_kernels"
    pkg.mkdir(parents=True)
    for name, text in files.items():
        (pkg / name).write_text(text)
    code = (
        "import importlib, json, sys; import gpu_static\n"
        "gpu_static._kernels_package = lambda: importlib.import_module('demo_kernels')\n"
        "launches, problems = gpu_static.discover_triton()\n"
        "print(json.dumps([len(launches), problems]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(gpu_static.__file__).parent), *sys.path])
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_discovery_accepts_a_helper_module_and_flags_what_no_launch_reaches(tmp_path):
    """A module of jit helpers without static_launches() passes when listed launches call all of
    it (directly, through ``module.f``, or through another helper); a helper nothing calls, and a
    kernel module without static_launches(), are reported."""
    n, problems = _discovery_problems(tmp_path / "ok", _DISCOVERY_DEMO)
    assert (n, problems) == (1, []), problems
    files = dict(_DISCOVERY_DEMO)
    files["_helper.py"] += "\n\n@triton.jit\ndef unused(x):\n    return x\n"
    files["orphan.py"] = "import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef _k(p):\n    tl.store(p, 1.0)\n"
    n, problems = _discovery_problems(tmp_path / "bad", files)
    assert n == 1 and [kind for kind, _ in problems] == ["convention", "convention"], problems
    assert "_helper.py defines @triton.jit functions that no listed launch reaches (unused)" in problems[0][1]
    assert "orphan.py defines @triton.jit functions that no listed launch reaches (_k)" in problems[1][1]


def test_occupancy_rules():
    occ = gpu_static.occupancy
    # 32 registers: 1024 per warp, 16 warps per sub-partition -> 64 warps: full.
    assert occ(80, 32, 256) == {"blocks": 8, "warps": 64, "occupancy": 1.0, "limiter": "warps"}
    # 33 registers: 1056 per warp, rounded up to 1280 -> 12 warps per sub-partition, 48 per SM,
    # 6 blocks of 8 warps: the allocation granularity costs a quarter of the SM.
    assert occ(90, 33, 256) == {"blocks": 6, "warps": 48, "occupancy": 0.75, "limiter": "registers"}
    # 128 registers at 512 threads: 4096 per warp, 4 per sub-partition -> 16 warps: one block.
    assert occ(80, 128, 512)["blocks"] == 1 and occ(80, 128, 512)["occupancy"] == 0.25
    # One-warp blocks stop at 32 blocks per SM.
    assert occ(80, 16, 32) == {"blocks": 32, "warps": 32, "occupancy": 0.5, "limiter": "blocks"}
    # Shared memory: 48 KiB + the 1 KiB reservation per block -> 3 blocks in 164 KiB, 4 in 228 KiB.
    assert occ(80, 32, 128, 48 * 1024)["blocks"] == 3 and occ(80, 32, 128, 48 * 1024)["limiter"] == "shared memory"
    assert occ(90, 32, 128, 48 * 1024)["blocks"] == 4
    # Blocks that cannot start at all.
    assert occ(80, 255, 1024)["blocks"] == 0  # 8192 registers per warp x 32 warps > 65536
    assert occ(80, 32, 2048)["blocks"] == 0
    assert occ(90, 32, 128, 228 * 1024)["blocks"] == 0
    with pytest.raises(ValueError, match="threads per block"):
        occ(80, 32, 0)


def test_resource_usage_parsing():
    text = """
Fatbin elf code:
================
arch = sm_80
identifier = kd_cuda.cu

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _Z1kPf:
  REG:60 STACK:16 SHARED:816 LOCAL:8 CONSTANT[2]:168 CONSTANT[0]:464 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90

Resource usage:
 Function _Z1kPf:
  REG:64 STACK:0 SHARED:1840 LOCAL:0 CONSTANT[0]:464 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert gpu_static.parse_resource_usage(text) == [
        {"arch": 80, "function": "_Z1kPf", "regs": 60, "stack": 16, "shared": 816, "local": 8},
        {"arch": 90, "function": "_Z1kPf", "regs": 64, "stack": 0, "shared": 1840, "local": 0},
    ]


def test_row_bytes_formula():
    assert gpu_static._eval_row_bytes("V*(2*$0+$1)+$2+8", [4, 2, 4, None]) == (10, 12)
    assert gpu_static._eval_row_bytes("V*$0", [2]) == (2, 0)
    assert gpu_static._eval_row_bytes("V*V", []) is None  # not affine in V
    assert gpu_static._eval_row_bytes("V*$3", [4]) is None  # no such template argument
    assert gpu_static._eval_row_bytes("__import__('os')", []) is None


# ----------------------------------------------------------------------------------------------
# kd: the launcher chooses only what static_launches() lists
# ----------------------------------------------------------------------------------------------


def test_kd_launcher_uses_only_listed_configurations(monkeypatch):
    """Records what kd_forward passes to each kernel for every input that selects a configuration
    (the switches, every divergence, one teacher or an ensemble), and checks that each launch's
    constexprs are a combination static_launches() compiles for that kernel."""
    listed = kd_kernels.static_launches()
    kernels = {k.fn.__name__: k for k in (kd_kernels._kd_forward_kernel, kd_kernels._kd_div_kernel)}
    constexprs = {
        name: {n for n, p in inspect.signature(k.fn).parameters.items() if p.annotation is tl.constexpr} for name, k in kernels.items()
    }
    compiled = {name: [{c: l.args[c] for c in constexprs[name] - {"BLOCK_V"}} for l in listed if l.kernel is k] for name, k in kernels.items()}
    launches = []

    class Recorder:
        def __init__(self, launched):
            self.name = launched.fn.__name__

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, kwargs))

    monkeypatch.setattr(torch.library, "wrap_triton", Recorder)
    inputs = kd_kernels.SWITCH_INPUTS
    seen = set()
    for values in itertools.product(*inputs.values()):
        call = dict(zip(inputs, values))
        if call["hard_weight"] > 0 and not call["has_labels"]:
            continue  # refused by kd_loss's validation before any launch
        labels = torch.zeros(3, dtype=torch.int64) if call["has_labels"] else None
        # kl with one teacher, jsd with one (every switch combination of the divergence kernel
        # is compiled for jsd), every divergence with an ensemble of 3 (M_PAD 4) at the richest;
        # (divergence, beta) as the op layer resolves them.
        for divergence, teachers in (("kl", 1), ("jsd", 1), *((d, 3) for d in kd_kernels.DIVERGENCE_CODES)):
            richest = call == dict(has_labels=True, hard_weight=0.5, temperature=2.0, reduction="batchmean", compute_grad=True)
            if teachers > 1 and not richest:
                continue
            s = torch.zeros(3, 7)
            t = torch.zeros(teachers, 3, 7) if teachers > 1 else s
            w = torch.full((teachers,), 1.0 / teachers) if teachers > 1 else None
            beta = 0.5 if divergence in TAKE_BETA else 0.0
            kd_kernels.kd_forward(s, t, labels, w, divergence, beta, call["temperature"],
                                  call["hard_weight"], -100, call["reduction"], True, call["compute_grad"])
            name, got = launches.pop()
            seen.add(name)
            assert constexprs[name] <= set(got), f"{name}: constexprs {sorted(constexprs[name] - set(got))} not passed by name"
            sw = {c: got[c] for c in constexprs[name] - {"BLOCK_V"}}
            assert sw in compiled[name], f"{name}: kd_forward launched switches {sw} that static_launches() does not compile"
            assert got["num_warps"] == _softmax.num_warps_for(got["BLOCK_V"])
    assert seen == set(kernels)
    # Every row length a GPU launch can get maps to a compiled (BLOCK_V, num_warps) of each kernel.
    for name, k in kernels.items():
        shapes = {(l.args["BLOCK_V"], l.num_warps) for l in listed if l.kernel is k}
        for v in [*range(1, 5000), 32000, 50257, 131072, 2**31 - 1]:
            shape = kd_kernels.launch_config(name, v, True)
            # the kl kernel compiles every block; the divergence kernel the largest block of each
            # warp count, which stands for the smaller ones (its docstring says why)
            if name == "_kd_div_kernel":
                shape = max(s for s in kd_kernels._shapes(name)[0] if s[1] == shape[1])
            assert shape in shapes, (name, v, shape)
