"""fastseg.data: datasets (folders, presets, synthetic), transforms and U-Net's weight map.

References are independent of the code under test: numpy / Pillow reads of the files written
here, brute-force distances and a pure-Python flood fill for the weight map, torch.flip /
torch.rot90 / numpy.pad for the geometry, and invariants (image and mask encode the same
labels, so any misalignment shows)."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
# The data pipeline needs Pillow and scipy (package dependencies; a bare GPU machine may lack them).
pytest.importorskip("PIL")
pytest.importorskip("scipy")
from PIL import Image  # noqa: E402

from conftest import SHARED_DATA
from fastseg.data import (CAMVID_CLASS_NAMES, CAMVID_CLASS_WEIGHTS, CenterCrop, Compose,
                          ElasticDeformation, IntensityJitter, MirrorPad, RandomCrop,
                          RandomFlip, RandomRotation, RandomScale, Resize,
                          SegmentationFolder, SyntheticMembranes, SyntheticShapes, camvid,
                          isbi2012_membrane, make_synthetic, mix_seed, read_image,
                          unet_weight_map)

ISBI = os.path.join(SHARED_DATA, "isbi2012_membrane")
CAMVID = os.path.join(SHARED_DATA, "camvid")
K = 5  # labels of the encoded test samples


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- encoded samples: the image stores the mask's labels, the weight too ----------------------

def encoded_sample(h=40, w=48, block=8, context=0, seed=0):
    """Piecewise-constant labels in blocks (interpolation is exact inside a block); image
    channel 0 = label / K, channel 1 = 1 - label / K; weight = (label + 1) / 10."""
    g = np.random.default_rng(seed)
    coarse = g.integers(0, K, (h // block + 1, w // block + 1))
    mask = torch.from_numpy(np.kron(coarse, np.ones((block, block), np.int64))[:h, :w])
    image = torch.stack((mask / K, 1 - mask / K)).float()
    sample = {"image": image, "mask": mask, "weight": (mask + 1).float() / 10, "name": "x"}
    return MirrorPad(context)(sample) if context else sample


def decode(image, context=0):
    core = image[:, context:image.shape[1] - context, context:image.shape[2] - context]
    return torch.round(core[0] * K).long()


def assert_aligned_exactly(out, context=0):
    valid = out["mask"] != 255
    assert torch.equal(decode(out["image"], context)[valid], out["mask"][valid])
    assert torch.allclose(out["weight"][valid], (out["mask"][valid] + 1).float() / 10)


def interior(mask):
    """Pixels whose 3x3 neighbourhood has one label, not ignore."""
    m = mask[None, None].float()
    hi = torch.nn.functional.max_pool2d(m, 3, 1, 1)[0, 0]
    lo = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)[0, 0]
    return (hi == lo) & (mask != 255)


def assert_aligned_interior(out, context=0, min_fraction=0.99):
    inner = interior(out["mask"])
    assert inner.sum() > 100
    agree = decode(out["image"], context)[inner] == out["mask"][inner]
    assert agree.float().mean() >= min_fraction
    weight_ok = (out["weight"][inner] - (out["mask"][inner] + 1) / 10).abs() < 1e-4
    assert weight_ok.float().mean() >= min_fraction


def clone(sample):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k]


# --- weight map -------------------------------------------------------------------------------

def flood_objects(fg):
    """4-connected components of a boolean array, by a plain flood fill."""
    h, w = fg.shape
    seen = np.zeros_like(fg)
    objects = []
    for y in range(h):
        for x in range(w):
            if fg[y, x] and not seen[y, x]:
                stack, pixels = [(y, x)], []
                seen[y, x] = True
                while stack:
                    a, b = stack.pop()
                    pixels.append((a, b))
                    for na, nb in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= na < h and 0 <= nb < w and fg[na, nb] and not seen[na, nb]:
                            seen[na, nb] = True
                            stack.append((na, nb))
                objects.append(np.array(pixels, float))
    return objects


def brute_weight(mask, w0, sigma, class_balance=True, background=0, ignore=255):
    mask = np.asarray(mask)
    labeled = mask != ignore
    out = np.zeros(mask.shape)
    classes = sorted(set(mask[labeled].tolist()))
    for c in classes:
        n_c = (mask == c).sum()
        out[mask == c] = labeled.sum() / (len(classes) * n_c) if class_balance else 1.0
    objects = flood_objects(labeled & (mask != background))
    if len(objects) >= 2:
        for y, x in zip(*np.nonzero(labeled & (mask == background))):
            d = sorted(np.sqrt(((obj - (y, x)) ** 2).sum(1)).min() for obj in objects)
            out[y, x] += w0 * math.exp(-(d[0] + d[1]) ** 2 / (2 * sigma ** 2))
    return out


def disc_mask(shape, discs, rects=(), ignore_rects=()):
    mask = np.zeros(shape, np.int64)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for cy, cx, r, c in discs:
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = c
    for y0, y1, x0, x1, c in rects:
        mask[y0:y1, x0:x1] = c
    for y0, y1, x0, x1 in ignore_rects:
        mask[y0:y1, x0:x1] = 255
    return mask


@pytest.mark.parametrize("class_balance", [True, False])
def test_weight_map_matches_brute_force(class_balance):
    mask = disc_mask((24, 24), [(5, 5, 3, 1), (6, 15, 3, 1), (17, 8, 4, 2)],
                     rects=[(15, 22, 17, 22, 1), (12, 13, 2, 3, 2)],
                     ignore_rects=[(0, 2, 18, 24)])
    assert len(flood_objects((mask != 0) & (mask != 255))) == 5
    got = unet_weight_map(torch.from_numpy(mask), w0=10.0, sigma=3.0,
                          class_balance=class_balance)
    assert got.dtype == torch.float32 and got.shape == (24, 24)
    want = brute_weight(mask, 10.0, 3.0, class_balance)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    assert (got[torch.from_numpy(mask == 255)] == 0).all()
    # the same from a numpy array
    assert torch.equal(unet_weight_map(mask, w0=10.0, sigma=3.0, class_balance=class_balance),
                       got)


def test_weight_map_windowed_distances_match_brute_force():
    # sigma 2: the distance windows (about 10.5 px) are much smaller than the image; objects
    # near and far apart, touching the border, and background id 3.
    mask = disc_mask((40, 44), [(4, 4, 3, 1), (8, 13, 2, 1), (30, 36, 4, 1), (33, 5, 2, 1),
                                (20, 22, 3, 1)])
    mask[mask == 0] = 3
    mask[mask == 1] = 0
    got = unet_weight_map(mask, w0=5.0, sigma=2.0, background=3)
    want = brute_weight(mask, 5.0, 2.0, background=3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_weight_map_gap_between_touching_cells():
    # Two cells separated by a one-pixel background gap: d1 = d2 = 1 on the gap.
    mask = np.ones((12, 12), np.int64)
    mask[:, 6] = 0
    sigma, w0 = 4.0, 10.0
    got = unet_weight_map(mask, w0=w0, sigma=sigma)
    n, n0 = mask.size, (mask == 0).sum()
    w_bg = n / (2 * n0)
    expected = w_bg + w0 * math.exp(-(1 + 1) ** 2 / (2 * sigma ** 2))
    assert torch.allclose(got[:, 6], torch.full((12,), expected))
    assert torch.allclose(got[:, :6], torch.full((12, 6), n / (2 * (n - n0))))


def test_weight_map_class_balance_and_single_object():
    mask = disc_mask((16, 20), [(8, 8, 5, 1)], ignore_rects=[(0, 3, 0, 20)])
    got = unet_weight_map(mask, w0=10.0, sigma=5.0)
    labeled = torch.from_numpy(mask != 255)
    # one object: no distance term; class weights average to 1 over labeled pixels
    assert torch.allclose(got[labeled].mean(), torch.tensor(1.0))
    assert torch.allclose(got[labeled].sum() / 2, got[torch.from_numpy(mask == 1)].sum())
    assert (got[~labeled] == 0).all()
    plain = unet_weight_map(mask, w0=10.0, sigma=5.0, class_balance=False)
    assert torch.equal(plain, labeled.float())


def test_weight_map_uses_4_connectivity():
    # Two pixels touching at a corner are two objects: the background pixels next to both
    # are at distance 1 from each.
    mask = np.zeros((4, 4), np.int64)
    mask[1, 1] = mask[2, 2] = 1
    got = unet_weight_map(mask, w0=1.0, sigma=1.0, class_balance=False)
    assert got[1, 2].item() == pytest.approx(1 + math.exp(-2.0))
    np.testing.assert_allclose(got.numpy(), brute_weight(mask, 1.0, 1.0, False), rtol=1e-6)


def test_weight_map_bad_input():
    with pytest.raises(TypeError, match="integer class ids"):
        unet_weight_map(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="2-D"):
        unet_weight_map(np.zeros((1, 4, 4), np.int64))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        unet_weight_map(np.zeros((4, 4), np.int64), sigma=0.0)
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        unet_weight_map([[0, 1]])


# --- transforms: alignment, determinism, errors ------------------------------------------------

@pytest.mark.parametrize("context", [0, 3])
def test_flip_matches_torch_flip_and_stays_aligned(context):
    sample = encoded_sample(context=context)
    before = clone(sample)
    out = RandomFlip(horizontal=True, vertical=True, p=1.0)(sample, gen())
    assert torch.equal(out["mask"], torch.flip(sample["mask"], (-2, -1)))
    assert torch.equal(out["image"], torch.flip(sample["image"], (-2, -1)))
    assert_aligned_exactly(out, context)
    assert_same(sample, before)  # input untouched
    assert_same(RandomFlip(p=0.0)(sample, gen()), sample)


@pytest.mark.parametrize("context", [0, 2])
def test_right_angle_rotation_is_exact(context):
    sample = encoded_sample(h=24, w=40, context=context)
    seen = set()
    for seed in range(12):
        out = RandomRotation(right_angles=True)(sample, gen(seed))
        k = next(k for k in range(4) if out["mask"].shape == torch.rot90(sample["mask"], k).shape
                 and torch.equal(out["mask"], torch.rot90(sample["mask"], k)))
        seen.add(k)
        assert torch.equal(out["image"], torch.rot90(sample["image"], k, (1, 2)))
        assert_aligned_exactly(out, context)
    assert seen == {0, 1, 2, 3}


def test_rotation_by_90_degrees_on_the_grid_equals_rot90():
    sample = encoded_sample(h=33, w=33, block=1)
    out = RandomRotation(degrees=(90, 90))(sample, gen())
    assert torch.equal(out["mask"], torch.rot90(sample["mask"], 1))
    assert torch.allclose(out["image"], torch.rot90(sample["image"], 1, (1, 2)), atol=1e-5)


@pytest.mark.parametrize("context", [0, 4])
def test_arbitrary_rotation_alignment_and_outside_pixels(context):
    sample = encoded_sample(h=48, w=48, context=context)
    out = RandomRotation(degrees=(30, 40))(sample, gen(1))
    assert out["mask"].shape == (48, 48) and out["image"].shape[1:] == (48 + 2 * context,) * 2
    assert_aligned_interior(out, context)
    # the corners come from outside: ignore in the mask, 0 in the weight
    assert out["mask"][0, 0] == 255 and out["mask"][-1, -1] == 255
    outside = out["mask"] == 255
    assert 0 < outside.float().mean() < 0.3 and (out["weight"][outside] == 0).all()


@pytest.mark.parametrize("context", [0, 5])
def test_elastic_deformation_alignment(context):
    sample = encoded_sample(h=64, w=64, block=16, context=context)
    out = ElasticDeformation(sigma=4.0, grid=3)(sample, gen(2))
    assert not torch.equal(out["mask"], sample["mask"])
    assert_aligned_interior(out, context, min_fraction=0.98)


def test_elastic_field_is_smooth_and_of_sigma_scale():
    h = w = 64
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    # the image stores its own coordinates: after warping, it tells where each pixel came from
    image = torch.stack(((ys + 0.5) / h, (xs + 0.5) / w)).float()
    sample = {"image": image, "mask": torch.zeros(h, w, dtype=torch.long)}
    sigma = 3.0
    out = ElasticDeformation(sigma=sigma, grid=3)(sample, gen(5))
    dy = out["image"][0] * h - 0.5 - ys
    dx = out["image"][1] * w - 0.5 - xs
    inner = (slice(12, -12), slice(12, -12))  # away from the reflected border
    disp = torch.stack((dy[inner], dx[inner]))
    assert disp.abs().max() > 0.2 * sigma  # it moved
    assert disp.abs().max() < 6 * sigma
    step = torch.cat(((disp[:, 1:] - disp[:, :-1]).flatten(),
                      (disp[:, :, 1:] - disp[:, :, :-1]).flatten()))
    assert step.abs().max() < 0.5  # smooth: neighbours move alike
    # sigma 0: identity
    still = ElasticDeformation(sigma=0.0)(sample, gen(5))
    assert torch.equal(still["mask"], sample["mask"])
    assert torch.allclose(still["image"], image, atol=1e-5)


def test_scale_and_resize():
    sample = encoded_sample(h=40, w=48)
    out = RandomScale(scale=(0.6, 0.8))(sample, gen(3))
    h, w = out["mask"].shape
    assert 24 <= h <= 32 and round(h * 48 / 40) in (w - 1, w, w + 1)
    assert out["image"].shape[1:] == (h, w) and out["weight"].shape == (h, w)
    assert_aligned_interior(out)
    big = Resize(scale=2.0)(sample)
    assert big["mask"].shape == (80, 96)
    assert torch.equal(big["mask"], sample["mask"].repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert_aligned_interior(big)
    fixed = Resize((20, 24))(sample)
    assert fixed["mask"].shape == (20, 24) and fixed["image"].shape == (2, 20, 24)
    assert set(fixed["mask"].unique().tolist()) <= set(sample["mask"].unique().tolist())
    with pytest.raises(ValueError, match="before MirrorPad"):
        Resize(scale=0.5)(MirrorPad(2)(sample))


def test_resize_matches_pillow():
    # Pillow's NEAREST samples at pixel centres and its BILINEAR antialiases when shrinking.
    g = np.random.default_rng(0)
    mask = g.integers(0, 7, (30, 36))
    image = g.random((30, 36)).astype(np.float32)
    sample = {"image": torch.from_numpy(image)[None], "mask": torch.from_numpy(mask)}
    out = Resize((20, 16))(sample)
    ref_mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((16, 20), Image.NEAREST))
    assert np.array_equal(out["mask"].numpy(), ref_mask)
    ref_image = np.asarray(Image.fromarray(image, "F").resize((16, 20), Image.BILINEAR))
    np.testing.assert_allclose(out["image"][0].numpy(), ref_image, atol=1e-4)
    with pytest.raises(ValueError, match="exactly one of size and scale"):
        Resize(10, scale=0.5)


@pytest.mark.parametrize("size", [(16, 20), 8])
def test_mirror_pad_and_crops_with_context(size):
    c = 6
    sample = encoded_sample(h=40, w=48)
    padded = MirrorPad(c)(sample)
    ref = np.pad(sample["image"].numpy(), ((0, 0), (c, c), (c, c)), mode="reflect")
    assert np.array_equal(padded["image"].numpy(), ref)
    assert torch.equal(padded["mask"], sample["mask"])
    h, w = (size, size) if isinstance(size, int) else size
    tops = set()
    for seed in range(6):
        out = RandomCrop(size, context=c)(padded, gen(seed))
        assert out["mask"].shape == (h, w) and out["image"].shape == (2, h + 2 * c, w + 2 * c)
        # locate the crop in the padded image: it must be a window of it
        top = next(t for t in range(40 - h + 1) for l in range(48 - w + 1)
                   if torch.equal(out["mask"], sample["mask"][t:t + h, l:l + w])
                   and torch.equal(out["image"],
                                   padded["image"][:, t:t + h + 2 * c, l:l + w + 2 * c]))
        tops.add(top)
        assert_aligned_exactly(out, c)
    assert len(tops) > 1
    centre = CenterCrop(size, context=c)(padded)
    t, l = (40 - h) // 2, (48 - w) // 2
    assert torch.equal(centre["mask"], sample["mask"][t:t + h, l:l + w])
    assert torch.equal(centre["image"], padded["image"][:, t:t + h + 2 * c, l:l + w + 2 * c])


def test_mirror_pad_larger_than_the_image():
    image = torch.rand(1, 3, 2)
    sample = {"image": image, "mask": torch.zeros(3, 2, dtype=torch.long)}
    out = MirrorPad(7)(sample)
    ref = np.pad(image.numpy(), ((0, 0), (7, 7), (7, 7)), mode="reflect")
    assert np.array_equal(out["image"].numpy(), ref)


def test_crop_pads_a_small_mask():
    sample = encoded_sample(h=10, w=12, block=2)
    out = RandomCrop((15, 12), context=0)(sample, gen())
    assert out["mask"].shape == (15, 12) and out["image"].shape == (2, 15, 12)
    assert (out["mask"][:2] == 255).all() and (out["mask"][-3:] == 255).all()
    assert (out["weight"][:2] == 0).all() and (out["weight"][-3:] == 0).all()
    assert torch.equal(out["mask"][2:12], sample["mask"])
    assert torch.equal(out["image"][:, 2:12], sample["image"])
    assert_aligned_exactly(out)
    padded = MirrorPad(2)(sample)
    out = CenterCrop(14, context=2)(padded)
    assert out["image"].shape == (2, 18, 18) and (out["mask"][:, 0] == 255).all()
    assert_aligned_exactly(out, 2)


def test_crop_without_matching_context_is_rejected():
    sample = encoded_sample(h=20, w=20)
    with pytest.raises(ValueError, match=r"RandomCrop\(context=4\).*MirrorPad\(4\)"):
        RandomCrop(8, context=4)(sample, gen())
    with pytest.raises(ValueError, match=r"CenterCrop\(context=0\)"):
        CenterCrop(8)(MirrorPad(3)(sample))
    with pytest.raises(ValueError,
                       match=r"MirrorPad: the image \(2, 24, 24\) is larger .*pad once"):
        MirrorPad(2)(MirrorPad(2)(sample))
    with pytest.raises(ValueError, match="RandomScale: .*before MirrorPad"):
        RandomScale(p=0.0)(MirrorPad(2)(sample), gen())


def test_intensity_jitter_touches_only_the_image():
    sample = encoded_sample()
    sample["image"] = sample["image"] * 0.5 + 0.25
    out = IntensityJitter(brightness=0.1, contrast=0.2, gamma=0.3, noise=0.02)(sample, gen(4))
    assert torch.equal(out["mask"], sample["mask"]) and torch.equal(out["weight"], sample["weight"])
    assert not torch.equal(out["image"], sample["image"])
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    # brightness alone: a constant shift
    shifted = IntensityJitter(brightness=(0.05, 0.1), contrast=0.0)(sample, gen(4))
    diff = shifted["image"] - sample["image"]
    assert 0.05 <= diff.mean() <= 0.1 and diff.std() < 1e-6


ALL_RANDOM = [RandomFlip(vertical=True), RandomRotation(), RandomRotation(right_angles=True),
              RandomScale(), ElasticDeformation(), IntensityJitter(noise=0.01),
              RandomCrop(16)]


@pytest.mark.parametrize("transform", ALL_RANDOM, ids=lambda t: type(t).__name__)
def test_transforms_are_deterministic_given_the_generator(transform):
    sample = encoded_sample(h=32, w=32)
    before = clone(sample)
    a = transform(sample, gen(7))
    b = transform(sample, gen(7))
    assert_same(a, b)
    assert_same(sample, before)
    outs = [transform(sample, gen(s)) for s in range(8)]
    assert any(not torch.equal(o["image"], a["image"]) or o["image"].shape != a["image"].shape
               for o in outs)
    with pytest.raises(TypeError, match="torch.Generator"):
        transform(sample, None)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match=r"p must lie in \[0.0, 1.0\]"):
        RandomFlip(p=1.5)
    with pytest.raises(TypeError, match="Compose: transforms\\[1\\] must be callable"):
        Compose([RandomFlip(), 3])
    with pytest.raises(ValueError, match="sample\\['mask'\\] must be an integer tensor"):
        RandomFlip()({"image": torch.zeros(1, 4, 4), "mask": torch.zeros(4, 4)}, gen())
    with pytest.raises(ValueError, match="exceed it by 2 \\* context"):
        RandomFlip()({"image": torch.zeros(1, 5, 4), "mask": torch.zeros(4, 4, dtype=torch.long)},
                     gen())
    with pytest.raises(ValueError, match="gamma exponents must be > 0"):
        IntensityJitter(gamma=(0.0, 2.0))
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        RandomCrop(0)


# --- synthetic datasets -----------------------------------------------------------------------

def test_synthetic_membranes():
    ds = SyntheticMembranes(length=4, size=(96, 128), seed=3)
    assert (len(ds), ds.num_classes, ds.in_channels, ds.class_names) == (4, 2, 1,
                                                                         ["membrane", "cell"])
    s = ds[1]
    assert s["name"] == "synthetic-membranes-00001"
    assert s["image"].shape == (1, 96, 128) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (96, 128) and s["mask"].dtype == torch.int64
    assert set(s["mask"].unique().tolist()) == {0, 1}
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    membrane = s["mask"] == 0
    assert 0.1 < membrane.float().mean() < 0.4  # ISBI 2012: about 22 %
    # membranes 2-4 px thick: horizontal runs across them are mostly that long (longer where
    # a membrane runs obliquely)
    padded = np.pad(membrane.numpy().astype(np.int8), ((0, 0), (1, 1)))
    step = np.diff(padded, axis=1)
    runs = np.nonzero(step == -1)[1] - np.nonzero(step == 1)[1]
    assert 2 <= np.median(runs) <= 5
    assert s["image"][0][membrane].mean() + 0.2 < s["image"][0][~membrane].mean()
    assert_same(ds[1], SyntheticMembranes(length=4, size=(96, 128), seed=3)[1])
    assert not torch.equal(ds[0]["mask"], s["mask"])
    assert not torch.equal(SyntheticMembranes(length=4, size=(96, 128), seed=4)[1]["mask"],
                           s["mask"])


def test_synthetic_shapes():
    ds = SyntheticShapes(length=6, size=(64, 80), num_classes=4, seed=1)
    assert (ds.num_classes, ds.in_channels, ds.ignore_index) == (4, 3, 255)
    assert ds.class_names == ["background", "circle", "square", "triangle"]
    colours = {c: [] for c in range(4)}
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 64, 80) and s["mask"].shape == (64, 80)
        assert 0 <= s["image"].min() and s["image"].max() <= 1
        mask = s["mask"]
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255} and (mask == 255).any()
        # the void band separates every pair of differently labeled 4-neighbours
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            both = (a != 255) & (b != 255)
            assert torch.equal(a[both], b[both])
        for c in colours:
            if (mask == c).sum() > 20:
                colours[c].append(s["image"][:, mask == c].mean(1))
    assert_same(ds[2], SyntheticShapes(length=6, size=(64, 80), num_classes=4, seed=1)[2])
    # learnable: each shape class has a typical colour, distinct from the others
    means = {c: torch.stack(v).mean(0) for c, v in colours.items() if c and v}
    assert len(means) >= 2
    for c, m in means.items():
        spread = torch.stack(colours[c]).std(0).max() if len(colours[c]) > 1 else 0
        assert spread < 0.15
        for d, n in means.items():
            if d != c:
                assert (m - n).abs().max() > 0.15


def test_synthetic_shapes_many_classes_and_make_synthetic():
    ds = make_synthetic("synthetic-shapes", length=2, num_classes=10)
    assert len(ds.class_names) == 10 == len(set(ds.class_names))
    assert isinstance(make_synthetic("synthetic-membranes", length=1), SyntheticMembranes)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*synthetic-membranes"):
        make_synthetic("mnist")
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        SyntheticShapes(num_classes=1)


# --- dataset base: determinism, epochs, weight maps --------------------------------------------

def augment():
    return Compose([RandomFlip(vertical=True), RandomRotation(right_angles=True),
                    ElasticDeformation(sigma=3.0), IntensityJitter(noise=0.01),
                    MirrorPad(4), RandomCrop(24, context=4)])


def test_same_seed_epoch_index_same_sample():
    ds = SyntheticMembranes(length=4, size=(48, 48), seed=5, transform=augment())
    a = ds[2]
    assert a["image"].shape == (1, 32, 32) and a["mask"].shape == (24, 24)
    assert_same(a, ds[2])
    assert_same(a, SyntheticMembranes(length=4, size=(48, 48), seed=5, transform=augment())[2])
    assert_same(a, ds[-2])
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["image"], a["image"])
    ds.set_epoch(0)
    assert_same(a, ds[2])
    other = SyntheticMembranes(length=4, size=(48, 48), seed=6, transform=augment())
    assert not torch.equal(other[2]["image"], a["image"])
    with pytest.raises(IndexError, match="out of range"):
        ds[4]
    assert mix_seed(5, 0, 2) == mix_seed(5, 0, 2) != mix_seed(5, 1, 2)


def test_samples_are_identical_in_worker_processes():
    ds = SyntheticShapes(length=4, size=(32, 32), seed=2, transform=augment())
    ds.set_epoch(3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for i, s in enumerate(loader):
        assert_same(s, ds[i])


def test_weight_map_is_cached_and_moves_with_the_mask():
    kw = {"w0": 10.0, "sigma": 3.0}
    plain = SyntheticMembranes(length=2, size=(48, 48), weight_map=kw)
    s = plain[0]
    assert torch.equal(s["weight"], unet_weight_map(s["mask"], **kw))
    s["weight"].fill_(-1)  # the cache is not handed out
    assert (plain[0]["weight"] >= 0).all()
    flipped = SyntheticMembranes(length=2, size=(48, 48), weight_map=kw,
                                 transform=RandomFlip(p=1.0))[0]
    assert torch.equal(flipped["weight"], torch.flip(plain[0]["weight"], (-1,)))
    assert torch.equal(flipped["mask"], torch.flip(plain[0]["mask"], (-1,)))
    with pytest.raises(TypeError, match="unknown keys \\['ignore_index'\\]"):
        SyntheticMembranes(weight_map={"ignore_index": 3})
    with pytest.raises(ValueError, match="sigma must be > 0"):
        SyntheticMembranes(weight_map={"sigma": -1.0})


# --- SegmentationFolder -----------------------------------------------------------------------

def write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(tmp_path, n=3, size=(12, 10), rgb=False, image_ext=".png", mask_ext=".png",
                values=(0, 1, 2), seed=0):
    g = np.random.default_rng(seed)
    images, masks = {}, {}
    for i in range(n):
        shape = size + ((3,) if rgb else ())
        images[f"s{i}"] = g.integers(0, 256, shape, dtype=np.uint8)
        masks[f"s{i}"] = g.choice(np.array(values, np.uint8), size)
        write(str(tmp_path / "img" / f"s{i}{image_ext}"), images[f"s{i}"])
        write(str(tmp_path / "lab" / f"s{i}{mask_ext}"), masks[f"s{i}"])
    return str(tmp_path / "img"), str(tmp_path / "lab"), images, masks


def test_folder_grayscale_png(tmp_path):
    img, lab, images, masks = make_folder(tmp_path)
    ds = SegmentationFolder(img, lab)  # num_classes inferred from the masks
    assert (len(ds), ds.num_classes, ds.in_channels, ds.ignore_index) == (3, 3, 1, 255)
    assert ds.class_names == ["class_0", "class_1", "class_2"]
    for i in range(3):
        s = ds[i]
        assert s["name"] == f"s{i}" and s["image"].dtype == torch.float32
        assert s["image"].shape == (1, 12, 10) and s["mask"].dtype == torch.int64
        np.testing.assert_allclose(s["image"][0].numpy(), images[f"s{i}"] / 255.0, rtol=1e-6)
        assert np.array_equal(s["mask"].numpy(), masks[f"s{i}"])
    assert ds.stems == ["s0", "s1", "s2"]
    sub = SegmentationFolder(img, lab, num_classes=3, stems=["s2", "s0"])
    assert len(sub) == 2 and sub[0]["name"] == "s2"


def test_folder_rgb_jpeg_with_tiff_masks(tmp_path):
    img, lab, images, masks = make_folder(tmp_path, rgb=True, image_ext=".jpg",
                                          mask_ext=".tif", size=(16, 24))
    ds = SegmentationFolder(img, lab, num_classes=3, class_names=["a", "b", "c"])
    assert ds.in_channels == 3 and ds.class_names == ["a", "b", "c"]
    s = ds[0]
    assert s["image"].shape == (3, 16, 24)
    ref = np.asarray(Image.open(os.path.join(img, "s0.jpg")).convert("RGB")) / 255.0
    np.testing.assert_allclose(s["image"].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    assert np.array_equal(s["mask"].numpy(), masks["s0"])


def test_folder_16bit_rgba_and_palette_files(tmp_path):
    g = np.random.default_rng(1)
    deep = g.integers(0, 65536, (6, 7), dtype=np.uint16)
    write(str(tmp_path / "img16" / "a.png"), deep)
    mask = g.integers(0, 3, (6, 7), dtype=np.uint8)
    write(str(tmp_path / "lab16" / "a.png"), mask)
    s = SegmentationFolder(str(tmp_path / "img16"), str(tmp_path / "lab16"), num_classes=3)[0]
    np.testing.assert_allclose(s["image"][0].numpy(), deep / 65535.0, rtol=1e-6)

    rgba = g.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    write(str(tmp_path / "imgc" / "a.png"), rgba)
    palette_image = Image.fromarray(g.integers(0, 4, (6, 7), dtype=np.uint8), "P")
    palette_image.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200])
    palette_image.save(tmp_path / "imgc" / "b.png")
    palette_mask = Image.fromarray(mask, "P")
    palette_mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    os.makedirs(tmp_path / "labc")
    palette_mask.save(tmp_path / "labc" / "a.png")
    palette_mask.save(tmp_path / "labc" / "b.png")
    ds = SegmentationFolder(str(tmp_path / "imgc"), str(tmp_path / "labc"), num_classes=3)
    assert ds.in_channels == 3
    np.testing.assert_allclose(ds[0]["image"].permute(1, 2, 0).numpy(), rgba[..., :3] / 255.0,
                               rtol=1e-6)
    colours = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200]]) / 255.0
    index = np.asarray(palette_image)
    np.testing.assert_allclose(ds[1]["image"].permute(1, 2, 0).numpy(), colours[index],
                               rtol=1e-6)
    assert np.array_equal(ds[1]["mask"].numpy(), mask)  # palette mask: its indices


def test_folder_label_maps(tmp_path):
    img, lab, _, masks = make_folder(tmp_path, values=(10, 20, 30))
    ds = SegmentationFolder(img, lab, label_map={10: 0, 20: 1, 30: 255})
    assert ds.num_classes == 2
    want = np.select([masks["s0"] == 10, masks["s0"] == 20], [0, 1], 255)
    assert np.array_equal(ds[0]["mask"].numpy(), want)
    # colour-coded masks
    colour = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 0, 255): 2}
    rgb = np.array(list(colour))[masks["s1"] // 10 - 1].astype(np.uint8)
    write(str(tmp_path / "cimg" / "a.png"), np.zeros((12, 10), np.uint8))
    write(str(tmp_path / "clab" / "a.png"), rgb)
    ds = SegmentationFolder(str(tmp_path / "cimg"), str(tmp_path / "clab"), label_map=colour)
    assert ds.num_classes == 3
    assert np.array_equal(ds[0]["mask"].numpy(), masks["s1"] // 10 - 1)
    # a colour not in the map
    rgb[0, 0] = (7, 8, 9)
    write(str(tmp_path / "clab" / "a.png"), rgb)
    with pytest.raises(ValueError, match=r"a\.png.*not in label_map.*\[\(7, 8, 9\)\]"):
        ds[0]


def test_folder_weight_map(tmp_path):
    img, lab, _, masks = make_folder(tmp_path, values=(0, 1), size=(16, 16))
    ds = SegmentationFolder(img, lab, num_classes=2, weight_map={"sigma": 2.0})
    s = ds[1]
    np.testing.assert_allclose(s["weight"].numpy(), brute_weight(masks["s1"], 10.0, 2.0),
                               rtol=1e-5, atol=1e-5)


def test_folder_errors(tmp_path):
    img, lab, _, _ = make_folder(tmp_path, n=8)
    with pytest.raises(ValueError, match="image directory .*nowhere.* does not exist"):
        SegmentationFolder(str(tmp_path / "nowhere"), lab)
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no mask files .* in .*empty"):
        SegmentationFolder(img, str(tmp_path / "empty"))
    # images without masks: listed (up to 5)
    for i in range(2, 8):
        os.remove(os.path.join(lab, f"s{i}.png"))
    with pytest.raises(ValueError, match=r"6 image file\(s\) without a mask .*'s2', 's3', "
                                         r"'s4', 's5', 's6' and 1 more"):
        SegmentationFolder(img, lab)
    write(os.path.join(lab, "extra.png"), np.zeros((12, 10), np.uint8))
    for i in range(2, 8):
        os.remove(os.path.join(img, f"s{i}.png"))
    with pytest.raises(ValueError, match=r"mask file\(s\) without an image .*'extra'"):
        SegmentationFolder(img, lab)
    os.remove(os.path.join(lab, "extra.png"))
    write(os.path.join(lab, "s1.tif"), np.zeros((12, 10), np.uint8))
    with pytest.raises(ValueError, match="two mask files share the stem 's1'"):
        SegmentationFolder(img, lab)
    os.remove(os.path.join(lab, "s1.tif"))
    # sizes differ
    write(os.path.join(lab, "s1.png"), np.zeros((12, 9), np.uint8))
    with pytest.raises(ValueError, match=r"s1\.png' is 10x12 .* mask .*s1\.png' is 9x12"):
        SegmentationFolder(img, lab)
    write(os.path.join(lab, "s1.png"), np.full((12, 10), 1, np.uint8))
    # mask values outside the classes
    bad = np.zeros((12, 10), np.uint8)
    bad[0, :3] = (5, 7, 255)
    write(os.path.join(lab, "s0.png"), bad)
    ds = SegmentationFolder(img, lab, num_classes=3)
    with pytest.raises(ValueError, match=r"s0\.png' has class ids outside \[0, 3\) .*\[5, 7\]"):
        ds[0]
    with pytest.raises(ValueError, match=r"s0\.png' has values not in label_map .*\[5, 7\]"):
        SegmentationFolder(img, lab, label_map={0: 0, 1: 1})[0]
    write(os.path.join(lab, "s0.png"), np.zeros((12, 10), np.uint8))
    # channel counts differ
    write(os.path.join(img, "s1.png"), np.zeros((12, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"s1\.png' \(mode RGB\) has 3 channel.*first image "
                                         r".*s0\.png' \(mode L\) has 1"):
        SegmentationFolder(img, lab)
    write(os.path.join(img, "s1.png"), np.zeros((12, 10), np.uint8))
    # an RGB mask without a colour label_map
    write(os.path.join(lab, "s1.png"), np.zeros((12, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"s1\.png' has mode RGB.*colour label_map"):
        SegmentationFolder(img, lab)
    write(os.path.join(lab, "s1.png"), np.zeros((12, 10), np.uint8))
    with pytest.raises(ValueError, match="class_names has 2 names for num_classes=3"):
        SegmentationFolder(img, lab, num_classes=3, class_names=["a", "b"])
    with pytest.raises(TypeError, match="label_map must be a non-empty dict"):
        SegmentationFolder(img, lab, label_map=[(0, 0)])
    with pytest.raises(ValueError, match="ignore_index=1 is a class id"):
        SegmentationFolder(img, lab, num_classes=3, ignore_index=1)
    with pytest.raises(ValueError, match=r"1 stem\(s\) not in the folders: 'zz'"):
        SegmentationFolder(img, lab, stems=["s0", "zz"])


def test_read_image(tmp_path):
    g = np.random.default_rng(2)
    gray = g.integers(0, 256, (5, 6), dtype=np.uint8)
    rgb = g.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    write(str(tmp_path / "g.png"), gray)
    write(str(tmp_path / "c.png"), rgb)
    image = read_image(tmp_path / "g.png")
    assert image.shape == (1, 5, 6) and image.dtype == torch.float32
    np.testing.assert_allclose(image[0].numpy(), gray / 255.0, rtol=1e-6)
    assert torch.equal(read_image(tmp_path / "g.png", channels=3), image.repeat(3, 1, 1))
    np.testing.assert_allclose(read_image(tmp_path / "c.png").permute(1, 2, 0).numpy(),
                               rgb / 255.0, rtol=1e-6)
    luma = (rgb / 255.0) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(read_image(tmp_path / "c.png", channels=1)[0].numpy(), luma,
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"cannot read image file .*missing\.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="channels must be None, 1 or 3"):
        read_image(tmp_path / "g.png", channels=2)


def test_folder_unreadable_and_truncated_files(tmp_path):
    img, lab, _, _ = make_folder(tmp_path, size=(64, 64))
    path = os.path.join(img, "s1.png")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # the header survives, the pixels do not
    ds = SegmentationFolder(img, lab, num_classes=3)
    with pytest.raises(ValueError, match=r"cannot read image file .*s1\.png") as info:
        ds[1]
    assert info.value.__cause__ is not None
    with open(os.path.join(lab, "s2.png"), "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(ValueError, match=r"cannot read mask file .*s2\.png"):
        SegmentationFolder(img, lab, num_classes=3)


def test_folder_warns_about_0_255_masks(tmp_path):
    img, lab, _, _ = make_folder(tmp_path, values=(0, 255))
    ds = SegmentationFolder(img, lab, num_classes=2)
    with pytest.warns(UserWarning, match=r"255 is the ignore index.*label_map=\{0: 0, 255: 1\}"):
        ds[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[1], ds[2]  # once per dataset
        fixed = SegmentationFolder(img, lab, label_map={0: 0, 255: 1})
        assert fixed.num_classes == 2 and set(fixed[0]["mask"].unique().tolist()) <= {0, 1}


# --- presets on the shared data -------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir(ISBI), reason="shared ISBI 2012 data not present")
def test_isbi2012_preset():
    train, val = isbi2012_membrane(ISBI), isbi2012_membrane(ISBI, "val")
    assert len(train) == 20 and len(val) == 4 and len(isbi2012_membrane(ISBI, "all")) == 24
    assert train.stems == [f"{i:02d}" for i in range(20)] and val.stems[0] == "20"
    assert (train.num_classes, train.in_channels, train.class_names) == (2, 1, ["membrane", "cell"])
    s = val[1]
    raw_image = np.asarray(Image.open(os.path.join(ISBI, "images", "21.png")))
    raw_label = np.asarray(Image.open(os.path.join(ISBI, "labels", "21.png")))
    assert s["image"].shape == (1, 512, 512) and s["mask"].shape == (512, 512)
    np.testing.assert_allclose(s["image"][0].numpy(), raw_image / 255.0, rtol=1e-6)
    assert np.array_equal(s["mask"].numpy(), (raw_label == 255).astype(np.int64))
    assert 0.1 < (s["mask"] == 0).float().mean() < 0.4  # membranes are a minority
    assert len(isbi2012_membrane(ISBI, train_count=22)) == 22
    with pytest.raises(ValueError, match="split must be 'train', 'val' or 'all'"):
        isbi2012_membrane(ISBI, "test")
    with pytest.raises(ValueError, match="train_count=24 leaves no val files"):
        isbi2012_membrane(ISBI, "val", train_count=24)


@pytest.mark.skipif(not os.path.isdir(CAMVID), reason="shared CamVid data not present")
def test_camvid_preset():
    train, val = camvid(CAMVID), camvid(CAMVID, "val")
    assert len(train) == 367 and len(val) == 101
    assert train.num_classes == 11 and train.in_channels == 3
    assert train.class_names == list(CAMVID_CLASS_NAMES) and train.class_names[10] == "Bicyclist"
    assert len(CAMVID_CLASS_WEIGHTS) == 11 and CAMVID_CLASS_WEIGHTS[6] == 9.6446
    s = train[0]
    stem = train.stems[0]
    raw = np.asarray(Image.open(os.path.join(CAMVID, "trainannot", stem + ".png"))).astype(np.int64)
    assert s["image"].shape == (3, 360, 480) and s["mask"].shape == (360, 480)
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert np.array_equal(s["mask"].numpy(), np.where(raw == 11, 255, raw))
    assert set(s["mask"].unique().tolist()) <= set(range(11)) | {255}
    own = camvid(CAMVID, "val", ignore_index=11)
    assert own.ignore_index == 11 and (own[0]["mask"] <= 11).all()
    with pytest.raises(ValueError, match="camvid: split must be"):
        camvid(CAMVID, "all")
