"""A ``fastkd`` child process that stops after each checkpoint it writes until the test lets it
go on: a test that kills a run once some checkpoint exists cannot race the run to its end.

The child runs the command-line interface with ``fastkd.engine.checkpoint.save`` wrapped: after
writing ``checkpoint.pt`` for the n-th time it creates ``saved-n`` in a signal folder and waits
there until ``go-n`` appears. The test reads the checkpoint while the child waits, and either
lets it go on or signals it (SIGKILL, SIGINT) at that very point.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

from engine_helpers import ROOT

_PAUSING_CLI = textwrap.dedent("""
    import os, sys, time
    signals = sys.argv[1]
    sys.path[:0] = [sys.argv[2]]
    from fastkd.engine import checkpoint
    save = checkpoint.save
    written = 0

    def save_then_wait(path, state):
        global written
        save(path, state)
        if os.path.basename(path) == "checkpoint.pt":
            written += 1
            open(os.path.join(signals, f"saved-{written}"), "w").close()
            while not os.path.exists(os.path.join(signals, f"go-{written}")):
                time.sleep(0.01)

    checkpoint.save = save_then_wait
    from fastkd.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def paused_at_checkpoint(args, out, accept: Callable[[dict], bool], env: dict, timeout: float = 240, **popen) -> subprocess.Popen:
    """Start ``python -m fastkd ARGS`` (writing its run to ``out``) and return it paused right
    after writing the first ``out/checkpoint.pt`` whose state ``accept`` holds for. Fails if the
    run ends, or ``timeout`` seconds pass, before such a checkpoint."""
    from fastkd.engine import checkpoint as ckpt

    signals = Path(tempfile.mkdtemp(prefix="signals-", dir=Path(out).parent))
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen([sys.executable, "-c", _PAUSING_CLI, str(signals), str(ROOT), *map(str, args)], env=env, **popen)
    deadline = time.time() + timeout
    n = 1
    while True:
        while not (signals / f"saved-{n}").exists():
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                _, err = proc.communicate()
                raise AssertionError(f"the run wrote no checkpoint the test waits for (checkpoints seen: {n - 1}): {err}")
            time.sleep(0.01)
        if accept(ckpt.load(os.path.join(out, "checkpoint.pt"))):
            return proc
        (signals / f"go-{n}").touch()
        n += 1


def in_students_phase(state: dict) -> bool:
    """A checkpoint taken inside the students' phase, after its first epoch."""
    return state["phase"] == 1 and state["phase_state"] is not None and state["phase_state"]["epoch"] >= 1
