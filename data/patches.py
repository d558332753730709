r"""Random augmented training patches read from prepared caches (paper section 2.2, step 3).

    python -c "from data import PreparedDataset, PatchDataset; \
        ds = PreparedDataset('cache', 'IDR', 1536, 'train'); \
        print({k: v.shape for k, v in PatchDataset([ds], patch=512, length=8)[0].items()})"

Item i is a deterministic function of (seed, i): the random generator is
np.random.default_rng([seed, i]), so a resumed run sees the same batches and DataLoader workers need
no extra seeding. Each item reads only the window it needs from the memory-mapped cache, then
applies ONE affine warp (flips, rotation, scale, shift) to the image (bilinear) and to the
lesion/FOV bitmask (nearest), then one colour transform.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.cache import FOV_BIT  # cached bitmask: bits 0-3 = LESIONS, bit 4 = FOV
from data.ids import LESIONS

AUGMENT = {  # ranges of the random augmentation; PatchDataset.aug is a copy that can be edited
    "flip": 0.5,  # probability of a horizontal flip (with the rotation, also vertical flips)
    "rotate": 180.0,  # degrees, uniform in +-rotate: fundus photographs have no orientation
    "scale": (0.8, 1.25),  # zoom factor, log-uniform
    "shift": 0.1,  # extra shift of the centre, fraction of the patch size
    "hue": 0.03,  # hue rotation, fraction of a turn
    "saturation": 0.2,  # saturation factor in 1 +- 0.2
    "value": 0.2,  # HSV value (multiplicative brightness) factor in 1 +- 0.2
    "brightness": 0.1,  # additive brightness, fraction of 255
    "contrast": 0.2,  # contrast factor about the patch's mean grey, in 1 +- 0.2
}
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 grey, as PIL's "L"


def _window(arr, y0, x0, h, w):
    """arr[y0:y0+h, x0:x0+w] clipped to the array (a memmap reads only these rows / columns):
    (win, y0, x0)."""
    H, W = arr.shape[:2]
    ya, xa = min(max(0, y0), H), min(max(0, x0), W)
    yb, xb = max(ya, min(H, y0 + h)), max(xa, min(W, x0 + w))
    return np.ascontiguousarray(arr[ya:yb, xa:xb]), ya, xa


def _fov_centre(bits, geometry, rng, tries=20):
    """A random pixel of the FOV (rejection sampling inside the image's content box), as (y, x)."""
    (w, h), (left, top) = geometry["size"], geometry["pad"]
    for _ in range(tries):
        y, x = int(rng.integers(top, top + h)), int(rng.integers(left, left + w))
        if bits[y, x] >> FOV_BIT & 1:
            return y, x
    return top + h // 2, left + w // 2  # a FOV this sparse is unusual: take the centre


def colour_matrix(rng, aug):
    """(3, 3) matrix and contrast factor of a random hue rotation, saturation and value change.

    NOTE: the HSV jitter is linear, one pass over the patch: value = a scale of RGB (exactly HSV's
    V), saturation = a blend with the grey level, hue = a rotation about the grey axis (close to an
    HSV hue shift for small angles). Exact HSV conversions would cost more than the whole warp.
    """
    phi = 2 * math.pi * rng.uniform(-aug["hue"], aug["hue"])
    k = np.full(3, 1 / math.sqrt(3))
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    # Rodrigues' formula: a rotation by phi about the grey axis k
    hue = math.cos(phi) * np.eye(3) + math.sin(phi) * K + (1 - math.cos(phi)) * np.outer(k, k)
    s = rng.uniform(1 - aug["saturation"], 1 + aug["saturation"])
    sat = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), LUMA)
    v = rng.uniform(1 - aug["value"], 1 + aug["value"])
    return v * hue @ sat


_GRIDS = {}  # patch size -> (P*P, 3) homogeneous output pixel centres


def _warp(win, bwin, A, t, P):
    """Sample (P, P) outputs at source = A @ q + t (q: output pixel centres, continuous coordinates
    of the window).

    The image is sampled bilinearly with torch's grid_sample, the bitmask with PIL's nearest
    neighbour (uint8, no float round trip); both use the same continuous-coordinate convention, so
    they stay aligned.
    """
    h, w = bwin.shape
    if P not in _GRIDS:
        q = torch.arange(P, dtype=torch.float32) + 0.5
        qy, qx = torch.meshgrid(q, q, indexing="ij")
        _GRIDS[P] = torch.stack([qx, qy, torch.ones_like(qx)], dim=-1).view(-1, 3)
    # source -> grid_sample's [-1, 1] (align_corners=False): g = 2 s / size - 1
    norm = np.array([2 / w, 2 / h])
    T = np.concatenate([A.T * norm, (t * norm - 1)[None]], axis=0)  # (3, 2)
    grid = (_GRIDS[P] @ torch.from_numpy(T).float()).view(1, P, P, 2)
    x = torch.from_numpy(np.asarray(win, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, 3, h, w)
    img = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0]  # (3, P, P)
    affine = (A[0, 0], A[0, 1], t[0], A[1, 0], A[1, 1], t[1])
    bits = np.asarray(Image.fromarray(bwin).transform((P, P), Image.AFFINE, affine, Image.NEAREST))
    return img, bits


def lesion_pixels(bits, lesion_bits=0b1111, cap=1024):
    """Per lesion present in the image (of those in lesion_bits): (lesion index, int64 flat indices
    of up to `cap` of its pixels).

    The subsample is evenly strided over the sorted pixels (deterministic, so item i stays a
    function of (seed, i)); it only needs to spread the patch centres over every lesion of the
    image.
    """
    flat = np.asarray(bits).reshape(-1)
    pools = []
    for c in range(len(LESIONS)):
        if lesion_bits >> c & 1:
            idx = np.flatnonzero(flat & (1 << c))
            if idx.size:
                step = np.linspace(0, idx.size - 1, min(cap, idx.size)).astype(np.int64)
                pools.append((c, idx[step]))
    return pools


def make_patch(image, bits, geometry, patch, rng, aug=None, centre=None):
    """One (P, P) patch centred on `centre` (y, x), or on a random FOV pixel of a prepared image.

    image (R, R, 3) and bits (R, R) may be memmaps (only the window is read). aug=None: a plain crop
    (exactly the same pixels as the prepared image); else a dict like AUGMENT.
    Returns {"image": uint8 (3, P, P), "masks": uint8 (4, P, P) of 0/1, "fov": bool (P, P)} torch
    tensors.
    """
    P = patch
    cy, cx = centre if centre is not None else _fov_centre(bits, geometry, rng)
    if aug is None:
        y0, x0 = cy - P // 2, cx - P // 2
        img, b = np.zeros((P, P, 3), np.uint8), np.zeros((P, P), np.uint8)
        win, wy, wx = _window(image, y0, x0, P, P)
        img[wy - y0:wy - y0 + win.shape[0], wx - x0:wx - x0 + win.shape[1]] = win
        win, _, _ = _window(bits, y0, x0, P, P)
        b[wy - y0:wy - y0 + win.shape[0], wx - x0:wx - x0 + win.shape[1]] = win
        img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # (3, P, P)
    else:
        # Output pixel q (continuous coords, centres at j + 0.5) samples source c + A (q - P/2).
        # c is where the plain crop (x0 = cx - P // 2) has its centre, so the identity warp maps
        # output pixel centres onto source pixel centres exactly: q = j + 0.5 -> x0 + j + 0.5
        # (no half-pixel blur, no nearest ties).
        theta = math.radians(rng.uniform(-aug["rotate"], aug["rotate"]))
        scale = math.exp(rng.uniform(math.log(aug["scale"][0]), math.log(aug["scale"][1])))
        flip = -1.0 if rng.random() < aug["flip"] else 1.0
        A = np.array([[math.cos(theta), -math.sin(theta)],
                      [math.sin(theta), math.cos(theta)]]) / scale
        A = A @ np.diag([flip, 1.0])  # (2, 2) acting on (x, y)
        c = np.array([cx, cy]) + (P / 2 - P // 2) + rng.uniform(-aug["shift"], aug["shift"], 2) * P
        half = np.abs(A).sum(1) * P / 2  # half extent of the warped patch in the source, (x, y)
        x0, y0 = int(math.floor(c[0] - half[0])) - 1, int(math.floor(c[1] - half[1])) - 1
        x1, y1 = int(math.ceil(c[0] + half[0])) + 1, int(math.ceil(c[1] + half[1])) + 1
        win, wy, wx = _window(image, y0, x0, y1 - y0, x1 - x0)  # (h, w, 3): the only pixels read
        bwin, _, _ = _window(bits, y0, x0, y1 - y0, x1 - x0)
        M = colour_matrix(rng, aug)
        contrast = rng.uniform(1 - aug["contrast"], 1 + aug["contrast"])
        brightness = 255 * rng.uniform(-aug["brightness"], aug["brightness"])
        if win.size == 0:  # patch entirely off the image (only with huge shifts): all padding
            img, b = torch.zeros(3, P, P), np.zeros((P, P), np.uint8)
        else:
            img, b = _warp(win, bwin, A, c - A @ np.array([P / 2, P / 2]) - np.array([wx, wy]), P)
        # Colour jitter inside the FOV only (the padding stays black):
        # out = c M x + (1 - c) mean + b, with M the HSV matrix, c the contrast about the FOV's
        # mean grey, b the brightness; one pass.
        fov = torch.from_numpy(b >> FOV_BIT & 1).float()  # (P, P)
        x = img.reshape(3, -1)  # (3, P*P)
        mean = (float(torch.from_numpy(LUMA @ M).float() @ (x @ fov.reshape(-1)))
                / max(1.0, float(fov.sum())))  # mean grey of the FOV after M
        offset = torch.full((3, 1), (1 - contrast) * mean + brightness)
        jit = torch.addmm(offset, torch.from_numpy(contrast * M).float(), x).view(3, P, P)
        img = torch.lerp(img, jit, fov).clamp_(0, 255).add_(0.5).to(torch.uint8)  # round half up
    masks = (b[None] >> np.arange(len(LESIONS), dtype=np.uint8)[:, None, None]) & 1  # (4, P, P)
    return {"image": img, "masks": torch.from_numpy(np.ascontiguousarray(masks)),
            "fov": torch.from_numpy((b >> FOV_BIT & 1).astype(bool))}


class PatchDataset(torch.utils.data.Dataset):
    """`length` random patches from the union of the given PreparedDatasets (each image equally
    likely).

    lesion_patches=q: a fraction q of the patches is centred on a lesion pixel instead of a random
    FOV pixel (a lesion of the image drawn uniformly among those it has, then one of its pixels:
    the smallest lesions, microaneurysms, get as many centres as the largest); lesions: the lesion
    names that count (the annotated ones). q = 0 draws exactly the stream of plain random patches
    (paper section 2.2). lesion_weights: one weight per lesion (LESIONS order) for that draw, e.g.
    (1, 1, 4, 1) centres four times as many patches on microaneurysms; None: uniform.
    styles: one style-token index per dataset (train.py --style-condition): each item then has
    "style", an int64 scalar tensor (a (B,) batch once collated); None leaves the items as they
    are.
    augment_p: the fraction of patches augmented (the others are plain crops; the authors' code
    augments with p = 0.5); rotate: the rotation range in degrees (default AUGMENT's +-180; the
    authors' +-10).
    """

    def __init__(self, datasets, patch=512, length=1000, seed=0, augment=True, lesion_patches=0.0,
                 lesions=LESIONS, styles=None, augment_p=1.0, rotate=None, lesion_weights=None):
        self.datasets, self.patch = list(datasets), int(patch)
        self.length, self.seed = int(length), int(seed)
        if styles is not None and len(styles) != len(self.datasets):
            raise ValueError(f"PatchDataset: {len(styles)} style tokens for {len(self.datasets)} "
                             "datasets")
        self.styles = None if styles is None else [int(t) for t in styles]
        self.augment, self.aug = augment, dict(AUGMENT)
        if rotate is not None:
            self.aug["rotate"] = float(rotate)
        if not 0.0 <= augment_p <= 1.0:
            raise ValueError(f"--augment-p must be in [0, 1], got {augment_p}")
        self.augment_p = float(augment_p)
        if not 0.0 <= lesion_patches <= 1.0:
            raise ValueError(f"--lesion-patches must be in [0, 1], got {lesion_patches}")
        self.lesion_patches = float(lesion_patches)
        weights = None if lesion_weights is None else [float(w) for w in lesion_weights]
        if weights is not None and (len(weights) != len(LESIONS) or min(weights) < 0
                                    or not max(weights) > 0 or any(w != w for w in weights)):
            raise ValueError(f"--lesion-weights: {len(LESIONS)} weights >= 0, not all 0, "
                             f"got {lesion_weights}")
        # NOTE: equal weights are the uniform draw itself: None keeps its stream bit-identical
        self.lesion_weights = None if weights is None or len(set(weights)) == 1 else weights
        self.lesion_bits = sum(1 << LESIONS.index(name) for name in lesions)  # as in the bitmask
        self._pools = {}  # (dataset, image) -> lesion_pixels(); filled on first use, per process
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])  # (D + 1,)
        if self.offsets[-1] == 0:
            raise ValueError("PatchDataset: the chosen dataset splits hold no images")

    def __len__(self):
        return self.length

    def pick(self, rng):
        """(dataset index, item index) of a uniformly drawn image of the union."""
        k = int(rng.integers(self.offsets[-1]))
        d = int(np.searchsorted(self.offsets, k, side="right")) - 1
        return d, k - int(self.offsets[d])

    def sample(self, i, read=None):
        """Item i; read(d, j) -> (image, bits) replaces the cache read (bench_data.py decodes the
        source)."""
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])  # item i's own stream: resumable, worker-free
        d, j = self.pick(rng)
        image, bits = read(d, j) if read else self.datasets[d].read(j)
        centre = None
        # NOTE: no extra draw when lesion_patches is 0: the plain stream stays bit-identical
        if self.lesion_patches and rng.random() < self.lesion_patches:
            if (d, j) not in self._pools:
                self._pools[d, j] = lesion_pixels(bits, self.lesion_bits)
            pools = self._pools[d, j]
            w = ([self.lesion_weights[c] for c, _ in pools] if self.lesion_weights and pools
                 else None)
            if w is not None and sum(w) == 0:
                pools = []  # only lesions weighted 0 here: a random FOV centre
            if pools:  # an image without lesions: a random FOV centre, as usual
                k = (int(rng.integers(len(pools))) if w is None
                     else int(rng.choice(len(pools), p=np.asarray(w) / sum(w))))
                pool = pools[k][1]
                centre = divmod(int(pool[int(rng.integers(pool.size))]), bits.shape[1])  # (y, x)
        augment = self.augment
        # NOTE: no extra draw at 1: the default stream stays bit-identical
        if augment and self.augment_p < 1.0:
            augment = rng.random() < self.augment_p
        item = make_patch(image, bits, self.datasets[d].geometry(j), self.patch, rng,
                          self.aug if augment else None, centre)
        if self.styles is not None:
            item["style"] = torch.tensor(self.styles[d])  # int64 (): the patch dataset's token
        # bool (4,): the lesions annotated in the patch's image (train.compute_loss leaves the
        # others out); a dataset without the record (a test's stand-in) annotates all four
        annotated = getattr(self.datasets[d], "annotated", None)
        item["annotated"] = torch.from_numpy(np.asarray(
            annotated(j) if annotated else [True] * len(LESIONS), dtype=bool))
        return item

    def __getitem__(self, i):
        return self.sample(i)
