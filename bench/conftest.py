"""Selection and bookkeeping for the fastkd benchmarks.

Run: ``python -m pytest bench/ --benchmark-only`` (add ``--bench-quick`` for tiny shapes).

The project's pytest configuration disables pytest-benchmark (``--benchmark-disable`` in
addopts) so that ``tests/`` never times anything; ``--benchmark-only`` here turns it back on
(pytest-benchmark would otherwise refuse the two options together). Run without
``--benchmark-only``, the full-size benchmarks are skipped; with ``--bench-quick`` each one runs
once, untimed, which checks that the suite works.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import common


def pytest_addoption(parser):
    group = parser.getgroup("fastkd-bench", "fastkd benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False, help="tiny shapes and few rounds (smoke test)")
    group.addoption("--bench-cases", default="", help="comma-separated substrings; keep cases whose name holds one")
    group.addoption("--bench-providers", default="", help="comma-separated provider names (default: all)")
    group.addoption(
        "--bench-devices", default="", help="comma-separated devices (default: cpu, and cuda where a CUDA device exists)"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-benchmark (trylast) reads its options.
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True
    common.NOTES.quick = config.getoption("bench_quick")
    common.NOTES.machine_start = common.machine_info()


def _split(value: str):
    return [x.strip() for x in value.split(",") if x.strip()]


def selected_devices(config):
    wanted = _split(config.getoption("bench_devices"))
    return wanted or common.available_devices()


def selected_cases(config):
    base = common.QUICK_CASES if config.getoption("bench_quick") else common.FULL_CASES
    filters = _split(config.getoption("bench_cases"))
    cases = [c.with_device(d) for d in selected_devices(config) for c in base]
    return [c for c in cases if not filters or any(f in c.name for f in filters)]


def selected_providers(config):
    names = _split(config.getoption("bench_providers"))
    unknown = [n for n in names if n not in common.PROVIDER_BY_NAME]
    if unknown:
        raise pytest.UsageError(f"--bench-providers: unknown {unknown}; known: {list(common.PROVIDER_BY_NAME)}")
    chosen = [common.PROVIDER_BY_NAME[n] for n in names] if names else list(common.PROVIDERS)
    # The baselines are what every ratio is taken against: always measure them.
    for b in reversed(common.BASELINES):
        if common.PROVIDER_BY_NAME[b] not in chosen:
            chosen.insert(0, common.PROVIDER_BY_NAME[b])
    return chosen


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "bench_item" in metafunc.fixturenames:
        ops = getattr(metafunc.module, "BENCH_OPS", ())
        cases = [c for c in selected_cases(config) if c.op in ops]
        providers = selected_providers(config)
        common.NOTES.cases += [c.name for c in cases if c.name not in common.NOTES.cases]
        common.NOTES.providers = [p.name for p in providers]
        # Case, then pass, then provider innermost: the providers being compared run back to
        # back, which is what matters for ratios on a noisy machine.
        items = [
            (case, pass_, prov)
            for case in cases
            for pass_ in common.PASSES
            for prov in providers
            if case.device in prov.devices and (not case.only or prov.name in case.only)
        ]
        metafunc.parametrize("bench_item", items, ids=[f"{c.name}-{p}-{v.name}" for c, p, v in items])
    if "memsys_device" in metafunc.fixturenames:
        devices = selected_devices(config)
        metafunc.parametrize("memsys_device", devices, ids=devices)


@pytest.fixture(scope="session")
def budget(request):
    return common.QUICK_BUDGET if request.config.getoption("bench_quick") else common.FULL_BUDGET


def _run_order(item) -> int:
    # The start probes first, the end probe last, the op benchmarks between them.
    name = getattr(item, "originalname", item.name)
    if name in ("test_memsys_copy_start", "test_memsys_write"):
        return 0
    return 2 if name == "test_memsys_copy_end" else 1


def pytest_collection_modifyitems(config, items):
    items.sort(key=_run_order)  # stable: each group keeps its collection order
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.disabled or config.getoption("bench_quick"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with --benchmark-only (or --bench-quick for a smoke run)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastkd"] = common.NOTES.as_dict()
