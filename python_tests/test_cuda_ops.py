"""CUDA kernels of the citrus ops against the CPU kernels and the plain-PyTorch reference.

Skipped where no GPU is present. Case ids start with ``small`` or ``large``; the sanitizer run
(``python_tests/run_sanitizer.sh``) selects ``-k small``.
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch

import citrus_ext  # noqa: F401  (registers torch.ops.citrus)
from reference import ref_chunk_scores, ref_compact_kv, ref_evict, ref_segmented_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def poison_allocator() -> None:
    """Leave NaN-filled blocks in the caching allocator so that an unwritten output shows."""
    for n in (1 << 12, 1 << 16, 1 << 20, 1 << 24):
        torch.empty(n, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def make_qk(gen, b, hkv, g, lq, length, d, dtype, layout):
    """Random query/key on the GPU in one of several memory layouts (all with the same values).

    ``contig``: standard; ``hf``: [B, L, H, D] transposed (strided heads); ``slice``: a narrow
    view of a longer buffer; ``unaligned``: data pointers off 16-byte alignment (scalar loads);
    ``strided_d``: a non-unit head-dim stride (the kernel must copy).
    """
    hq = hkv * g
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float32).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=gen, dtype=torch.float32).to(dtype)
    q, k = q.cuda(), k.cuda()
    if layout == "hf":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "slice":
        buf = torch.randn(b, hkv, length + 9, d, device="cuda").to(dtype)
        buf[:, :, 3 : 3 + length] = k
        k = buf[:, :, 3 : 3 + length]
    elif layout == "unaligned":
        q = _offset_copy(q)
        k = _offset_copy(k)
    elif layout == "strided_d":
        qb = torch.empty(b, hq, lq, 2 * d, device="cuda", dtype=dtype).normal_()
        qb[..., ::2] = q
        q = qb[..., ::2]
    return q, k


def _offset_copy(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# chunk_scores

def _score_cases():
    rng = random.Random(7)
    cases = [
        # (size, B, Hkv, G, Lq, L, D, dtype, with_lse, granularity, ragged, layout)
        ("small", 1, 1, 1, 1, 2, 16, "f32", False, "layer", False, "contig"),
        ("small", 1, 2, 4, 3, 40, 32, "bf16", False, "kv_head", False, "contig"),
        ("small", 2, 2, 3, 5, 77, 64, "f16", True, "layer", True, "hf"),
        ("small", 3, 1, 8, 17, 100, 128, "bf16", True, "kv_head", True, "slice"),
        ("small", 2, 4, 1, 33, 150, 80, "f32", False, "layer", True, "unaligned"),
        ("small", 1, 2, 2, 20, 90, 40, "f16", False, "kv_head", False, "strided_d"),
        ("small", 1, 1, 4, 64, 64 + 70, 96, "bf16", False, "layer", False, "contig"),
        ("small", 1, 2, 2, 9, 70, 160, "f16", True, "layer", True, "contig"),  # one row block per step
        ("large", 1, 8, 4, 256, 1280, 128, "bf16", False, "layer", False, "contig"),
        ("large", 2, 8, 4, 256, 1280, 128, "f16", True, "kv_head", True, "hf"),
        ("large", 1, 2, 8, 300, 5000, 128, "bf16", False, "kv_head", True, "contig"),
        ("large", 3, 4, 3, 64, 4000, 64, "f32", False, "layer", True, "slice"),
        ("large", 1, 2, 4, 1, 5000, 256, "bf16", False, "layer", False, "contig"),
        ("large", 1, 2, 4, 7, 3000, 256, "f32", True, "kv_head", False, "contig"),
    ]
    for _ in range(10):
        lq = rng.randint(1, 300)
        cases.append(
            (
                "large",
                rng.randint(1, 3),
                rng.choice([1, 2, 4]),
                rng.choice([1, 3, 4, 8]),
                lq,
                lq + rng.randint(1, 5000 - lq),
                rng.choice([32, 64, 80, 128]),
                rng.choice(list(DTYPES)),
                rng.random() < 0.5,
                rng.choice(["layer", "kv_head"]),
                rng.random() < 0.5,
                rng.choice(["contig", "hf", "slice", "unaligned"]),
            )
        )
    return cases


def _case_id(case):
    return "-".join(str(x) for x in case)


def seed_of(case) -> int:
    """A per-case seed that is stable across processes (unlike hash())."""
    return zlib.crc32(_case_id(case).encode())


@pytest.mark.parametrize("case", _score_cases(), ids=_case_id)
def test_chunk_scores(case):
    _, b, hkv, g, lq, length, d, dt, with_lse, gran, ragged, layout = case
    gen = torch.Generator().manual_seed(seed_of(case))
    dtype = DTYPES[dt]
    q, k = make_qk(gen, b, hkv, g, lq, length, d, dtype, layout)
    scale = d**-0.5
    lc = length - lq
    lens = torch.randint(0, lc + 1, (b,), generator=gen).cuda() if ragged else None
    lse = None
    if with_lse:
        # The natural-log lse of the materialised logits, passed as a transposed view.
        hq = hkv * g
        logits = (q.double().reshape(b, hkv, g * lq, d) @ k.double().transpose(-1, -2)) * scale
        t = torch.arange(lq, device="cuda").repeat(g)
        col = torch.arange(length, device="cuda")
        seen = ((col[None] < lc) | (col[None] - lc <= t[:, None]))[None].expand(b, -1, -1).clone()
        if lens is not None:
            seen &= ~((col[None] >= lens[:, None]) & (col[None] < lc))[:, None, :]
        full = torch.logsumexp(logits.masked_fill(~seen[:, None], float("-inf")), -1)
        lse = full.reshape(b, hq, lq).float().transpose(1, 2).contiguous().transpose(1, 2)
    poison_allocator()
    out = torch.ops.citrus.chunk_scores(q, k, scale, lse, gran, lens)
    torch.cuda.synchronize()
    ref = ref_chunk_scores(q, k, scale, gran, lens)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_cuda
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-5
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=1e-7)
    cpu = torch.ops.citrus.chunk_scores(
        q.cpu(), k.cpu(), scale, None if lse is None else lse.cpu(), gran, None if lens is None else lens.cpu()
    )
    torch.testing.assert_close(out.cpu(), cpu, rtol=2e-4, atol=1e-7)
    if lens is not None:
        col = torch.arange(lc, device="cuda")
        assert (out[(col[None] >= lens[:, None])[:, None].expand_as(out)] == 0).all()


def test_chunk_scores_small_errors():
    q = torch.randn(1, 4, 3, 16, device="cuda")
    k = torch.randn(1, 2, 10, 16, device="cuda")
    with pytest.raises(ValueError, match="granularity"):
        torch.ops.citrus.chunk_scores(q, k, 0.25, None, "head", None)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.citrus.chunk_scores(q, k, float("inf"), None, "layer", None)
    with pytest.raises(ValueError, match="head_dim"):
        torch.ops.citrus.chunk_scores(torch.randn(1, 2, 3, 512, device="cuda"),
                                      torch.randn(1, 2, 10, 512, device="cuda"), 0.1, None, "layer", None)


# ------------------------------------------------------------------------------------------------
# segmented_topk

def _scores(gen, s, length, kind, dtype):
    if kind == "ties":
        x = torch.randint(0, 4, (s, length), generator=gen).float()
    elif kind == "special":
        x = torch.randn(s, length, generator=gen)
        pick = torch.randint(0, 6, (s, length), generator=gen)
        x[pick == 0] = 0.0
        x[pick == 1] = -0.0
        x[pick == 2] = float("nan")
        x[pick == 3] = float("-inf")
        x[(pick == 4) & (torch.rand(s, length, generator=gen) < 0.2)] = float("inf")
    else:
        x = torch.rand(s, length, generator=gen) * 1e-3  # attention-like small positive scores
    return x.to(dtype)


def _topk_cases():
    cases = []
    for size, s, length in (("small", 1, 1), ("small", 3, 50), ("small", 5, 700), ("small", 2, 5000),
                            ("large", 700, 1024), ("large", 3, 20000), ("large", 40, 9000),
                            ("large", 300, 4096), ("large", 1, 70000)):
        for kind in ("rand", "ties", "special"):
            for frac in (0.0, 0.01, 0.5, 0.75, 1.0, 1.5):
                # dtypes take turns: they only change how scores are loaded
                cases.append((size, s, length, kind, frac, list(DTYPES)[len(cases) % len(DTYPES)]))
    return cases


@pytest.mark.parametrize("case", _topk_cases(), ids=_case_id)
def test_segmented_topk(case):
    _, s, length, kind, frac, dt = case
    gen = torch.Generator().manual_seed(seed_of(case))
    x = _scores(gen, s, length, kind, DTYPES[dt])
    k = int(frac * length) if frac < 1.5 else length + 3
    lens_kinds = [None, torch.randint(0, length + 1, (s,), generator=gen)]
    for lens in lens_kinds:
        for lens_dtype in ((torch.int64, torch.int32) if lens is not None else (None,)):
            ln = None if lens is None else lens.to(lens_dtype)
            poison_allocator()
            out = torch.ops.citrus.segmented_topk(x.cuda(), k, None if ln is None else ln.cuda())
            ref = ref_segmented_topk(x, k, ln)
            cpu = torch.ops.citrus.segmented_topk(x, k, ln)
            assert out.dtype == torch.long and out.shape == ref.shape
            assert torch.equal(out.cpu(), ref)
            assert torch.equal(out.cpu(), cpu)


def test_segmented_topk_small_noncontiguous():
    x = torch.rand(8, 300, device="cuda")
    view = x.t().contiguous().t()  # column-major rows
    sub = x[:, ::2]  # non-unit column stride
    for t in (view, sub, x[2:5]):
        torch.testing.assert_close(torch.ops.citrus.segmented_topk(t, 37), ref_segmented_topk(t.cpu(), 37).cuda())


# ------------------------------------------------------------------------------------------------
# compact_kv

def _compact_cases():
    cases = []
    for size, b, h, length, d, dv in (("small", 1, 1, 5, 16, 16), ("small", 2, 3, 40, 64, 32),
                                      ("small", 2, 2, 33, 6, 10), ("small", 1, 4, 100, 80, 80),
                                      ("large", 3, 8, 5000, 128, 128), ("large", 2, 8, 2048, 96, 64)):
        for dt in DTYPES:
            for layer in (True, False):
                for layout in ("contig", "slice", "unaligned"):
                    cases.append((size, b, h, length, d, dv, dt, layer, layout))
    return cases


@pytest.mark.parametrize("case", _compact_cases(), ids=_case_id)
def test_compact_kv(case):
    _, b, h, length, d, dv, dt, layer, layout = case
    gen = torch.Generator().manual_seed(seed_of(case))
    dtype = DTYPES[dt]
    key = torch.randn(b, h, length, d, generator=gen).to(dtype).cuda()
    value = torch.randn(b, h, length, dv, generator=gen).to(dtype).cuda()
    if layout == "slice":
        key = torch.cat([key, key[:, :, :3]], dim=2)[:, :, :length]
        value = value.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "unaligned":
        key, value = _offset_copy(key), _offset_copy(value)
    r = 1 if layer else h
    kk = max(1, length // 2)
    kept = torch.stack([torch.sort(torch.randperm(length, generator=gen)[:kk]).values for _ in range(b * r)])
    kept = kept.view(b, r, kk)
    kept[..., -1] = torch.where(torch.rand(b, r, generator=gen) < 0.5, -1, kept[..., -1])  # empty slots
    ln = 3
    key_new = torch.randn(b, h, ln, d, generator=gen).to(dtype).cuda()
    value_new = torch.randn(b, h, ln, dv, generator=gen).to(dtype).cuda()[..., :dv]
    for idx_dtype in (torch.int64, torch.int32):
        kp = kept.to(idx_dtype).cuda()
        for new in (False, True):
            kn, vn = (key_new, value_new) if new else (None, None)
            poison_allocator()
            ko, vo = torch.ops.citrus.compact_kv(key, value, kp, kn, vn)
            rk, rv = ref_compact_kv(key, value, kp, kn, vn)
            ck, cv = torch.ops.citrus.compact_kv(
                key.cpu(), value.cpu(), kp.cpu(), None if kn is None else kn.cpu(), None if vn is None else vn.cpu()
            )
            assert ko.is_contiguous() and vo.is_contiguous()
            assert torch.equal(ko, rk) and torch.equal(vo, rv)
            assert torch.equal(ko.cpu(), ck) and torch.equal(vo.cpu(), cv)


def test_compact_kv_small_out_of_range_gives_zero_rows():
    key = torch.randn(1, 2, 10, 16, device="cuda")
    value = torch.randn(1, 2, 10, 16, device="cuda")
    kept = torch.tensor([[[0, 10, -5, 3]]], device="cuda")
    ko, vo = torch.ops.citrus.compact_kv(key, value, kept, None, None)
    assert torch.equal(ko[:, :, 1:3], torch.zeros_like(ko[:, :, 1:3]))
    assert torch.equal(ko[:, :, 0], key[:, :, 0]) and torch.equal(vo[:, :, 3], value[:, :, 3])


# ------------------------------------------------------------------------------------------------
# evict

@pytest.mark.parametrize(
    "case",
    [
        ("small", 1, 2, 2, 8, 60, 32, "f32", 20, "layer", True),
        ("small", 2, 1, 4, 5, 40, 64, "bf16", 100, "kv_head", False),
        ("small", 2, 2, 3, 16, 80, 64, "f16", 30, "kv_head", True),
        ("large", 1, 8, 4, 256, 1280, 128, "bf16", 768, "layer", True),
        ("large", 2, 8, 4, 64, 4096, 128, "f16", 1000, "kv_head", True),
        ("large", 3, 4, 2, 300, 5000, 64, "f32", 2000, "layer", False),
    ],
    ids=_case_id,
)
def test_evict(case):
    _, b, hkv, g, lq, length, d, dt, keep, gran, keep_own = case
    gen = torch.Generator().manual_seed(seed_of(case))
    dtype = DTYPES[dt]
    q, k = make_qk(gen, b, hkv, g, lq, length, d, dtype, "contig")
    v = torch.randn(b, hkv, length, d, generator=gen).to(dtype).cuda()
    scale = d**-0.5
    ko, vo, kept = torch.ops.citrus.evict(q, k, v, keep, scale, None, gran, keep_own)
    lc = length - lq
    kk = min(keep, lc)
    # The building blocks on CUDA compose to the same result.
    scores = torch.ops.citrus.chunk_scores(q, k, scale, None, gran, None)
    rows = scores.shape[1]
    want = torch.ops.citrus.segmented_topk(scores.view(b * rows, lc), kk, None).view(b, rows, kk)
    if kk == lc:
        want = torch.arange(lc, device="cuda").expand(b, rows, lc)
    assert torch.equal(kept, want)
    rk, rv = ref_compact_kv(k, v, kept, k[:, :, lc:] if keep_own else None, v[:, :, lc:] if keep_own else None)
    assert torch.equal(ko, rk) and torch.equal(vo, rv)
    # The kept set is the reference top-k up to fp32 rounding of near-ties.
    ref = ref_chunk_scores(q, k, scale, gran).view(b * rows, lc)
    _, _, ref_kept = ref_evict(q, k, v, keep, scale, gran, keep_own)
    for i in range(b * rows):
        mine = ref[i, kept.view(b * rows, kk)[i]]
        theirs = ref[i, ref_kept.view(b * rows, kk)[i]]
        assert torch.allclose(mine.sort().values, theirs.sort().values, rtol=1e-4, atol=1e-9)


def test_evict_small_cuda_graph():
    """evict runs without host synchronisation: it captures in a CUDA graph and replays."""
    b, hkv, g, lq, length, d = 1, 2, 4, 16, 200, 64
    q = torch.randn(b, hkv * g, lq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    torch.ops.citrus.evict(q, k, v, 50, 0.125, None, "layer", True)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = torch.ops.citrus.evict(q, k, v, 50, 0.125, None, "layer", True)
    for _ in range(2):
        q.normal_()
        k.normal_()
        v.normal_()
        graph.replay()
        want = torch.ops.citrus.evict(q, k, v, 50, 0.125, None, "layer", True)
        for got, exp in zip(outs, want):
            assert torch.equal(got, exp)


# ------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels and dispatch agree on CUDA

def test_opcheck_small_cuda():
    q = torch.randn(2, 4, 5, 32, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 30, 32, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, 30, 32, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([10, 25], device="cuda")
    torch.library.opcheck(torch.ops.citrus.chunk_scores.default, (q, k, 0.2, None, "layer", lens))
    torch.library.opcheck(torch.ops.citrus.chunk_scores.default, (q, k, 0.2, None, "kv_head", None))
    s = torch.rand(6, 100, device="cuda")
    torch.library.opcheck(torch.ops.citrus.segmented_topk.default, (s, 40, None))
    torch.library.opcheck(torch.ops.citrus.segmented_topk.default, (s, 40, torch.tensor([1, 5, 40, 60, 99, 100], device="cuda")))
    kept = torch.tensor([[[0, 3, 7]], [[1, 2, -1]]], device="cuda")
    torch.library.opcheck(torch.ops.citrus.compact_kv.default, (k, v, kept, k[:, :, :4], v[:, :, :4]))
    torch.library.opcheck(torch.ops.citrus.evict.default, (q, k, v, 8, 0.2, None, "layer", True))
    torch.library.opcheck(torch.ops.citrus.evict.default, (q, k, v, 8, 0.2, None, "kv_head", False))
