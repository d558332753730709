"""data/patches.py: random augmented training patches from prepared caches: the region drawn,
determinism and types, image and masks warped together, lesion-centred patches, --augment-p and
--rotate.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_patches.py

References are independent of the code under test: patch regions found by brute-force search over
the images preprocessed again from the source files, images that encode their own masks.
"""
import numpy as np
import pytest
import torch

from data.cache import PreparedDataset
from data.datasets import list_samples, load_sample
from data.ids import LESIONS
from data.patches import PatchDataset
from data.preprocess import preprocess_image


def test_patch_without_augmentation_is_the_same_region(cache_dir, synth_root, nearest_reference):
    ds = PreparedDataset(cache_dir, "MES", 128, "train")
    samples = {s.id: s for s in list_samples("MES", synth_root / "MAPLES-DR")}
    refs = []
    for sid in ds.ids:  # the preprocessed images, recomputed from the source files
        image, masks = load_sample(samples[sid])
        out, fov, geo = preprocess_image(image, 128)
        refs.append((np.pad(out, ((32, 32), (32, 32), (0, 0))),
                     np.pad(nearest_reference(masks, geo), ((0, 0), (32, 32), (32, 32))),
                     np.pad(fov, 32)))
    patches = PatchDataset([ds], patch=64, length=10, seed=3, augment=False)
    for i in range(len(patches)):
        p = patches[i]
        img = p["image"].permute(1, 2, 0).numpy()
        assert p["fov"][32, 32]  # centred in the FOV
        found = []
        # brute force: every position of every image
        for k, (ref, ref_masks, ref_fov) in enumerate(refs):
            # patch centre at (y, x)
            cand = np.argwhere((ref[32:-32, 32:-32] == img[32, 32]).all(-1))
            for y, x in cand:
                if np.array_equal(ref[y:y + 64, x:x + 64], img):
                    found.append((k, y, x))
        assert len(found) == 1, found
        k, y, x = found[0]
        assert np.array_equal(refs[k][2][y:y + 64, x:x + 64], p["fov"].numpy())
        assert (refs[k][1][:, y:y + 64, x:x + 64] == p["masks"].numpy().astype(bool)).mean() > 0.999


def test_patches_deterministic_and_typed(cache_dir):
    dss = [PreparedDataset(cache_dir, d, 128, "train") for d in ("IDR", "RET")]
    a = PatchDataset(dss, patch=48, length=6, seed=1)
    b = PatchDataset(dss, patch=48, length=6, seed=1)
    later = [b[i] for i in (5, 2, 0)]  # access order does not matter
    for i, q in zip((5, 2, 0), later):
        p = a[i]
        assert all(torch.equal(p[k], q[k]) for k in p)
        assert p["image"].dtype == torch.uint8 and p["image"].shape == (3, 48, 48)
        assert p["masks"].dtype == torch.uint8 and p["masks"].shape == (4, 48, 48)
        assert p["masks"].max() <= 1
        assert p["fov"].dtype == torch.bool and p["fov"].shape == (48, 48)
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], PatchDataset(dss, patch=48, length=6, seed=2)[0]["image"])
    loader = torch.utils.data.DataLoader(a, batch_size=3, num_workers=2)
    batch = next(iter(loader))
    assert torch.equal(batch["image"][2], a[2]["image"])
    assert torch.equal(batch["masks"][1], a[1]["masks"])


def test_augmented_patches_keep_image_and_masks_aligned(cache_dir):
    ds = PreparedDataset(cache_dir, "FGA", 128, "train")
    patches = PatchDataset([ds], patch=64, length=12, seed=0)
    for k in ("hue", "saturation", "value", "brightness", "contrast"):
        patches.aug[k] = 0.0  # geometry only, so the image can encode the masks

    # image = 200 where HE, +50 where FOV: the warp of the image must match the masks'
    def coded(d, j):
        bits = np.asarray(ds.read(j)[1])
        code = ((bits >> 1 & 1) * 200 + (bits >> 4 & 1) * 50).astype(np.uint8)
        return np.repeat(code[..., None], 3, axis=2), bits

    for i in range(len(patches)):
        p = patches.sample(i, read=coded)
        expected = p["masks"][1].int() * 200 + p["fov"].int() * 50
        assert ((p["image"][0].int() - expected).abs() <= 30).float().mean() > 0.97
    patches.aug.update({"hue": 0.5, "brightness": 0.5})  # colour jitter leaves the padding black
    p = patches[0]
    assert (~p["fov"]).any() and (p["image"][:, ~p["fov"]] <= 40).float().mean() > 0.95


@pytest.mark.parametrize("P", [32, 33])
def test_identity_warp_is_the_plain_crop_pixel_for_pixel(cache_dir, P):
    """No rotation, scale 1, no shift, no colour jitter: the warped patch is the plain crop (or its
    mirror), exactly. Random per-pixel image and bits make any half- or one-pixel offset (blur,
    nearest ties) fail."""
    ds = PreparedDataset(cache_dir, "FGA", 128, "train")
    rng = np.random.default_rng(7)
    # lesion bits 0-3 + FOV bit 4
    noise_bits = rng.integers(0, 32, (len(ds), 128, 128), dtype=np.uint8)
    noise_image = rng.integers(0, 256, (len(ds), 128, 128, 3), dtype=np.uint8)
    # the image also encodes the bits: image and masks must agree
    noise_image[..., 0] = noise_bits * 8

    def coded(d, j):
        return noise_image[j], noise_bits[j]

    plain = PatchDataset([ds], patch=P, length=16, seed=5, augment=False)
    warped = PatchDataset([ds], patch=P, length=16, seed=5, augment=True)
    warped.aug.update({"rotate": 0.0, "scale": (1.0, 1.0), "shift": 0.0, "hue": 0.0,
                       "saturation": 0.0, "value": 0.0, "brightness": 0.0, "contrast": 0.0,
                       "flip": 0.5})
    flips = set()
    weights = torch.tensor([1, 2, 4, 8]).view(4, 1, 1)
    for i in range(16):
        a, b = plain.sample(i, read=coded), warped.sample(i, read=coded)
        # the reference crop itself: its image encodes its masks and FOV
        code = a["masks"].int().mul(weights).sum(0).add(a["fov"].int() * 16).mul(8).to(torch.uint8)
        assert torch.equal(a["image"][0], code)
        same = all(torch.equal(a[k], b[k]) for k in a)
        mirrored = all(torch.equal(a[k].flip(-1), b[k]) for k in a)
        assert same or mirrored, f"item {i}: the identity warp moved pixels"
        flips.add(mirrored)
    assert flips == {False, True}  # both the plain and the mirrored case were checked


def test_lesion_centred_patches(cache_dir):
    """lesion_patches=1: every patch of an image with the chosen lesion is centred on one of its
    pixels."""
    ds = PreparedDataset(cache_dir, "IDR", 128, "train")
    P = 32
    for lesions in (("MA",), ("EX", "HE")):
        bits = [1 << LESIONS.index(name) for name in lesions]
        patches = PatchDataset([ds], patch=P, length=60, seed=3, augment=False, lesion_patches=1.0,
                               lesions=lesions)
        centred = 0
        for i in range(len(patches)):
            rng = np.random.default_rng([3, i])
            _, j = patches.pick(rng)
            image_bits = np.asarray(ds.read(j)[1])
            has = any((image_bits & b).any() for b in bits)
            # plain crop: the centre pixel is the drawn one
            centre = patches[i]["masks"][:, P // 2, P // 2]
            on = any(centre[LESIONS.index(name)] for name in lesions)
            assert on or not has, (lesions, i)
            centred += on
        assert centred > 30  # most synthetic images have these lesions
    with pytest.raises(ValueError, match="--lesion-patches"):
        PatchDataset([ds], lesion_patches=1.5)


def test_lesion_weights_draw_the_lesion_of_the_centre(cache_dir):
    """lesion_weights: the lesion a lesion-centred patch is centred on is drawn with these weights
    among the lesions of the image (a weight 0 never drawn); equal weights: the uniform stream."""
    ds = PreparedDataset(cache_dir, "IDR", 128, "train")
    P, n = 16, 400
    kw = dict(patch=P, length=n, seed=5, augment=False, lesion_patches=1.0)
    plain, equal = PatchDataset([ds], **kw), PatchDataset([ds], lesion_weights=(2, 2, 2, 2), **kw)
    assert all(torch.equal(plain[i]["image"], equal[i]["image"]) for i in range(20))
    weights = (1.0, 0.0, 4.0, 1.0)
    patches = PatchDataset([ds], lesion_weights=weights, **kw)
    expected, got = 0.0, 0
    for i in range(n):
        _, j = patches.pick(np.random.default_rng([5, i]))
        bits = np.asarray(ds.read(j)[1])
        present = [c for c in range(len(LESIONS)) if (bits >> c & 1).any() and weights[c] > 0]
        centre = patches[i]["masks"][:, P // 2, P // 2]  # plain crop: the drawn pixel
        assert any(centre[c] for c in present) or not present, i  # never HE's draw alone
        if 2 in present:  # the chance MA is drawn here: its weight over the present ones'
            expected += weights[2] / sum(weights[c] for c in present)
            got += bool(centre[2])
    # a binomial sum: within 4 standard deviations (the draws are seeded: no flakiness)
    assert expected > 50 and abs(got - expected) < 4 * np.sqrt(expected), (got, expected)
    for bad in ((1, 1, 1), (0, 0, 0, 0), (1, -1, 1, 1), (1, float("nan"), 1, 1)):
        with pytest.raises(ValueError, match="--lesion-weights"):
            PatchDataset([ds], lesion_weights=bad)


def test_augment_p_and_rotate_as_the_authors_code(cache_dir, monkeypatch):
    """--augment-p P: a fraction P of the patches is augmented, the rest plain crops (the authors':
    0.5); P = 1 is the default stream, bit for bit; --rotate DEG: the rotation range an augmented
    patch is drawn from."""
    import data.patches as patches

    ds = PreparedDataset(cache_dir, "IDR", 128, "train")
    default = PatchDataset([ds], patch=32, length=6, seed=3)
    same = PatchDataset([ds], patch=32, length=6, seed=3, augment_p=1.0, rotate=180)
    for i in range(6):
        assert all(torch.equal(default[i][k], same[i][k]) for k in default[i])
    calls = []
    real = patches.make_patch

    def spy(image, bits, geometry, patch, rng, aug=None, centre=None):
        calls.append(None if aug is None else aug["rotate"])
        return real(image, bits, geometry, patch, rng, aug, centre)

    monkeypatch.setattr(patches, "make_patch", spy)
    half = PatchDataset([ds], patch=32, length=400, seed=0, augment_p=0.5, rotate=10)
    for i in range(len(half)):
        half[i]
    plain = sum(c is None for c in calls)
    assert 150 < plain < 250 and set(calls) == {None, 10.0}  # Binomial(400, 0.5): 200 +- 3 sd
    with pytest.raises(ValueError, match="--augment-p"):
        PatchDataset([ds], patch=32, augment_p=1.5)


class FlatSet:
    """A prepared-dataset stand-in whose every pixel has one grey value and is inside the FOV."""

    def __init__(self, grey, n=3, size=32):
        self.grey, self.n, self.size = grey, n, size

    def __len__(self):
        return self.n

    def read(self, j):
        from data.cache import FOV_BIT

        return (np.full((self.size, self.size, 3), self.grey, np.uint8),
                np.full((self.size, self.size), 1 << FOV_BIT, np.uint8))

    def geometry(self, j):
        return {"size": (self.size, self.size), "pad": (0, 0)}


def test_patches_carry_their_datasets_token_and_the_plain_stream_is_unchanged():
    sets = [FlatSet(40), FlatSet(200, n=5)]
    plain = PatchDataset(sets, patch=16, length=40, seed=3, augment=False)
    tagged = PatchDataset(sets, patch=16, length=40, seed=3, augment=False, styles=[2, 0])
    seen = set()
    for i in range(len(plain)):
        a, b = plain[i], tagged[i]
        assert "style" not in a and all(torch.equal(a[k], b[k]) for k in a)
        grey = int(b["image"][0, 8, 8])  # which dataset the patch came from, read off its pixels
        assert b["style"].dtype == torch.int64 and int(b["style"]) == {40: 2, 200: 0}[grey]
        seen.add(grey)
    assert seen == {40, 200}
    batch = torch.utils.data.default_collate([tagged[i] for i in range(4)])
    assert batch["style"].shape == (4,)
    with pytest.raises(ValueError) as err:  # the two counts that disagree
        PatchDataset(sets, styles=[0])
    assert "1 style tokens" in str(err.value) and "2 datasets" in str(err.value)
