"""pytest plugin of tools/mutate.py's baseline run: keeps exactly the tests that some mutation
selects (one of its paths or node ids, narrowed by its -k), so that the unmutated tree runs the
union of every selection once. The selections come as JSON in FASTKD_MUTATE_SELECTIONS:
``[[[path or node id, ...], k or null], ...]``."""

import json
import os

try:  # pytest's own -k matching; without it a selection keeps every test under its paths
    from _pytest.mark import KeywordMatcher
    from _pytest.mark.expression import Expression
except ImportError:  # pragma: no cover - a pytest that moved them
    KeywordMatcher = Expression = None


def _under(nodeid: str, selection: str) -> bool:
    return nodeid == selection or nodeid.startswith((selection + "::", selection + "["))


def pytest_collection_modifyitems(config, items):
    selections = []
    for paths, k in json.loads(os.environ["FASTKD_MUTATE_SELECTIONS"]):
        selections.append((paths, Expression.compile(k) if k and Expression is not None else None))
    keep, drop = [], []
    for item in items:
        wanted = any(
            any(_under(item.nodeid, p) for p in paths) and (expr is None or expr.evaluate(KeywordMatcher.from_item(item)))
            for paths, expr in selections
        )
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
