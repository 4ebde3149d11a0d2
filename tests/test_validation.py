"""Bad input raises ValueError naming the argument before any kernel runs; caches stay untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm_paged as tp
from paged_data import make_pool, random_q


@pytest.fixture()
def batch():
    k, v, bt, sl = make_pool([7, 12, 3], page_size=5, num_kv_heads=2, head_dim=64, seed=3)
    q = random_q(3, 4, 64, seed=4)
    return q, k, v, bt, sl


def _decode_raises(match, q, k, v, bt, sl):
    with pytest.raises(ValueError, match=match):
        tp.paged_decode(q, k, v, bt, sl)


def test_ranks(batch):
    q, k, v, bt, sl = batch
    _decode_raises("q", q[0], k, v, bt, sl)
    _decode_raises("k_cache", q, k[0], v, bt, sl)
    _decode_raises("block_table", q, k, v, bt[0], sl)
    _decode_raises("seq_lens", q, k, v, bt, sl[None])


def test_heads_and_dims(batch):
    q, k, v, bt, sl = batch
    _decode_raises("num_qo_heads", q[:, :3].contiguous(), k, v, bt, sl)  # 3 not a multiple of 2
    _decode_raises("head_dim", q[..., :32].contiguous(), k, v, bt, sl)
    _decode_raises("v_cache", q, k, v[..., :32].contiguous(), bt, sl)
    _decode_raises("v_cache", q, k, v.half(), bt, sl)
    _decode_raises("q", q.half(), k, v, bt, sl)
    _decode_raises("q", q[:2], k, v, bt, sl)  # batch mismatch
    _decode_raises("dtype", q.double(), k.double(), v.double(), bt, sl)
    _decode_raises("block_table", q, k, v, bt.float(), sl)
    _decode_raises("k_cache", q, k.transpose(1, 2), v.transpose(1, 2), bt, sl)  # not contiguous


def test_page_indices_and_lengths(batch):
    q, k, v, bt, sl = batch
    bad = bt.clone()
    bad[1, 1] = k.shape[0]  # a page the sequence uses, out of range
    _decode_raises(r"block_table\[1, 1\]", q, k, v, bad, sl)
    bad[1, 1] = -1
    _decode_raises("block_table", q, k, v, bad, sl)
    ok = bt.clone()
    ok[2, 1:] = 10**6  # past sequence 2's last page: ignored
    tp.paged_decode(q, k, v, ok, sl)
    _decode_raises("seq_lens", q, k, v, bt, torch.tensor([7, 0, 3], dtype=torch.int32))
    _decode_raises("seq_lens", q, k, v, bt, torch.tensor([7, -2, 3], dtype=torch.int32))
    _decode_raises("exceeds", q, k, v, bt, torch.tensor([7, 16, 3], dtype=torch.int32))
    _decode_raises("seq_lens", q, k, v, bt, torch.tensor([7, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="scale"):
        tp.paged_decode(q, k, v, bt, sl, scale=float("nan"))


def test_prefill_cu_seqlens(batch):
    q, k, v, bt, sl = batch
    qp = random_q(6, 4, 64, seed=5)
    for cu, match in [([0, 2, 1, 6], "monotone"), ([0, 2, 4, 5], "last entry"), ([1, 2, 4, 6], "start"),
                      ([0, 2, 6], "entries"), ([0, 0, 2, 6], "seq_lens")]:
        with pytest.raises(ValueError, match=match):
            tp.paged_prefill(qp, k, v, bt, sl, torch.tensor(cu, dtype=torch.int32))


def test_write_kv_rejects_and_leaves_cache(batch):
    _, k, v, _, _ = batch
    k0, v0 = k.clone(), v.clone()
    new = torch.randn(3, 2, 64)
    capacity = k.shape[0] * k.shape[1]
    for slots, match in [([0, 1, capacity], "slot_mapping"), ([0, 1, -2], "slot_mapping"), ([4, 4, 5], "same slot"),
                         ([0, 1], "slot_mapping")]:
        with pytest.raises(ValueError, match=match):
            tp.write_kv(new, new, k, v, torch.tensor(slots))
    with pytest.raises(ValueError, match="k"):
        tp.write_kv(new[..., :32], new, k, v, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="v"):
        tp.write_kv(new, new.half(), k, v, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="slot_mapping"):
        tp.write_kv(new, new, k, v, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(k.nan_to_num(3), k0.nan_to_num(3)) and torch.equal(v.nan_to_num(3), v0.nan_to_num(3))


def test_copy_pages_rejects(batch):
    _, k, v, _, _ = batch
    n = k.shape[0]
    for src, dst, match in [([0], [n], "dst_pages"), ([-1], [1], "src_pages"), ([0, 1], [2, 2], "distinct"),
                            ([0, 1], [1, 2], "also a source"), ([0, 1], [2], "dst_pages")]:
        with pytest.raises(ValueError, match=match):
            tp.copy_pages(k, v, np.array(src, dtype=np.int32), np.array(dst, dtype=np.int32))


def test_non_tensor_argument(batch):
    q, k, v, bt, sl = batch
    with pytest.raises(ValueError, match="q"):
        tp.paged_decode(q.tolist(), k, v, bt, sl)


# ----------------------------------------------------------------------------- arguments that are written
def test_write_kv_refuses_aliased_or_read_only_outputs(batch):
    """The caches are written in place: they must be writable and share memory with no other argument (the spec's
    roles), checked before any write, so the caches stay untouched."""
    _, k, v, _, _ = batch
    k0, v0 = k.clone(), v.clone()
    new = torch.randn(3, 2, 64)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="^v_cache: shares memory with k_cache"):
        tp.write_kv(new, new, k, k, slots)
    with pytest.raises(ValueError, match="^k_cache: shares memory with k"):
        tp.write_kv(k[0, :3], new, k, v, slots)  # the new keys are a view of the cache itself
    with pytest.raises(ValueError, match="^v_cache: shares memory with v"):
        tp.write_kv(new, v.view(-1, 2, 64)[5:8], k, v, slots)
    ro = v.numpy().copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="^v_cache: the array is read-only"):
        tp.write_kv(new.numpy(), new.numpy(), k.numpy().copy(), ro, slots.numpy())
    assert torch.equal(k.nan_to_num(3), k0.nan_to_num(3)) and torch.equal(v.nan_to_num(3), v0.nan_to_num(3))


def test_copy_pages_refuses_aliased_caches(batch):
    _, k, v, _, _ = batch
    src, dst = torch.tensor([0], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match="^v_cache: shares memory with k_cache"):
        tp.copy_pages(k, k, src, dst)
    ro = k.numpy().copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="^k_cache: the array is read-only"):
        tp.copy_pages(ro, v.numpy(), src.numpy(), dst.numpy())


def test_read_only_inputs_are_accepted(batch):
    """Read-only arrays are fine where the kernel only reads them (decode's caches and query)."""
    q, k, v, bt, sl = batch
    arrays = [x.numpy().copy() for x in (q, k, v, bt, sl)]
    for a in arrays:
        a.flags.writeable = False
    out = tp.paged_decode(*arrays)
    assert np.array_equal(np.nan_to_num(out), np.nan_to_num(tp.paged_decode(q, k, v, bt, sl).numpy()))


def test_out_argument(batch):
    q, k, v, bt, sl = batch
    want = tp.paged_decode(q, k, v, bt, sl)
    out = torch.full_like(q, float("nan"))
    got = tp.paged_decode(q, k, v, bt, sl, out=out)
    assert got is out and torch.equal(out, want)
    for bad, match in [(q, "^out: shares memory with q"), (torch.empty(3, 4, 32), "^out: expected"),
                       (torch.empty(3, 4, 64, dtype=torch.float16), "^out: expected"),
                       (torch.empty(3, 64, 4).transpose(1, 2), "^out: expected")]:
        with pytest.raises(ValueError, match=match):
            tp.paged_decode(q, k, v, bt, sl, out=bad)
    ro = np.empty((3, 4, 64), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="^out: the array is read-only"):
        tp.paged_decode(q.numpy(), k.numpy(), v.numpy(), bt.numpy(), sl.numpy(), out=ro)


def test_plan_binds_once_and_checks_what_changes_per_layer(batch):
    """A plan run over several layers' caches reuses one binding and stays correct; what its key does not pin
    (the caches' contiguity) is still checked on every run."""
    from tvm_paged import reference

    q, k, v, bt, sl = batch
    plan = tp.plan_decode(bt, sl, page_size=5, num_pages=k.shape[0])
    layers = [(k, v), (torch.randn_like(k), torch.randn_like(v)), (v, k)]
    for kc, vc in layers:
        ref, _ = reference.decode(q, kc, vc, bt, sl)
        assert (tp.run_decode(plan, q, kc, vc) - ref).abs().max() < 1e-5
    assert len(plan.bindings) == 1
    strided = torch.empty(k.shape[0], k.shape[2], k.shape[1], k.shape[3]).transpose(1, 2)
    strided.copy_(k)
    with pytest.raises(ValueError, match="^k_cache: the cache must be contiguous"):
        tp.run_decode(plan, q, strided, v)
    outs = [tp.run_decode(plan, q, kc, vc) for kc, vc in layers[:2]]
    assert outs[0].data_ptr() != outs[1].data_ptr()  # each run's output is its own, not a reused buffer


@pytest.mark.parametrize("lib", ["torch", "numpy"])
@pytest.mark.parametrize("table", ["block_table", "seq_lens"])
def test_plan_owns_its_tables(batch, lib, table):
    """A plan keeps its own copy of the tables it checked: changing the caller's arrays afterwards (a page id
    far out of range, a length past the table) changes neither the plan nor what its runs read."""
    from tvm_paged import reference

    q, k, v, bt, sl = batch
    if lib == "numpy":
        q, k, v, bt, sl = (t.numpy() for t in (q, k, v, bt, sl))
    bt_given, sl_given = bt.copy() if lib == "numpy" else bt.clone(), sl.copy() if lib == "numpy" else sl.clone()
    plan = tp.plan_decode(bt_given, sl_given, page_size=5, num_pages=k.shape[0])
    if table == "block_table":
        bt_given[:] = 10**8
    else:
        sl_given[:] = 10**6
    ref, _ = reference.decode(*(torch.as_tensor(t) for t in (q, k, v, bt, sl)))
    out = torch.as_tensor(tp.run_decode(plan, q, k, v))
    assert (out - ref).abs().max() < 1e-5


def test_second_plan_of_a_shape_still_checks_the_caches(batch):
    """A plan of a shape this thread has run before reuses the checked configuration; a strided cache is still
    refused with the cache's name, not left to TVM."""
    q, k, v, bt, sl = batch
    tp.run_decode(tp.plan_decode(bt, sl, page_size=5, num_pages=k.shape[0]), q, k, v)
    strided = torch.empty(k.shape[0], k.shape[2], k.shape[1], k.shape[3]).transpose(1, 2)
    strided.copy_(k)
    for lib in ("torch", "numpy"):
        args = (q, strided, v) if lib == "torch" else (q.numpy(), strided.numpy(), v.numpy())
        tables = (bt, sl) if lib == "torch" else (bt.numpy(), sl.numpy())
        plan = tp.plan_decode(*tables, page_size=5, num_pages=k.shape[0])
        with pytest.raises(ValueError, match="^k_cache: the cache must be contiguous"):
            tp.run_decode(plan, *args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale=1e39), "^scale: must be finite as a float32"),
    (dict(scale="abc"), "^scale: expected a float"),
    (dict(scale=float("nan")), "^scale: must be finite"),
    (dict(logits_soft_cap=1e39), "^logits_soft_cap: must be finite as a float32"),
    (dict(logits_soft_cap=1e-50), "^logits_soft_cap: must be positive as a float32"),
])
def test_float_options_must_fit_float32(batch, kwargs, match):
    """Numbers the kernels take as float32 are checked as float32: 1e39 would be inf there, 1e-50 zero."""
    q, k, v, bt, sl = batch
    with pytest.raises(ValueError, match=match):
        tp.paged_decode(q, k, v, bt, sl, **kwargs)


@pytest.mark.parametrize("value, match", [(1e39, "finite"), (1e-50, "positive"), (-1.0, "positive"),
                                          ("2", "expected a float")])
def test_fp8_scales_must_fit_float32(batch, value, match):
    q, k, v, bt, sl = batch
    k8, v8 = k.to(torch.float8_e5m2), v.to(torch.float8_e5m2)
    for name in ("k_scale", "v_scale"):
        with pytest.raises(ValueError, match=f"^{name}: .*{match}"):
            tp.paged_decode(q, k8, v8, bt, sl, **{name: value})


def test_plan_kind_and_pool_arguments(batch):
    q, k, v, bt, sl = batch
    cu = torch.arange(4, dtype=torch.int32)
    prefill = tp.plan_prefill(bt, sl, cu, 3, page_size=5, num_pages=k.shape[0])
    with pytest.raises(ValueError, match="^plan: a prefill plan was given to run_decode"):
        tp.run_decode(prefill, q, k, v)
    for name, value in (("num_pages", "8"), ("page_size", 5.0), ("num_pages", 0)):
        args = {**dict(page_size=5, num_pages=k.shape[0]), name: value}
        with pytest.raises(ValueError, match=f"^{name}: expected an int >= 1"):
            tp.plan_decode(bt, sl, **args)


def test_one_plan_run_from_several_threads():
    """A plan's binding holds its thread's scratch (split partials, LSE): a plan shared by threads, each running
    its own q many times at once, gives each thread its own correct answer (they had shared one scratch)."""
    import threading

    from tvm_paged import reference

    k, v, bt, sl = make_pool([700, 97], page_size=5, num_kv_heads=2, head_dim=64, seed=11)
    plan = tp.plan_decode(bt, sl, page_size=5, num_pages=k.shape[0])
    assert plan.num_splits > 1  # the case with scratch to share
    qs = [random_q(2, 4, 64, seed=20 + i) for i in range(3)]
    refs = [reference.decode(q, k, v, bt, sl) for q in qs]
    tp.run_decode(plan, qs[0], k, v)  # bound first in this thread, as a serving loop hands a plan on
    errors, start = [], threading.Barrier(len(qs))

    def worker(i):
        start.wait()
        for _ in range(60):
            out, lse = tp.run_decode(plan, qs[i], k, v, return_lse=True)
            err = max(float((out - refs[i][0]).abs().max()), float((lse - refs[i][1]).abs().max()))
            if err > 1e-4:
                errors.append((i, err))
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(qs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
