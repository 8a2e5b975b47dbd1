"""A pytest plugin for tools/gpu_run.py: tests that would start after a deadline are skipped.

``FASTKD_DEADLINE`` (seconds since the epoch) is the moment after which no test starts; the run
then ends as usual, so pytest prints its summary and pytest-benchmark writes what it measured,
which a killed run would lose. Loaded with ``PYTEST_PLUGINS=pytest_deadline`` and this folder on
``PYTHONPATH``, so it also reaches the pytest that ``fastkd bench`` starts.
"""

import os
import time

import pytest

REASON = "gpu_run deadline reached"


def pytest_runtest_setup(item):
    deadline = float(os.environ.get("FASTKD_DEADLINE", "inf"))
    if time.time() > deadline:
        pytest.skip(REASON)
