"""fastkd microbenchmarks (pytest-benchmark) and the report that turns them into BENCHMARKS.md.

Installed with fastkd as ``fastkd.bench`` (pyproject's package-dir), so the modules import each
other relatively: the same files run as ``bench`` in a checkout and as ``fastkd.bench`` when
installed.

    fastkd bench [--quick] [--ops ...] [--out DIR]       # the command users run (fastkd/bench_cli.py)
    python -m pytest bench/ --benchmark-only            # the suite, pytest-benchmark's table
    python -m bench.report [--quick] [--out FILE]        # the suite, then BENCHMARKS.md
"""
