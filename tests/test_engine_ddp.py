"""The same command under torchrun: DDP with 2 gloo ranks on the CPU (loopback only)."""

import json
import subprocess
import sys

from engine_helpers import env, summary


def test_two_cpu_ranks(tmp_path):
    out = tmp_path / "ddp"
    e = env()
    e.update({"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastkd", "distill", "--out", str(out), "--epochs", "3",
           "--set", "teacher.count=2", "--set", "train.progress=false", "--set", "train.plot=false",
           "--set", "train.checkpoint_every=10"]
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = summary(out)
    assert s["models"]["teacher"]["accuracy"] > 0.8 and s["models"]["student_kd"]["accuracy"] > 0.8
    # Only rank 0 wrote: one line per evaluation, the table printed once.
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([l for l in lines if l["split"] == "val"]) == 3 * 4
    assert proc.stdout.count("student_kd") == 1
    # The data were split across the ranks: each rank takes half of every 32-sample batch, so an
    # epoch has ceil((train / 2) / 16) optimizer steps.
    first = next(l for l in lines if l["split"] == "val")
    assert first["step"] == -(-(s["data"]["train"] // 2) // 16)
