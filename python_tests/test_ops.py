"""The citrus ops against the plain-PyTorch reference, on every device present."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import citrus_ext  # noqa: F401  (registers torch.ops.citrus)
from citrus_ext import ops
from conftest import DEVICES
from reference import ref_chunk_scores, ref_compact_kv, ref_evict, ref_segmented_topk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, Hq, Hkv, Lq, L, D): GQA 1:1, 3:1, 4:1, 8:1; Lq from 1 to 300; L up to 5000; odd sizes.
SHAPES = [
    (1, 4, 4, 1, 2, 16),
    (2, 9, 3, 7, 50, 64),
    (3, 8, 2, 33, 97, 32),
    (1, 8, 1, 300, 5000, 64),
    (2, 32, 8, 64, 777, 128),
    (1, 6, 6, 256, 1280, 24),
    (3, 3, 1, 5, 4000, 8),
]


def make_qkv(shape, dtype, device, contiguous=True):
    b, hq, hkv, lq, length, d = shape
    if contiguous:
        q = torch.randn(b, hq, lq, d, device=device).to(dtype)
        k = torch.randn(b, hkv, length, d, device=device).to(dtype)
        v = torch.randn(b, hkv, length, d, device=device).to(dtype)
    else:  # [B, L, H, D] storage seen as [B, H, L, D], as projections produce it
        q = torch.randn(b, lq, hq, d, device=device).to(dtype).transpose(1, 2)
        k = torch.randn(b, length, hkv, d, device=device).to(dtype).transpose(1, 2)
        v = torch.randn(b, length, hkv, d, device=device).to(dtype).transpose(1, 2)
    return q, k, v


def ref_lse(query, key, scale):
    """Per-query log-sum-exp over everything it sees (cache + causal own), in fp32."""
    b, hq, lq, _ = query.shape
    k = key.float().repeat_interleave(hq // key.shape[1], dim=1)
    logits = torch.einsum("bhtd,bhjd->bhtj", query.float(), k) * scale
    lc = key.shape[2] - lq
    j = torch.arange(key.shape[2], device=query.device)
    t = torch.arange(lq, device=query.device).unsqueeze(1)
    logits = logits.masked_fill(~((j < lc) | (j - lc <= t)), float("-inf"))
    return torch.logsumexp(logits, dim=-1)


def assert_topk_consistent(ref_scores, kept, k, tol):
    """``kept`` is a valid top-k of ``ref_scores`` (rows [S, L]) up to ``tol`` of rounding."""
    for s in range(ref_scores.shape[0]):
        row = ref_scores[s]
        idx = kept[s][kept[s] >= 0]
        assert idx.numel() == min(k, row.numel())
        assert torch.all(idx[1:] > idx[:-1]), "kept indices must be strictly ascending"
        mask = torch.ones_like(row, dtype=torch.bool)
        mask[idx] = False
        if mask.any() and idx.numel():
            assert row[idx].min() >= row[mask].max() - tol


# ---------------------------------------------------------------- chunk_scores


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_chunk_scores_matches_reference(device, dtype, shape, granularity):
    q, k, _ = make_qkv(shape, dtype, device, contiguous=shape[0] != 2)
    scale = shape[-1] ** -0.5
    got = ops.chunk_scores(q, k, scale, granularity=granularity)
    want = ref_chunk_scores(q.cpu(), k.cpu(), scale, granularity)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=1e-7)
    # With the log-sum-exp supplied (as flash attention returns it) the result is the same.
    with_lse = ops.chunk_scores(q, k, scale, lse=ref_lse(q, k, scale), granularity=granularity)
    torch.testing.assert_close(with_lse.cpu(), want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_scores_ragged_cache(device):
    q, k, _ = make_qkv((3, 8, 2, 17, 217, 32), torch.float32, device)
    lens = torch.tensor([200, 0, 123], device=device)
    got = ops.chunk_scores(q, k, 0.2, granularity="kv_head", cache_lens=lens)
    want = ref_chunk_scores(q.cpu(), k.cpu(), 0.2, "kv_head", lens.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=1e-7)
    assert torch.all(got[1] == 0) and torch.all(got[2, :, 123:] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_scores_extreme_logits(device):
    """Large logits must not overflow: the normaliser is a log-sum-exp, not a plain sum."""
    q, k, _ = make_qkv((1, 4, 2, 9, 60, 16), torch.float32, device)
    q, k = q * 30, k * 30
    got = ops.chunk_scores(q, k, 1.0)
    want = ref_chunk_scores(q.cpu().double(), k.cpu().double(), 1.0)
    assert torch.isfinite(got).all()
    # A probability's relative error is its logit's absolute error, and float32 rounds a logit
    # of size |x| by about |x|·2^-24 per operation: logits here reach thousands.
    kk = k.cpu().double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    biggest = (q.cpu().double() @ kk.transpose(-1, -2)).abs().max().item()
    torch.testing.assert_close(got.cpu().double(), want, rtol=16 * biggest * 2.0**-24, atol=1e-6)


# ---------------------------------------------------------------- segmented_topk


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s_count,length,k", [(1, 1, 1), (5, 1280, 768), (7, 999, 500), (3, 5000, 4999),
                                              (16, 300, 0), (2, 100, 1000), (4, 4097, 1)])
def test_segmented_topk_matches_reference(device, dtype, s_count, length, k):
    scores = torch.randn(s_count, length, device=device).to(dtype)
    got = ops.segmented_topk(scores, k)
    assert got.dtype == torch.long and got.shape == (s_count, min(k, length))
    assert torch.equal(got.cpu(), ref_segmented_topk(scores.cpu(), k))


@pytest.mark.parametrize("device", DEVICES)
def test_segmented_topk_ragged_ties_nan(device):
    # Few distinct values: ties everywhere; NaN and -0.0 / +0.0 mixed in.
    scores = torch.randint(0, 4, (6, 333), device=device).float()
    scores[0, ::7] = float("nan")
    scores[1, ::3] = -0.0
    scores[2, 10] = float("-inf")
    lengths = torch.tensor([333, 0, 1, 200, 150, 37], device=device)
    for k in (0, 1, 36, 37, 150, 333):
        got = ops.segmented_topk(scores, k, lengths)
        assert torch.equal(got.cpu(), ref_segmented_topk(scores.cpu(), k, lengths.cpu())), k


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.sampled_from([-2.0, -0.0, 0.0, 0.5, 1.0, 3.0, float("inf"), float("-inf"),
                                            float("nan")]), min_size=0, max_size=40), min_size=1, max_size=5),
    k=st.integers(min_value=0, max_value=45),
)
def test_segmented_topk_properties(rows, k):
    """Order preserved, ties to the lower index, NaN last, deterministic: as a stable sort says."""
    length = max(len(r) for r in rows)
    scores = torch.full((len(rows), length), float("nan"))
    for i, r in enumerate(rows):
        scores[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    for device in DEVICES:
        got = ops.segmented_topk(scores.to(device), k, lengths.to(device)).cpu()
        again = ops.segmented_topk(scores.to(device), k, lengths.to(device)).cpu()
        assert torch.equal(got, again)
        assert torch.equal(got, ref_segmented_topk(scores, k, lengths))
        for i, r in enumerate(rows):
            valid = got[i][got[i] >= 0]
            assert valid.numel() == min(k, len(r))
            assert torch.all(valid[1:] > valid[:-1])
            assert torch.all(got[i][valid.numel():] == -1)


# ---------------------------------------------------------------- compact_kv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("append", [0, 1, 37])
def test_compact_kv_matches_reference(device, dtype, per_head, append):
    b, h, length, d, dv, kk = 2, 3, 301, 24, 40, 77
    key = torch.randn(b, length, h, d, device=device).to(dtype).transpose(1, 2)  # non-contiguous
    value = torch.randn(b, h, length, dv, device=device).to(dtype)
    kept = torch.sort(torch.rand(b, h if per_head else 1, length, device=device).argsort(-1)[..., :kk]).values
    kept[0, 0, -3:] = -1  # empty slots give zero rows
    new_k = torch.randn(b, h, append, d, device=device).to(dtype) if append else None
    new_v = torch.randn(b, h, append, dv, device=device).to(dtype) if append else None
    got_k, got_v = ops.compact_kv(key, value, kept, new_k, new_v)
    want_k, want_v = ref_compact_kv(key, value, kept, new_k, new_v)
    assert got_k.is_contiguous() and got_v.is_contiguous()
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


# ---------------------------------------------------------------- evict


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_evict_matches_reference(device, dtype, shape, granularity):
    q, k, v = make_qkv(shape, dtype, device, contiguous=shape[0] != 3)
    lq, lc = shape[3], shape[4] - shape[3]
    keep = max(1, lc // 3)
    scale = shape[-1] ** -0.5
    k_out, v_out, kept = ops.evict(q, k, v, keep, scale, granularity=granularity)
    rows = 1 if granularity == "layer" else shape[2]
    assert kept.shape == (shape[0], rows, min(keep, lc)) and kept.dtype == torch.long
    ref_scores = ref_chunk_scores(q.cpu(), k.cpu(), scale, granularity).reshape(-1, lc)
    assert_topk_consistent(ref_scores, kept.cpu().reshape(-1, kept.shape[-1]), keep, tol=1e-6)
    # Given the kept indices, the compacted tensors are exactly the reference gather.
    want_k, want_v = ref_compact_kv(k, v, kept, k[:, :, lc:], v[:, :, lc:])
    assert torch.equal(k_out, want_k) and torch.equal(v_out, want_v)
    # On inputs without near-ties the kept set is exactly the reference's.
    if dtype == torch.float32:
        _, _, want_kept = ref_evict(q.cpu(), k.cpu(), v.cpu(), keep, scale, granularity)
        ranked = ref_scores.sort(dim=-1, descending=True).values
        boundary_gap = (ranked[:, keep - 1] - ranked[:, keep]).min() if keep < lc else math.inf
        if boundary_gap > 1e-6:
            assert torch.equal(kept.cpu(), want_kept)


@pytest.mark.parametrize("device", DEVICES)
def test_evict_with_lse_and_without_own(device):
    q, k, v = make_qkv((2, 8, 2, 16, 300, 32), torch.float32, device)
    plain = ops.evict(q, k, v, 100, 0.3)
    lse = ops.evict(q, k, v, 100, 0.3, lse=ref_lse(q, k, 0.3))
    assert torch.equal(plain[2], lse[2])
    k_out, v_out, kept = ops.evict(q, k, v, 100, 0.3, keep_own=False)
    assert k_out.shape == (2, 2, 100, 32) and torch.equal(k_out, plain[0][:, :, :100])
    assert torch.equal(kept, plain[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", [284, 285, 10_000])
def test_evict_budget_at_or_above_cache_keeps_everything(device, keep):
    q, k, v = make_qkv((1, 4, 2, 15, 300, 16), torch.bfloat16, device)
    k_out, v_out, kept = ops.evict(q, k, v, keep, 0.25, granularity="kv_head")
    lc = 285
    assert torch.equal(kept.cpu(), torch.arange(min(keep, lc)).expand(1, 2, -1)) or keep < lc
    if keep >= lc:
        assert torch.equal(k_out, k) and torch.equal(v_out, v)
        assert k_out.data_ptr() != k.data_ptr()  # a new tensor: the op never aliases its input


@pytest.mark.parametrize("device", DEVICES)
def test_evict_keep_zero(device):
    q, k, v = make_qkv((2, 4, 4, 3, 10, 8), torch.float32, device)
    k_out, v_out, kept = ops.evict(q, k, v, 0, 0.5)
    assert kept.shape == (2, 1, 0)
    assert torch.equal(k_out, k[:, :, 7:]) and torch.equal(v_out, v[:, :, 7:])


# ---------------------------------------------------------------- opcheck and compile


def opcheck_cases(device):
    q, k, v = make_qkv((2, 6, 3, 5, 40, 16), torch.float32, device)
    lse = ref_lse(q, k, 0.25)
    scores = torch.randn(6, 35, device=device)
    kept = torch.sort(torch.randperm(40, device=device)[:12]).values.expand(2, 1, 12).contiguous()
    return [
        (torch.ops.citrus.chunk_scores.default, (q, k, 0.25), {}),
        (torch.ops.citrus.chunk_scores.default, (q, k, 0.25, lse, "kv_head"), {}),
        (torch.ops.citrus.chunk_scores.default, (q, k, 0.25, None, "layer", torch.tensor([3, 35], device=device)),
         {}),
        (torch.ops.citrus.segmented_topk.default, (scores, 9), {}),
        (torch.ops.citrus.segmented_topk.default, (scores, 9, torch.arange(6, device=device) * 7), {}),
        (torch.ops.citrus.compact_kv.default, (k, v, kept), {}),
        (torch.ops.citrus.compact_kv.default, (k, v, kept, k[:, :, :4], v[:, :, :4]), {}),
        (torch.ops.citrus.evict.default, (q, k, v, 12, 0.25), {}),
        (torch.ops.citrus.evict.default, (q, k, v, 12, 0.25, lse, "kv_head", False), {}),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    cases = opcheck_cases(device)
    assert {c[0]._overloadpacket for c in cases} >= {
        torch.ops.citrus.chunk_scores, torch.ops.citrus.segmented_topk,
        torch.ops.citrus.compact_kv, torch.ops.citrus.evict}
    for op, args, kwargs in cases:
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def step(q, k, v):
        k_out, v_out, kept = torch.ops.citrus.evict(q, k, v, 20, 0.25)
        return k_out * 2, v_out + 1, kept

    q, k, v = make_qkv((1, 8, 2, 16, 90, 32), torch.float32, device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v), step(q, k, v)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------- bad input


def _qkv():
    return make_qkv((1, 4, 2, 4, 20, 8), torch.float32, "cpu")


BAD_EVICT = [
    ("rank", lambda q, k, v: (q[0], k, v, 5, 0.5), r"`query` must be 4-D"),
    ("key rank", lambda q, k, v: (q, k[0], v, 5, 0.5), r"`key` must be 4-D"),
    ("batch", lambda q, k, v: (q, torch.cat([k, k]), v, 5, 0.5), r"`key` batch 2 does not match `query` batch 1"),
    ("head_dim", lambda q, k, v: (q, k[..., :4], v, 5, 0.5), r"`key` head_dim 4 does not match"),
    ("gqa", lambda q, k, v: (q[:, :3], k, v, 5, 0.5), r"`query` heads \(3\) must be a multiple of `key` heads \(2\)"),
    ("lq>l", lambda q, k, v: (torch.randn(1, 4, 30, 8), k, v, 5, 0.5), r"Lq = 30 exceeds `key` length L = 20"),
    ("empty cache", lambda q, k, v: (q, k[:, :, :4], v[:, :, :4], 5, 0.5), r"holds no cache states"),
    ("dtype", lambda q, k, v: (q.half(), k, v, 5, 0.5), r"`query` is Half but `key` is Float"),
    ("int dtype", lambda q, k, v: (q.long(), k.long(), v, 5, 0.5), r"`query` must be float32, float16 or bfloat16"),
    ("value dtype", lambda q, k, v: (q, k, v.double(), 5, 0.5), r"`value` is Double but `key` is Float"),
    ("value shape", lambda q, k, v: (q, k, v[:, :, :7], 5, 0.5), r"`value` shape .* does not match `key` shape"),
    ("keep", lambda q, k, v: (q, k, v, -1, 0.5), r"`keep` must be >= 0, got -1"),
    ("scale nan", lambda q, k, v: (q, k, v, 5, float("nan")), r"`scale` must be finite"),
    ("scale inf", lambda q, k, v: (q, k, v, 5, math.inf), r"`scale` must be finite"),
]


@pytest.mark.parametrize("name,make,message", BAD_EVICT, ids=[c[0] for c in BAD_EVICT])
def test_evict_bad_input(name, make, message):
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError), match=message):
        ops.evict(*make(q, k, v))


def test_bad_granularity_and_lse():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r'`granularity` must be "layer" or "kv_head", got "head"'):
        ops.evict(q, k, v, 5, 0.5, granularity="head")
    with pytest.raises(ValueError, match=r"`lse` must have shape \[B, Hq, Lq\] = \[1, 4, 4\]"):
        ops.evict(q, k, v, 5, 0.5, lse=torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match=r"`cache_lens\[0\]` = 99 must lie in"):
        ops.chunk_scores(q, k, 0.5, cache_lens=torch.tensor([99]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"`key` is on cuda:0 but `query` is on cpu"):
        ops.evict(q, k.cuda(), v, 5, 0.5)


def test_mixed_devices_meta():
    """Mixed devices are caught before any kernel runs (meta stands in for a second device)."""
    q, k, v = _qkv()
    with pytest.raises((ValueError, RuntimeError), match=r"device"):
        torch.ops.citrus.evict(q, k.to("meta"), v, 5, 0.5)


def test_topk_and_compact_bad_input():
    with pytest.raises(ValueError, match=r"`scores` must be 2-D"):
        ops.segmented_topk(torch.randn(3), 1)
    with pytest.raises(ValueError, match=r"`k` must be >= 0"):
        ops.segmented_topk(torch.randn(2, 3), -2)
    with pytest.raises(ValueError, match=r"`lengths\[1\]` = 4 must lie in \[0, L\] = \[0, 3\]"):
        ops.segmented_topk(torch.randn(2, 3), 1, torch.tensor([1, 4]))
    k = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match=r"`kept` holds index 10, outside \[0, L\)"):
        ops.compact_kv(k, k, torch.tensor([[[1, 10]]]))
    with pytest.raises(TypeError, match=r"`kept` must be int64 or int32"):
        ops.compact_kv(k, k, torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match=r"`key_new` and `value_new` must be given together"):
        ops.compact_kv(k, k, torch.tensor([[[1]]]), k)
