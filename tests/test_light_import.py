"""`import fastkd` and every loss need torch and numpy only: the engine's dependencies are an
extra, so a process where they cannot be imported still imports fastkd and runs each loss."""

import subprocess
import sys
import textwrap

from engine_helpers import env

ENGINE_ONLY = ("transformers", "tokenizers", "safetensors", "xxhash", "sklearn", "matplotlib", "tqdm")

SCRIPT = textwrap.dedent(
    """
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None  # `import name` now raises ImportError, as if not installed
    import torch
    import fastkd

    torch.manual_seed(0)
    s, t = torch.randn(6, 11), torch.randn(6, 11)
    labels = torch.tensor([0, 3, 5, 10, 2, 7])
    h_s, w_s, h_t, w_t = torch.randn(6, 4), torch.randn(11, 4), torch.randn(6, 5), torch.randn(11, 5)
    f_s, f_t = torch.randn(4, 3, 5, 5), torch.randn(4, 2, 5, 5)
    top = t.topk(3, dim=-1)
    calls = {{
        "kd_loss": lambda s: fastkd.kd_loss(s, t, 2.0, labels=labels, hard_weight=0.5),
        "dkd_loss": lambda s: fastkd.dkd_loss(s, t, labels),
        "sparse_kd_loss": lambda s: fastkd.sparse_kd_loss(s, top.values, top.indices, 2.0),
        "fused_linear_kd_loss": lambda h: fastkd.fused_linear_kd_loss(h, w_s, h_t, w_t, 2.0),
        "fused_linear_sparse_kd_loss": lambda h: fastkd.fused_linear_sparse_kd_loss(h, w_s, top.values, top.indices, 2.0),
        "hint_loss": lambda s: fastkd.hint_loss(s, t),
        "attention_transfer_loss": lambda f: fastkd.attention_transfer_loss(f, f_t),
        "rkd_distance_loss": lambda s: fastkd.rkd_distance_loss(s, t),
        "rkd_angle_loss": lambda s: fastkd.rkd_angle_loss(s, t),
        "sp_loss": lambda s: fastkd.sp_loss(s, t),
        "pkt_loss": lambda s: fastkd.pkt_loss(s, t),
    }}
    inputs = {{"fused_linear_kd_loss": h_s, "fused_linear_sparse_kd_loss": h_s, "attention_transfer_loss": f_s}}
    losses = [n for n in fastkd.functional.__all__ if not n.endswith("_reference")]
    assert sorted(calls) == sorted(losses), ("a loss without a call here", sorted(set(losses) ^ set(calls)))
    for name in losses:
        x = inputs.get(name, s).clone().requires_grad_(True)
        loss = calls[name](x)
        loss.backward()
        assert torch.isfinite(loss) and x.grad is not None and torch.isfinite(x.grad).all(), name
    fastkd.nn.KDLoss(temperature=2.0)(s, t)
    print("ran", len(losses), "losses")
    """
)


def test_import_fastkd_and_every_loss_without_the_engine_dependencies():
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=ENGINE_ONLY)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran 11 losses" in proc.stdout


def test_distill_without_the_engine_dependencies_says_which_extra_to_install(tmp_path):
    script = (f"import sys\nfor name in {ENGINE_ONLY!r}:\n    sys.modules[name] = None\nfrom fastkd.cli import main\n"
              f"sys.exit(main(['distill', '--out', {str(tmp_path / 'run')!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'fastkd[engine]'" in lines[0], proc.stderr
    assert any(f"module '{name}'" in lines[0] for name in ENGINE_ONLY), proc.stderr
