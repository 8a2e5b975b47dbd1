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
    # What `fastkd bench` (fastkd/bench_cli.py) adds; without them the suite runs as before.
    group.addoption("--bench-ops", default="", help="comma-separated op names (Op.name; default: all)")
    group.addoption(
        "--bench-set", default="full", choices=("full", "headline", "short", "sweep"),
        help="which registered cases: full (BENCHMARKS.md's), headline (one per op), short (the headline "
             "cases, smaller on CPU where the op registers a cpu_quick_size), sweep (sizes per op)",
    )
    group.addoption(
        "--bench-budget", default="", choices=("", "full", "short", "tiny"),
        help="rounds per benchmark (default: full; tiny with --bench-quick)",
    )
    group.addoption("--bench-shapes", default="", help="comma-separated NxV: each op's headline case at these sizes instead")
    group.addoption("--bench-dtypes", default="", help="comma-separated dtypes (fp32, bf16, fp16): each case in each")
    group.addoption("--bench-progress", action="store_true", default=False, help="a progress bar per case on stderr")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-benchmark (trylast) reads its options.
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True
    common.NOTES.quick = config.getoption("bench_quick")
    common.NOTES.machine_start = common.machine_info()
    common.NOTES.peers = common.peer_status(selected_devices(config))
    common.NOTES.selection = {
        "set": "quick" if config.getoption("bench_quick") else config.getoption("bench_set"),
        "budget": budget_name(config),
        "shapes": config.getoption("bench_shapes"),
        "dtypes": config.getoption("bench_dtypes"),
        "ops": config.getoption("bench_ops"),
        "devices": selected_devices(config),
    }
    if config.getoption("bench_progress"):
        config.pluginmanager.register(_Progress(), "fastkd-bench-progress")


def _split(value: str):
    return [x.strip() for x in value.split(",") if x.strip()]


def selected_devices(config):
    wanted = _split(config.getoption("bench_devices"))
    return wanted or common.available_devices()


def budget_name(config) -> str:
    return config.getoption("bench_budget") or ("tiny" if config.getoption("bench_quick") else "full")


def _base_cases(config):
    if config.getoption("bench_quick"):
        base = common.QUICK_CASES
    else:
        base = {"full": common.FULL_CASES, "headline": common.headline_cases(), "short": common.headline_cases(),
                "sweep": common.SWEEP_CASES}[config.getoption("bench_set")]
    shapes = _split(config.getoption("bench_shapes"))
    if shapes:
        try:
            sizes = [common.parse_shape(x) for x in shapes]
        except ValueError as exc:
            raise pytest.UsageError(f"--bench-shapes: {exc}")
        # Each op's headline case (its dtype and params) at each size.
        heads = {}
        for c in (common.QUICK_CASES if config.getoption("bench_quick") else common.FULL_CASES):
            if c.headline:
                heads.setdefault(c.op, c)
        base = [common.OPS[h.op].at_size(h, n, v) for h in heads.values() for n, v in sizes]
    dtypes = _split(config.getoption("bench_dtypes"))
    unknown = [d for d in dtypes if d not in common.DTYPES]
    if unknown:
        raise pytest.UsageError(f"--bench-dtypes: unknown {unknown}; known: {list(common.DTYPES)}")
    if dtypes:
        base = list(dict.fromkeys(c.with_dtype(d) for c in base for d in dtypes))
    return base


def selected_cases(config):
    base = _base_cases(config)
    filters = _split(config.getoption("bench_cases"))
    ops = _split(config.getoption("bench_ops"))  # checked once every op is registered (below)
    cases = [c.with_device(d) for d in selected_devices(config) for c in base if c.runs_on(d)]
    if config.getoption("bench_set") == "short" and not config.getoption("bench_shapes"):
        cases = [common.short_case(c) for c in cases]
    return [
        c for c in cases
        if (not filters or any(f in c.name for f in filters)) and (not ops or c.op in ops)
    ]


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
        for c in cases:
            common.NOTES.case_info.setdefault(c.name, common.case_info(c))
        common.SELECTED_CASES.extend(c for c in cases if c not in common.SELECTED_CASES)
        common.NOTES.providers = [p.name for p in providers]
        # Case, then pass, then provider innermost: the providers being compared run back to
        # back, which is what matters for ratios on a noisy machine.
        # --bench-quick checks every case's answers, which only the fwd+bwd pass does; the
        # separate fwd and bwd passes (timing alone) run for each module's first case, enough to
        # exercise them, instead of tripling the smoke test's time.
        quick = config.getoption("bench_quick")
        items = [
            (case, pass_, prov)
            for i, case in enumerate(cases)
            for pass_ in (common.PASSES if not quick or i == 0 else ("fwdbwd",))
            for prov in providers
            if common.runs(prov, case)
        ]
        metafunc.parametrize("bench_item", items, ids=[f"{c.name}-{p}-{v.name}" for c, p, v in items])
    if "memsys_device" in metafunc.fixturenames:
        devices = selected_devices(config)
        metafunc.parametrize("memsys_device", devices, ids=devices)


@pytest.fixture(scope="session")
def budget(request):
    return common.BUDGETS[budget_name(request.config)]


def _run_order(item) -> int:
    # The start probes first, the end probe last, the op benchmarks between them.
    name = getattr(item, "originalname", item.name)
    if name in ("test_memsys_copy_start", "test_memsys_write"):
        return 0
    return 2 if name == "test_memsys_copy_end" else 1


def pytest_collection_modifyitems(config, items):
    unknown = [o for o in _split(config.getoption("bench_ops")) if o not in common.OPS]
    if unknown:
        raise pytest.UsageError(f"--bench-ops: unknown {unknown}; known: {list(common.OPS)}")
    items.sort(key=_run_order)  # stable: each group keeps its collection order
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.disabled or config.getoption("bench_quick"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with --benchmark-only (or --bench-quick for a smoke run)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value).strip().splitlines()
    return f"{excinfo.typename}: {msg[0] if msg else ''}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A benchmark that raises (outside run_case's own guard) is recorded with its one-line reason,
    # so that the report says which provider failed on which case and why; the run goes on.
    outcome = yield
    report = outcome.get_result()
    params = getattr(getattr(item, "callspec", None), "params", {})
    if report.failed and isinstance(params.get("bench_item"), tuple) and call.excinfo is not None:
        case, pass_, provider = params["bench_item"]
        common.NOTES.failed.setdefault(f"{case.name}|{provider.name}|{pass_}", _one_line(call.excinfo))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastkd"] = common.NOTES.as_dict()


class _Progress:
    """One tqdm bar per case (its passes × providers) on stderr, and one for the memory probes;
    the bar's postfix names the item running. Used by ``fastkd bench``, which sends pytest's own
    output to a log file."""

    def __init__(self):
        self.group_of = {}  # nodeid -> group label
        self.totals = {}  # group label -> items
        self.bar = None
        self.group = None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "bench_item" in params and not isinstance(params["bench_item"], tuple):
                continue  # an op module none of whose cases was selected: skipped at once
            if "bench_item" in params:
                label = params["bench_item"][0].name
            elif getattr(item, "originalname", item.name) == "test_memsys_copy_end":
                label = "memory-system probe (end)"
            else:
                label = "memory-system probes"
            self.group_of[item.nodeid] = label
            self.totals[label] = self.totals.get(label, 0) + 1

    def pytest_runtest_logstart(self, nodeid, location):
        from tqdm import tqdm

        label = self.group_of.get(nodeid)
        if label is None:
            return
        if label != self.group:
            self._close()
            self.group = label
            self.bar = tqdm(total=self.totals[label], desc=label, unit="item", leave=True, dynamic_ncols=True)
        item = nodeid.split("::")[-1]
        self.bar.set_postfix_str(item.rsplit(label + "-", 1)[-1].rstrip("]") if label in item else item, refresh=True)

    def pytest_runtest_logfinish(self, nodeid, location):
        if self.bar is not None and self.group_of.get(nodeid) == self.group:
            self.bar.update(1)

    def pytest_sessionfinish(self, session):
        self._close()

    def _close(self):
        if self.bar is not None:
            self.bar.set_postfix_str("", refresh=False)
            self.bar.close()
            self.bar = None
