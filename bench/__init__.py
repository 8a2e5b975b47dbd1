"""fastkd microbenchmarks (pytest-benchmark) and the report that turns them into BENCHMARKS.md.

    python -m pytest bench/ --benchmark-only            # the suite, pytest-benchmark's table
    python -m bench.report [--quick] [--out FILE]        # the suite, then BENCHMARKS.md
"""
