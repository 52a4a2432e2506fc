"""counter_normal: Philox4x32-10 against published answers and an independent pure-Python route, the sharding
guarantee (a sample's noise depends on (seed, index, step) only), the distribution, and argument checking."""

import math
import random

import pytest
import torch

from fixedpoint_diffusion import noise
from fixedpoint_diffusion.errors import InvalidValueError
from fixedpoint_diffusion.noise import counter_normal

# Philox4x32-10 known answers (counter words, key words, output words) from the kat_vectors file of the Random123
# distribution, as reproduced in D. E. Shaw Research's Random123-Boost, libs/random/test/test_philox.cpp. numpy's
# Philox is the 4x64 variant and cannot check these; the 4x64 vectors of the same file do match numpy's Philox
# (checked when this test was written), which vouches for the file.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
SHAPE = (4, 8, 8)


def _words(counter, device="cpu"):
    return [torch.tensor([c], dtype=torch.int64, device=device) for c in counter]


def _philox_reference(counter, key):
    """Philox4x32-10 in Python ints (exact unsigned arithmetic, no masking tricks): the second route."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) % 2**32, (k1 + 0xBB67AE85) % 2**32
    return c0, c1, c2, c3


# --- the generator itself ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("counter,key,want", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, want):
    got = noise._philox4x32_10(*_words(counter), *key)
    assert tuple(int(w) for w in got) == want
    assert _philox_reference(counter, key) == want


def test_philox_matches_exact_integer_route_on_random_counters():
    # Words near 2**32 make the int64 products wrap past 2**63: the case the masking must get right.
    rng = random.Random(0)
    counters = [[rng.getrandbits(32) for _ in range(4)] for _ in range(200)] + [[0xFFFFFFFF - i] * 4 for i in range(8)]
    key = (rng.getrandbits(32), rng.getrandbits(32))
    cols = [torch.tensor(col, dtype=torch.int64) for col in zip(*counters)]
    copies = [c.clone() for c in cols]
    got = noise._philox4x32_10(*cols, *key).T.tolist()
    assert got == [list(_philox_reference(c, key)) for c in counters]
    assert all(torch.equal(a, b) for a, b in zip(cols, copies))  # the in-place updates never touch the inputs


def test_blocks_are_box_muller_of_philox_at_the_documented_counters():
    seed, i, step = 1234, 7, 55
    key = noise._key_from_seed(seed)
    want = []
    for block in range(3):  # elements 4j .. 4j + 3 come from the block with counter (j, i, step, stream)
        words = _philox_reference((block, i, step, noise._STREAM), key)
        u = [((w >> 9) + 0.5) / 2**23 for w in words]
        for p in (0, 2):
            r, a = math.sqrt(-2 * math.log(u[p])), 2 * math.pi * u[p + 1]
            want += [r * math.cos(a), r * math.sin(a)]
    got = counter_normal(seed, torch.tensor([i]), step, (12,), device="cpu")[0]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_uniforms_stay_inside_the_open_interval():
    u = noise._uniform(torch.tensor([0, 511, 512, 0xFFFFFFFF], dtype=torch.int64))
    assert u.tolist() == [2.0**-24, 2.0**-24, 3 * 2.0**-24, 1 - 2.0**-24]


# --- the sharding guarantee ---------------------------------------------------------------------------------------

def test_a_sample_gets_the_same_noise_alone_in_a_batch_in_any_order_or_split():
    idx = torch.tensor([0, 1, 2, 3, 10, 11, 1000, 2**32 - 1])
    full = counter_normal(5, idx, 17, SHAPE, device="cpu")
    for j, i in enumerate(idx.tolist()):
        assert torch.equal(counter_normal(5, torch.tensor([i]), 17, SHAPE, device="cpu")[0], full[j])
    perm = torch.randperm(len(idx))
    assert torch.equal(counter_normal(5, idx[perm], 17, SHAPE, device="cpu"), full[perm])
    # two "processes", each its own shard of the indices
    shards = [counter_normal(5, idx[r::2], 17, SHAPE, device="cpu") for r in range(2)]
    assert torch.equal(shards[0], full[0::2]) and torch.equal(shards[1], full[1::2])
    # the index dtype is not part of the key
    assert torch.equal(counter_normal(5, idx[:6].to(torch.int32), 17, SHAPE, device="cpu"), full[:6])


def test_an_element_depends_on_its_flat_position_not_on_the_shape_or_dtype():
    idx = torch.arange(3)
    flat = counter_normal(9, idx, 4, (4 * 8 * 8,), device="cpu")
    assert torch.equal(counter_normal(9, idx, 4, SHAPE, device="cpu").flatten(1), flat)
    assert torch.equal(counter_normal(9, idx, 4, (7,), device="cpu"), flat[:, :7])
    assert torch.equal(counter_normal(9, idx, 4, SHAPE, device="cpu", dtype=torch.float64).flatten(1), flat.double())
    assert torch.equal(counter_normal(9, idx, 4, SHAPE, device="cpu", dtype=torch.bfloat16).flatten(1),
                       flat.bfloat16())


def test_same_call_twice_is_bit_identical():
    a = counter_normal(3, torch.arange(16), 999, SHAPE, device="cpu")
    b = counter_normal(3, torch.arange(16), 999, SHAPE, device="cpu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("change", ["seed", "step", "index", "seed + 2**32", "step 0"])
def test_different_seed_step_or_index_gives_different_noise(change):
    base = {"seed": 3, "index": 4, "step": 20}
    other = {"seed": dict(base, seed=4), "step": dict(base, step=21), "index": dict(base, index=5),
             "seed + 2**32": dict(base, seed=3 + 2**32), "step 0": dict(base, step=0)}[change]

    def draw(seed, index, step):
        return counter_normal(seed, torch.tensor([index]), step, SHAPE, device="cpu")[0].flatten()

    a, b = draw(**base), draw(**other)
    assert not torch.isclose(a, b).any()  # no element shared, not merely a different tensor
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 5 / math.sqrt(a.numel())


def test_seeds_are_reduced_mod_2_64():
    idx = torch.arange(2)
    assert torch.equal(counter_normal(-1, idx, 0, (8,), device="cpu"), counter_normal(2**64 - 1, idx, 0, (8,),
                                                                                       device="cpu"))
    assert torch.equal(counter_normal(2**64 + 7, idx, 0, (8,), device="cpu"), counter_normal(7, idx, 0, (8,),
                                                                                           device="cpu"))


def test_empty_batch_and_empty_shape():
    assert counter_normal(0, torch.zeros(0, dtype=torch.int64), 0, SHAPE, device="cpu").shape == (0, *SHAPE)
    assert counter_normal(0, torch.arange(3), 0, (4, 0), device="cpu").shape == (3, 4, 0)
    assert counter_normal(0, torch.arange(3), 0, (), device="cpu").shape == (3,)


# --- the distribution -----------------------------------------------------------------------------------------------

N_SAMPLES, N_ELEMS = 100, 1024  # 102,400 draws


@pytest.fixture(scope="module")
def draws():
    return counter_normal(2024, torch.arange(N_SAMPLES), 500, (N_ELEMS,), device="cpu", dtype=torch.float64)


def test_mean_and_variance(draws):
    n = draws.numel()
    # standard errors of the mean (1/sqrt n) and of the variance (sqrt(2/n)) of a standard normal; 5 of each
    assert abs(draws.mean().item()) < 5 / math.sqrt(n)
    assert abs(draws.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert draws.abs().max().item() < math.sqrt(48 * math.log(2)) + 1e-5  # the documented cap of |z|


def test_kolmogorov_smirnov_against_the_normal_cdf(draws):
    x, _ = draws.flatten().sort()
    n = x.numel()
    cdf = torch.special.ndtr(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())
    # Kolmogorov's limit: P(sqrt(n) D > c) ~ 2 exp(-2 c**2); the c with probability alpha = 1e-3 (1.95)
    alpha = 1e-3
    c = math.sqrt(math.log(2 / alpha) / 2)
    assert d < c / math.sqrt(n), (d, c / math.sqrt(n))


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5])
def test_neighbouring_elements_are_uncorrelated(draws, lag):
    # lag 1 pairs the two outputs of one Box-Muller pair and (every fourth) words of neighbouring Philox blocks
    a, b = draws[:, :-lag].flatten(), draws[:, lag:].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(a.numel())


def test_neighbouring_samples_are_uncorrelated(draws):
    a, b = draws[:-1].flatten(), draws[1:].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(a.numel())


def test_neighbouring_steps_are_uncorrelated(draws):
    other = counter_normal(2024, torch.arange(N_SAMPLES), 501, (N_ELEMS,), device="cpu", dtype=torch.float64)
    a, b = draws.flatten(), other.flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(a.numel())


# --- arguments ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,name", [
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": True}, TypeError, "seed"),
    ({"seed": "1"}, TypeError, "seed"),
    ({"indices": [0, 1]}, TypeError, "indices"),
    ({"indices": torch.tensor([0.0, 1.0])}, TypeError, "indices"),
    ({"indices": torch.tensor([True])}, TypeError, "indices"),
    ({"indices": torch.tensor([[0, 1]])}, InvalidValueError, "indices"),
    ({"indices": torch.tensor([0, -1])}, InvalidValueError, "indices"),
    ({"indices": torch.tensor([2**32])}, InvalidValueError, "indices"),
    ({"step": -1}, InvalidValueError, "step"),
    ({"step": 2**32}, InvalidValueError, "step"),
    ({"step": 2.0}, TypeError, "step"),
    ({"shape": (4, -1)}, InvalidValueError, "shape"),
    ({"shape": (4, 2.0)}, TypeError, "shape"),
    ({"shape": 4}, TypeError, "shape"),
    ({"shape": "44"}, TypeError, "shape"),
    ({"shape": (2**20, 2**20)}, InvalidValueError, "shape"),
    ({"dtype": torch.int64}, TypeError, "dtype"),
    ({"dtype": "float32"}, TypeError, "dtype"),
])
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error, name):
    call = {"seed": 0, "indices": torch.arange(2), "step": 0, "shape": (4,), "device": "cpu", "dtype": torch.float32}
    call.update(kwargs)
    with pytest.raises(error, match=name):
        counter_normal(**call)


def test_numpy_and_tensor_scalars_are_accepted_as_ints():
    np = pytest.importorskip("numpy")
    a = counter_normal(np.int64(3), torch.arange(2), np.int32(5), (np.int64(4),), device="cpu")
    assert torch.equal(a, counter_normal(3, torch.arange(2), 5, (4,), device="cpu"))


# --- CUDA -----------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = random.Random(1)
    counters = [[rng.getrandbits(32) for _ in range(4)] for _ in range(1000)]
    cols = [torch.tensor(col, dtype=torch.int64) for col in zip(*counters)]
    key = (rng.getrandbits(32), rng.getrandbits(32))
    cpu_words = noise._philox4x32_10(*cols, *key)
    cuda_words = noise._philox4x32_10(*(c.cuda() for c in cols), *key)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu_words, cuda_words))
    idx = torch.tensor([0, 3, 7, 2**31 + 5])
    cpu = counter_normal(11, idx, 250, (4, 32, 32), device="cpu")
    gpu = counter_normal(11, idx.cuda(), 250, (4, 32, 32), device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
    # CPU indices with a CUDA device: moved over, same noise
    assert torch.equal(counter_normal(11, idx, 250, (4, 32, 32), device="cuda"), gpu)
