"""pfa_fx.counter_rng: Philox-4x32-10 known answers, slices, dtypes, quality, eager == compiled."""

import math

import pytest
import torch

from pfa_fx import counter_rng as cr
from pfa_fx import exact_math as em

MASK = 0xFFFFFFFF

# Random123 kat_vectors, philox4x32 10 rounds: counter, key, expected output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK, MASK, MASK, MASK), (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_known_answers(counter, key, expected):
    got = cr.philox4x32(torch.tensor([counter], dtype=torch.int64), key)
    assert tuple(got[0].tolist()) == expected


def test_philox_batch_matches_single():
    counters = torch.tensor([k[0] for k in KAT[:2]], dtype=torch.int64)
    got = cr.philox4x32(counters, (0, 0))
    assert tuple(got[0].tolist()) == KAT[0][2]


@pytest.fixture(scope="module")
def whole():
    return cr.gaussian(11, 5, 0, 3 * cr.TILE + 37, dtype=torch.float64, compiled=False)


def test_values_match_libm_box_muller(whole):
    """Position layout and transform against a float64 reference built from math.log/cos/sin."""
    words = cr.philox4x32(torch.tensor([[0, 0, 5, 0], [1, 0, 5, 0]], dtype=torch.int64), (11, 0))
    for b in range(2):
        w = [int(v) for v in words[b]]
        for pair in range(2):
            u = (w[2 * pair] + 0.5) / 2**32
            theta = 2 * math.pi * (w[2 * pair + 1] + 0.5) / 2**32
            r = math.sqrt(-2 * math.log(u))
            for j, ref in ((2 * pair, r * math.cos(theta)), (2 * pair + 1, r * math.sin(theta))):
                got = whole[j * cr.TILE_BLOCKS + b].item()  # position 256 j + b: normal j of block b
                assert abs(got - ref) <= 4e-15 * max(1.0, abs(ref)), (b, j, got, ref)


def test_transform_accuracy():
    """The libm-free log, sqrt, cos, sin against float64 libm over many words."""
    w = torch.randint(0, 2**32, (20000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    w = torch.cat([w, torch.tensor([0, 1, 2**31, 2**32 - 2, 2**32 - 1, 2**29 - 1, 2**29])])
    u = (w.double() + 0.5) / 2**32
    L = em._neg2log(w)
    assert ((L - (-2 * u.log())).abs() / L).max() < 1e-15
    r = em._sqrt(L)
    assert ((r - torch.tensor([math.sqrt(v) for v in L.tolist()], dtype=torch.float64)).abs() / r).max() < 5e-16
    c, s = em._cos_sin(w)
    theta = [2 * math.pi * v for v in u.tolist()]
    assert (c - torch.tensor([math.cos(t) for t in theta], dtype=torch.float64)).abs().max() < 2e-15
    assert (s - torch.tensor([math.sin(t) for t in theta], dtype=torch.float64)).abs().max() < 2e-15


@pytest.mark.parametrize(
    ("start", "count"), [(0, 1), (1, 7), (3, 1021), (1000, 2000), (1023, 2), (1024, 2048), (2047, 1060), (5, 0)]
)
def test_slice_equals_whole(whole, start, count):
    got = cr.gaussian(11, 5, start, count, dtype=torch.float64, compiled=False)
    assert torch.equal(got, whole[start : start + count])


def test_dtypes_are_float64_cast(whole):
    n = whole.numel()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = cr.gaussian(11, 5, 0, n, dtype=dtype, compiled=False)
        assert got.dtype == dtype
        assert torch.equal(got, whole.to(dtype)), dtype


def test_odd_lengths_scalar_and_vector_paths_agree(whole):
    """Lengths that leave ATen's vectorized loops a scalar tail give the same numbers."""
    for start, count in [(0, 1), (0, 3), (0, 13), (17, 29), (100, 999)]:
        got = cr.gaussian(11, 5, start, count, dtype=torch.float64, compiled=False)
        assert torch.equal(got, whole[start : start + count])
    # the transform alone on 1..17 words: each word's value does not depend on the length
    w = torch.randint(0, 2**32, (17,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    ref = em.box_muller(w, w.flip(0))
    for k in range(1, 18):
        got = em.box_muller(w[:k], w.flip(0)[:k])
        assert torch.equal(got[0], ref[0][:k]) and torch.equal(got[1], ref[1][:k])


def test_fill_in_pieces_and_rows(whole):
    out = torch.empty(3, cr.TILE + 12, dtype=torch.float64)
    cr.fill_gaussian(out, 11, 5, 0, chunk=2 * cr.TILE, compiled=False)
    assert torch.equal(out.view(-1), whole[: out.numel()])
    shape = (7, 3, 5, 5)  # 75 numbers a row
    rows = cr.gaussian_rows(11, 5, shape, 2, 5, start=30, dtype=torch.float64, compiled=False)
    assert rows.shape == (3, 3, 5, 5)
    assert torch.equal(rows, whole[30 : 30 + 7 * 75].view(shape)[2:5])
    with pytest.raises(ValueError, match="contiguous"):
        cr.fill_gaussian(out.t(), 11, 5, compiled=False)


def test_seeds_and_streams_differ():
    base = cr.gaussian(1, 0, 0, 4096, compiled=False)
    for seed, stream in [(2, 0), (1, 1), (1 << 32, 0), (1, 1 << 32)]:
        other = cr.gaussian(seed, stream, 0, 4096, compiled=False)
        assert (other == base).float().mean() < 0.01, (seed, stream)
    assert torch.equal(base, cr.gaussian(1, 0, 0, 4096, compiled=False))


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.special.erf(x / math.sqrt(2)))


def test_statistics_of_a_million():
    n = 1 << 20
    z = cr.gaussian(2024, 7, 123, n, dtype=torch.float64, compiled=False)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    zc = z - z.mean()
    r = (zc[1:] * zc[:-1]).sum() / (zc * zc).sum()
    assert abs(r.item()) < 5 / math.sqrt(n)
    try:
        from scipy import stats

        ks = stats.kstest(z.numpy(), "norm").statistic
    except ImportError:
        s = z.sort().values
        cdf = _normal_cdf(s)
        i = torch.arange(1, n + 1, dtype=torch.float64)
        ks = max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())
    assert ks < 1.95 / math.sqrt(n)
    assert z.abs().max() < 6.7  # the 32-bit Box-Muller's cut-off


def test_uniform():
    u = cr.uniform(3, 4, 5, 3000)
    assert u.dtype == torch.float64 and (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 3000)
    assert torch.equal(cr.uniform(3, 4, 1000, 10), u[995:1005])


def _compiled_or_skip(device):
    ok, reason = cr.compiled_available(device)
    if not ok:
        pytest.skip(f"inductor unavailable on {device}: {reason}")


def test_eager_equals_compiled_cpu(whole):
    _compiled_or_skip("cpu")
    for start, count in [(0, whole.numel()), (3, 1), (1000, 2100)]:
        got = cr.gaussian(11, 5, start, count, dtype=torch.float64, compiled=True)
        assert torch.equal(got, whole[start : start + count]), (start, count)
    got32 = cr.gaussian(11, 5, 0, whole.numel(), dtype=torch.float32, compiled=True)
    assert torch.equal(got32, whole.float())
    big = 9 * cr.TILE + 5  # several in-place chunks
    ref = cr.gaussian(99, 1, 700, big, dtype=torch.float64, compiled=False)
    out = torch.empty(big, dtype=torch.float64)
    assert torch.equal(cr.fill_gaussian(out, 99, 1, 700, chunk=2 * cr.TILE, compiled=True), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_bits_identical():
    n = 5 * cr.TILE + 3
    cpu = cr.gaussian(5, 6, 17, n, dtype=torch.float64, compiled=False)
    eager = cr.gaussian(5, 6, 17, n, dtype=torch.float64, device="cuda", compiled=False)
    assert torch.equal(eager.cpu(), cpu)
    ok, reason = cr.compiled_available("cuda")
    if ok:
        comp = cr.gaussian(5, 6, 17, n, dtype=torch.float64, device="cuda", compiled=True)
        assert torch.equal(comp.cpu(), cpu)
        comp32 = cr.gaussian(5, 6, 17, n, dtype=torch.float32, device="cuda", compiled=True)
        assert torch.equal(comp32.cpu(), cpu.float())
    else:
        pytest.skip(f"CUDA eager matched; inductor unavailable on CUDA: {reason}")
