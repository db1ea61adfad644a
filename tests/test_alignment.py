"""The alignment block against a slow, per-pixel, per-tap reference of the official DCNv4 computation."""

import math

import numpy as np
import pytest
import torch

from dynrefer.alignment import ViewAlignment, dcnv4_sample, offset_mask_channels
from dynrefer.config import AlignmentConfig

GROUPS, K = 4, 3


def bilinear(feature: np.ndarray, x: float, y: float) -> np.ndarray:
    """feature (H, W, D) sampled at pixel coordinates (x, y): bilinear, zero outside the map."""
    h, w, d = feature.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(d)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * feature[yy, xx]
    return out


def dcnv4_reference(value: np.ndarray, offset_mask: np.ndarray) -> np.ndarray:
    """DCNv4 as its documentation states it, one pixel, group and tap at a time.

    value (N, H, W, C), offset_mask (N, H, W, >= 3*G*K*K) -> (N, H, W, C). Per group g: dx of tap n at 27g + 2n,
    dy at 27g + 2n + 1, the (raw) mask at 27g + 18 + n; tap n = 3i + j samples (x + i - 1 + dx, y + j - 1 + dy).
    """
    n_, h, w, c = value.shape
    d = c // GROUPS
    out = np.zeros_like(value)
    for n in range(n_):
        for y in range(h):
            for x in range(w):
                for g in range(GROUPS):
                    base = 27 * g
                    for i in range(K):
                        for j in range(K):
                            tap = K * i + j
                            dx = offset_mask[n, y, x, base + 2 * tap]
                            dy = offset_mask[n, y, x, base + 2 * tap + 1]
                            m = offset_mask[n, y, x, base + 18 + tap]
                            sample = bilinear(value[n, :, :, g * d:(g + 1) * d], x + i - 1 + dx, y + j - 1 + dy)
                            out[n, y, x, g * d:(g + 1) * d] += m * sample
    return out


def module_reference(m: ViewAlignment, view: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The official block, written out: value_proj, grouped depthwise conv over cat[view, ref] (output channel c
    reads input channels 2c and 2c+1), offset_mask linear, DCNv4, output_proj. Arrays (N, C, H, W) float64."""
    p = {k: v.detach().double().numpy() for k, v in m.state_dict().items()}
    n, c, h, w = view.shape
    x = view.transpose(0, 2, 3, 1)  # (N, H, W, C)
    value = x @ p["value_proj.weight"].T + p["value_proj.bias"]
    both = np.pad(np.concatenate([view, ref], axis=1), ((0, 0), (0, 0), (1, 1), (1, 1)))  # (N, 2C, H+2, W+2)
    dw = np.zeros((n, c, h, w)) + p["offset_mask_dw.bias"][None, :, None, None]
    weight = p["offset_mask_dw.weight"]  # (C, 2, 3, 3)
    for ch in range(c):
        for src in range(2):
            for a in range(3):
                for b in range(3):
                    dw[:, ch] += weight[ch, src, a, b] * both[:, 2 * ch + src, a:a + h, b:b + w]
    offset_mask = dw.transpose(0, 2, 3, 1) @ p["offset_mask.weight"].T + p["offset_mask.bias"]
    sampled = dcnv4_reference(value, offset_mask)
    out = sampled @ p["output_proj.weight"].T + p["output_proj.bias"]
    return out.transpose(0, 3, 1, 2)


def randomised(c: int, seed: int) -> ViewAlignment:
    """The block with random non-zero weights everywhere; offsets of a few pixels, masks around +-1."""
    torch.manual_seed(seed)
    m = ViewAlignment(c, AlignmentConfig()).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "offset_mask." in name else 1 / math.sqrt(p.shape[-1])))
    return m


@pytest.mark.parametrize("size", [16, 4])
def test_alignment_equals_the_dcnv4_reference(size):
    c = 64
    m = randomised(c, seed=size).eval()
    g = torch.Generator().manual_seed(1)
    view = torch.randn(2, c, size, size, dtype=torch.float64, generator=g)
    ref = torch.randn(2, c, size, size, dtype=torch.float64, generator=g)
    expected = module_reference(m, view.numpy(), ref.numpy())
    got = m(view, ref).detach().numpy()
    assert np.abs(expected).mean() > 0.1  # the reference is not trivially zero
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("h, w", [(5, 6), (1, 3)])
def test_sampler_equals_the_reference_and_its_gradient_is_exact(h, w):
    """The operator alone: random value maps and offsets/masks in DCNv4's layout, offsets of a few pixels (many
    samples fall partly or wholly outside the map)."""
    rng = np.random.default_rng(0)
    n, c = 2, 8
    value = rng.normal(size=(n, h, w, c))
    om = rng.normal(size=(n, h, w, offset_mask_channels(GROUPS, K))) * 1.5
    got = dcnv4_sample(torch.from_numpy(value).permute(0, 3, 1, 2), torch.from_numpy(om), GROUPS, K)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), dcnv4_reference(value, om), rtol=1e-9, atol=1e-9)
    inputs = (torch.from_numpy(value).permute(0, 3, 1, 2).contiguous().requires_grad_(),
              torch.from_numpy(om).requires_grad_())
    assert torch.autograd.gradcheck(lambda v, o: dcnv4_sample(v, o, GROUPS, K), inputs)


def test_offset_scale_scales_the_offsets_only():
    rng = np.random.default_rng(1)
    value = torch.from_numpy(rng.normal(size=(2, 8, 4, 4)))
    om = torch.from_numpy(rng.normal(size=(2, 4, 4, offset_mask_channels(GROUPS, K))))
    per_group = om[..., : GROUPS * 27].clone().unflatten(-1, (GROUPS, 27))  # the 4 padding channels dropped
    per_group[..., :18] *= 0.5  # dx, dy of every tap
    torch.testing.assert_close(dcnv4_sample(value, om, GROUPS, K, offset_scale=0.5),
                               dcnv4_sample(value, per_group.flatten(-2).contiguous(), GROUPS, K))


def test_official_init_gives_exact_zeros_and_official_shapes():
    torch.manual_seed(0)
    m = ViewAlignment(64, AlignmentConfig())
    out = m(torch.randn(3, 64, 16, 16), torch.randn(3, 64, 16, 16))
    assert torch.count_nonzero(out) == 0
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"value_proj.weight": (64, 64), "value_proj.bias": (64,),
                      "offset_mask_dw.weight": (64, 2, 3, 3), "offset_mask_dw.bias": (64,),
                      "offset_mask.weight": (112, 64), "offset_mask.bias": (112,),
                      "output_proj.weight": (64, 64), "output_proj.bias": (64,)}


def test_padding_channels_108_to_111_change_nothing():
    m = randomised(64, seed=3).eval()
    view, ref = torch.randn(2, 64, 4, 4, dtype=torch.float64), torch.randn(2, 64, 4, 4, dtype=torch.float64)
    before = m(view, ref)
    with torch.no_grad():
        m.offset_mask.weight[108:] = torch.randn(4, 64, dtype=torch.float64) * 10
        m.offset_mask.bias[108:] = 100.0
    assert torch.equal(m(view, ref), before)


def test_groups_must_divide_the_width():
    with pytest.raises(ValueError, match="divisible"):
        ViewAlignment(66, AlignmentConfig())
