"""fastkd/teacher_cache.py: the teacher's top-k written once, in checksummed shards, read back.

The format (shards of safetensors, the manifest), its storage bound, corruption and truncation
refused by file name, a write killed with SIGKILL and resumed without touching finished shards, a
cache refused for another job, and sparse_kd_loss from a cache with K = V equal to kd_loss."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fastkd
from fastkd import teacher_cache as tc

V = 300


def stream(tokens, seed=0):
    """The teacher logits of a made-up token stream, the same for every call."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, V, generator=g) * 3


def write(directory, logits, k, shard_tokens, values="logprobs", resume=False, fingerprints=None):
    spec = tc.CacheSpec(top_k=k, vocab_size=V, tokens=logits.shape[0], values=values, shard_tokens=shard_tokens,
                        fingerprints=fingerprints or {"vocabulary": "vocab-a", "teacher": "teacher-a", "data": "data-a"})
    w = tc.CacheWriter(directory, spec, resume=resume)
    for start in range(w.tokens_done, logits.shape[0], 700):  # chunks that straddle shard boundaries
        w.add(*tc.top_k_rows(logits[start:start + 700], k, values))
    w.finish()
    return w


def test_round_trip_manifest_and_shards(tmp_path):
    logits = stream(2500)
    write(tmp_path / "c", logits, k=16, shard_tokens=1000)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["format"] == "fastkd-teacher-cache" and m["format_version"] == 1 and m["complete"] is True
    assert m["index_dtype"] == "uint16"
    assert m["spec"] == {"top_k": 16, "vocab_size": V, "tokens": 2500, "values": "logprobs", "value_dtype": "bfloat16",
                         "shard_tokens": 1000, "fingerprints": {"vocabulary": "vocab-a", "teacher": "teacher-a", "data": "data-a"},
                         "selection": "top_k"}
    assert [(e["file"], e["token_start"], e["token_end"]) for e in m["shards"]] == [
        ("shard-00000.safetensors", 0, 1000), ("shard-00001.safetensors", 1000, 2000), ("shard-00002.safetensors", 2000, 2500)]
    assert all(e["hash"].startswith("xxh3_128:") and len(e["hash"]) == len("xxh3_128:") + 32 for e in m["shards"])

    cache = tc.TeacherCache(tmp_path / "c")
    idx, val = cache.rows(900, 2100)  # across two shard boundaries
    want_i, want_v = tc.top_k_rows(logits[900:2100], 16)
    assert idx.dtype == torch.int64 and val.dtype == torch.float32
    assert torch.equal(idx, want_i)
    stored = want_v.bfloat16().float()
    assert torch.equal(val, stored - torch.logsumexp(stored, -1, keepdim=True).clamp_min(0))
    assert (torch.logsumexp(val, -1) <= 1e-6).all()
    assert cache.rows(5, 5)[0].shape == (0, 16)
    with pytest.raises(IndexError):
        cache.rows(2400, 2501)


def test_index_dtype_is_the_narrowest():
    assert tc.index_dtype(256) == torch.uint8
    assert tc.index_dtype(257) == torch.uint16
    assert tc.index_dtype(65536) == torch.uint16
    assert tc.index_dtype(65537) == torch.uint32


@pytest.mark.parametrize("k", [32, 128])
def test_storage_within_four_k_plus_sixteen_bytes_per_token(tmp_path, k):
    tokens = 20_000
    g = torch.Generator().manual_seed(k)
    spec = tc.CacheSpec(top_k=k, vocab_size=8192, tokens=tokens, shard_tokens=8192, fingerprints={"vocabulary": "v"})
    w = tc.CacheWriter(tmp_path / "c", spec)
    for start in range(0, tokens, 2000):
        w.add(torch.randint(0, 8192, (2000, k), generator=g), -torch.rand(2000, k, generator=g) * 10)
    w.finish()
    cache = tc.TeacherCache(tmp_path / "c")
    assert cache.bytes == sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    assert 4 * k <= cache.bytes_per_token <= tc.storage_bound(k), cache.bytes_per_token


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_shard_is_refused_by_name(tmp_path, how):
    write(tmp_path / "c", stream(2500), k=8, shard_tokens=1000)
    _corrupt(tmp_path / "c" / "shard-00001.safetensors", how)
    cache = tc.TeacherCache(tmp_path / "c")
    cache.rows(0, 1000)  # the intact shard reads
    with pytest.raises(tc.CacheError) as err:
        cache.verify()
    message = str(err.value)
    assert "shard-00001.safetensors" in message and "\n" not in message
    assert ("corrupted" in message) if how == "flip" else ("truncated" in message)


def test_unfinished_or_foreign_caches_are_refused(tmp_path):
    with pytest.raises(tc.CacheError, match="no manifest.json"):
        tc.TeacherCache(tmp_path)
    spec = tc.CacheSpec(top_k=4, vocab_size=V, tokens=100)
    tc.CacheWriter(tmp_path / "u", spec)
    with pytest.raises(tc.CacheError, match="not finished"):
        tc.TeacherCache(tmp_path / "u")
    with pytest.raises(tc.CacheError, match="--resume"):
        tc.CacheWriter(tmp_path / "u", spec)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(tc.CacheError, match="not empty"):
        tc.CacheWriter(tmp_path / "other", spec)
    for bad, match in ((dict(values="probs"), "values must be"), (dict(top_k=V + 1), "top-k"), (dict(value_dtype="float32"), "value dtype")):
        with pytest.raises(tc.CacheError, match=match):
            tc.CacheWriter(tmp_path / "n", tc.CacheSpec(**{**dict(top_k=4, vocab_size=V, tokens=100), **bad}))


def test_a_cache_for_another_job_is_refused_with_what_differs(tmp_path):
    write(tmp_path / "c", stream(500), k=8, shard_tokens=1000)
    cache = tc.TeacherCache(tmp_path / "c")
    cache.check_matches(fingerprints={"vocabulary": "vocab-a", "data": "data-a"}, tokens=500, top_k=8, vocab_size=V)
    with pytest.raises(tc.CacheError) as err:
        cache.check_matches(fingerprints={"vocabulary": "vocab-b", "data": "data-a"}, tokens=600, top_k=8)
    message = str(err.value)
    assert "vocabulary fingerprint 'vocab-a' (this job: 'vocab-b')" in message and "tokens 500 (this job: 600)" in message
    assert "data" not in message.split("does not match this job:")[1].replace("this job", "")
    # Resuming with another spec names the difference too.
    with pytest.raises(tc.CacheError, match="top_k 8 \\(this job: 16\\)"):
        write(tmp_path / "c", stream(500), k=16, shard_tokens=1000, resume=True)


_KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path[:0] = [sys.argv[2]]
    from test_teacher_cache import stream
    from fastkd import teacher_cache as tc
    logits = stream(10_000)
    spec = tc.CacheSpec(top_k=8, vocab_size=300, tokens=10_000, shard_tokens=1000,
                        fingerprints={"vocabulary": "vocab-a", "teacher": "teacher-a", "data": "data-a"})
    w = tc.CacheWriter(sys.argv[1], spec)
    for start in range(0, 10_000, 700):
        w.add(*tc.top_k_rows(logits[start:start + 700], 8))
        time.sleep(0.2)
    w.finish()
""")


def test_sigkill_while_writing_then_resume_leaves_finished_shards_untouched(tmp_path):
    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out), os.path.dirname(__file__)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                    break
            except (OSError, ValueError):
                pass
            assert proc.poll() is None, "the writer ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = {p.name: (p.stat().st_mtime_ns, tc.file_hash(p)) for p in out.glob("shard-*.safetensors")}
    listed = json.loads((out / "manifest.json").read_text())["shards"]
    assert 3 <= len(listed) < 10 and set(before) >= {e["file"] for e in listed}

    time.sleep(0.01)
    w = write(out, stream(10_000), k=8, shard_tokens=1000, resume=True)
    assert w.complete
    for e in listed:
        p = out / e["file"]
        assert (p.stat().st_mtime_ns, tc.file_hash(p)) == before[e["file"]], f"{e['file']} was rewritten"
    assert not list(out.glob(".*.tmp"))
    write(tmp_path / "fresh", stream(10_000), k=8, shard_tokens=1000)
    resumed, fresh = tc.TeacherCache(out), tc.TeacherCache(tmp_path / "fresh")
    assert [e["hash"] for e in resumed.shards] == [e["hash"] for e in fresh.shards]


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_sparse_kd_from_a_full_width_cache_equals_kd_loss(tmp_path, tail):
    n, T = 64, 2.0
    teacher = stream(n, seed=3)
    student = torch.randn(n, V, generator=torch.Generator().manual_seed(4), requires_grad=True)
    write(tmp_path / "c", teacher, k=V, shard_tokens=50)
    idx, val = tc.TeacherCache(tmp_path / "c").rows(0, n)
    sparse = fastkd.sparse_kd_loss(student, val, idx, T, values="logprobs", tail=tail)
    (g_sparse,) = torch.autograd.grad(sparse, student)
    # The cache stores bf16 log-probabilities: with every entry kept, the sparse loss is kd_loss
    # with those (dense) values as the teacher's logits, to float32 rounding ...
    dense = torch.empty(n, V).scatter_(1, idx, val)
    exact = fastkd.kd_loss(student, dense, T)
    (g_exact,) = torch.autograd.grad(exact, student)
    torch.testing.assert_close(sparse, exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_sparse, g_exact, rtol=1e-4, atol=1e-7)
    # ... and kd_loss with the full-precision teacher, to the storage's bf16 rounding: a
    # log-probability off by at most 2^-8 relative moves the loss by less than 1 %.
    full = fastkd.kd_loss(student, teacher, T)
    torch.testing.assert_close(sparse, full, rtol=1e-2, atol=0)


def test_sampled_rows_give_an_unbiased_gradient_where_top_k_does_not():
    """Sparse Logit Sampling's claim, measured: averaged over many draws, the gradient of
    sparse_kd_loss from K sampled entries (their frequencies, tail 'renormalize') converges to
    the full KD gradient softmax(s) - p at temperature 1; top-K's stays off by the mass it cuts."""
    rows, k, draws = 4, 8, 4000
    teacher = stream(rows, seed=5)
    student = torch.randn(rows, V, generator=torch.Generator().manual_seed(6))
    p = torch.softmax(teacher.double(), -1)
    exact = torch.softmax(student.double(), -1) - p

    def mean_gradient(idx, val, repeats):
        s = student.repeat(repeats, 1).requires_grad_(True)
        loss = fastkd.sparse_kd_loss(s, val, idx, 1.0, values="logprobs", tail="renormalize", reduction="sum")
        (g,) = torch.autograd.grad(loss, s)
        return g.double().reshape(repeats, rows, V).mean(0)

    idx, val = tc.sample_rows(teacher.repeat(draws, 1), k, torch.Generator().manual_seed(7))
    assert (torch.logsumexp(val, -1).abs() < 1e-6).all()  # frequencies sum to 1
    sampled = mean_gradient(idx, val, draws)
    # A frequency over K * draws draws: standard error sqrt(p (1 - p) / (K draws)), plus one draw.
    bound = 5 * (p * (1 - p) / (k * draws)).sqrt() + 2 / (k * draws)
    assert ((sampled - exact).abs() <= bound).all(), float(((sampled - exact).abs() / bound).max())
    # The mass top-K cuts: the gradient's sum over the entries outside each row's top K is that
    # mass m (a bias no number of steps averages out) for top-K, and 0 up to sampling error
    # (standard error sqrt(m (1 - m) / (K draws))) for the samples.
    top_idx, top_val = tc.top_k_rows(teacher, k)
    outside = torch.ones(rows, V, dtype=torch.bool).scatter(1, top_idx, False)
    m = (p * outside).sum(-1)
    cut = lambda g: ((g - exact) * outside).sum(-1)
    assert (cut(sampled).abs() <= 5 * (m * (1 - m) / (k * draws)).sqrt()).all()
    top = mean_gradient(top_idx, top_val, 1)
    assert torch.allclose(cut(top), m, atol=1e-5) and (m > 0.05).all(), m


def test_cached_windows_pair_each_window_with_its_rows(tmp_path):
    """CachedWindows, the cache as a Dataset: window w with rows [w·(C−1), (w+1)·(C−1)), read
    lazily; a DataLoader batches them; windows that do not make the cache's rows are refused."""
    windows, context, k = 12, 6, 4
    logits = stream(windows * (context - 1), seed=8)
    write(tmp_path / "c", logits, k=k, shard_tokens=17)  # shards that cut through windows
    cache = tc.TeacherCache(tmp_path / "c")
    x = torch.arange(windows * context).reshape(windows, context)
    data = tc.CachedWindows(cache, x, x.clone())
    assert len(data) == windows
    xw, yw, idx, val = data[7]
    assert torch.equal(xw, x[7]) and idx.shape == val.shape == (context - 1, k)
    assert torch.equal(idx, cache.rows(35, 40)[0]) and torch.equal(val, cache.rows(35, 40)[1])
    xb, yb, ib, vb = next(iter(torch.utils.data.DataLoader(data, batch_size=5)))
    assert xb.shape == (5, context) and ib.shape == vb.shape == (5, context - 1, k)
    flat_i, flat_v = data.rows(torch.tensor([3, 0, 11]))
    want = [cache.rows(w * 5, w * 5 + 5) for w in (3, 0, 11)]
    assert torch.equal(flat_i, torch.cat([w[0] for w in want])) and torch.equal(flat_v, torch.cat([w[1] for w in want]))
    with pytest.raises(tc.CacheError, match="other windows"):
        tc.CachedWindows(cache, x[:-1], x[:-1])
