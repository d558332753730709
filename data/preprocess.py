r"""Paper section 2.2: crop the fundus to its field of view (FOV), resize keeping the aspect ratio,
pad square.

    python -m data.synthetic --out demo/data --images 4 --size 512 --datasets IDR
    python -c "import numpy as np; from data.datasets import load_image; \
        from data.preprocess import preprocess_image; \
        image = load_image('demo/data/IDRiD/A. Segmentation/1. Original Images/\
a. Training Set/IDRiD_01.jpg'); \
        im, fov, geo = preprocess_image(np.asarray(image), 512); print(geo)"

The same three steps run once per image in `data.prepare` (with the lesion masks, nearest
neighbour) and on users' own photographs in `predict.py --images`, whose predictions
`restore_geometry` maps back. The steps in words: docs/PROTOCOL.md, "Preprocessing".
"""
import numpy as np
from PIL import Image
from scipy import ndimage

# NOTE: torch is imported by restore_geometry and restore_crop only: preprocess_image serves
# retlesions.preprocess, which prepares an exported model's input without torch

# red-channel range for the FOV, after a small blur (docs/PROTOCOL.md, "Preprocessing")
FOV_THRESHOLD = (20, 40)
# the crop box is found on a copy reduced to about this size: a few pixels of precision
WORK_SIZE = 1024


def _largest_component(mask):
    """The largest 4-connected True component of a bool mask (all False when there is none)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask if n else np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    return labels == sizes.argmax()


def red_threshold(red):
    """FOV threshold: a quarter of the median red inside the fundus, clipped to FOV_THRESHOLD.

    NOTE: bright photographs have a faint glow around the FOV (IDRiD_01: red ~25 just outside the
    rim), dark ones a dim rim; scaling with the fundus brightness keeps both on the right side.
    """
    inside = red[red > FOV_THRESHOLD[0]]
    if inside.size == 0:
        return float(FOV_THRESHOLD[0])
    return float(np.clip(0.25 * np.median(inside), *FOV_THRESHOLD))


def fov_box(image):
    """(x0, y0, x1, y1) box of the largest bright component of a PIL RGB image, and the red
    threshold used."""
    W, H = image.size
    k = max(1, max(W, H) // WORK_SIZE)
    small = image.reduce(k) if k > 1 else image  # box average: also the "small blur"
    red = ndimage.uniform_filter(np.asarray(small.getchannel("R")), 3)  # (h, w) uint8
    t = red_threshold(red)
    fov = _largest_component(red > t)
    if fov.sum() < 0.01 * fov.size:  # no fundus found (e.g. a black frame): keep the whole image
        return (0, 0, W, H), t
    ys, xs = np.flatnonzero(fov.any(1)), np.flatnonzero(fov.any(0))  # rows / columns with FOV
    # back to full-size pixels: the box of the reduced copy times k, clipped to the image
    return (int(xs[0]) * k, int(ys[0]) * k,
            min(W, (int(xs[-1]) + 1) * k), min(H, (int(ys[-1]) + 1) * k)), t


def fit_geometry(width, height, box, resolution, threshold):
    """Plain-number description of crop box -> resize (aspect kept) -> centred pad to resolution."""
    x0, y0, x1, y1 = box
    s = resolution / max(x1 - x0, y1 - y0)  # the longer side becomes `resolution`
    w = min(resolution, max(1, round((x1 - x0) * s)))
    h = min(resolution, max(1, round((y1 - y0) * s)))
    return {"width": width, "height": height, "box": [x0, y0, x1, y1], "size": [w, h],
            "pad": [(resolution - w) // 2, (resolution - h) // 2], "resolution": resolution,
            "fov_threshold": threshold}


def resize_image(image, geometry):
    """PIL RGB image -> uint8 (R, R, 3): crop, resize (bilinear, antialiased when shrinking), pad
    with black."""
    w, h = geometry["size"]
    small = image.resize((w, h), Image.BILINEAR, box=tuple(geometry["box"]), reducing_gap=3.0)
    return pad_square(np.asarray(small), geometry)


def pad_square(arr, geometry):
    """Place (h, w, ...) content at the geometry's padding offset of a zero (R, R, ...) array."""
    R, (left, top) = geometry["resolution"], geometry["pad"]
    out = np.zeros((R, R) + arr.shape[2:], dtype=arr.dtype)
    out[top:top + arr.shape[0], left:left + arr.shape[1]] = arr
    return out


def fov_mask(image, geometry):
    """bool (R, R) FOV of a preprocessed image: blurred red > threshold, largest component, holes
    filled."""
    red = ndimage.uniform_filter(image[..., 0], 5)  # (R, R) uint8, small blur against noise
    (w, h), (left, top) = geometry["size"], geometry["pad"]
    content = np.zeros(red.shape, bool)
    # NOTE: the blur would leak a bright rim into the padding: only the content counts
    content[top:top + h, left:left + w] = True
    fov = _largest_component((red > geometry["fov_threshold"]) & content)
    # Fill holes (dark lesions, vessels): background components that do not touch the border.
    labels, n = ndimage.label(~fov)
    if n > 1:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        fov |= ~np.isin(labels, border) & (labels > 0)
    return fov


def preprocess_image(image, resolution):
    """uint8 (H0, W0, 3) -> (image uint8 (R, R, 3), fov bool (R, R), geometry dict of plain
    numbers)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess_image expects uint8 (H, W, 3), got {image.dtype} "
                         f"{image.shape}")
    pil = Image.fromarray(image)
    box, t = fov_box(pil)
    geometry = fit_geometry(pil.width, pil.height, box, resolution, t)
    out = resize_image(pil, geometry)
    return out, fov_mask(out, geometry), geometry


def restore_geometry(arr, geometry):
    """Map (..., R, R) maps on the preprocessed square back to the original (..., H0, W0)
    photograph.

    Floating maps (probabilities) are resized bilinearly, others (bool/int masks) with nearest
    neighbour; outside the crop box the result is 0. Returns the input's type (numpy or torch).
    """
    import torch

    is_numpy = not torch.is_tensor(arr)
    crop, (x0, y0, x1, y1) = restore_crop(arr, geometry)
    out = crop.new_zeros(crop.shape[:-2] + (geometry["height"], geometry["width"]))  # (..., H0, W0)
    out[..., y0:y1, x0:x1] = crop
    return out.numpy() if is_numpy else out


def restore_crop(t, geometry):
    """restore_geometry's work inside the crop box only:
    (..., R, R) numpy or torch -> (torch (..., y1 - y0, x1 - x0), box).

    For callers that write the box into an array of their own (predict.segment, one lesion at a
    time) without a second full-size copy; the photograph is 0 outside the box.
    """
    import torch
    import torch.nn.functional as F

    # numpy in, torch out
    t = t if torch.is_tensor(t) else torch.from_numpy(np.ascontiguousarray(t))
    (w, h), (left, top) = geometry["size"], geometry["pad"]
    x0, y0, x1, y1 = geometry["box"]
    lead = t.shape[:-2]
    content = t[..., top:top + h, left:left + w].reshape(-1, 1, h, w)  # (N, 1, h, w)
    if t.is_floating_point():
        resized = F.interpolate(content, size=(y1 - y0, x1 - x0), mode="bilinear",
                                align_corners=False)
    else:  # nearest-exact: pixel centres map like PIL's resize; interpolate needs float / uint8
        src = content.to(torch.uint8) if t.dtype == torch.bool else content.float()
        resized = F.interpolate(src, size=(y1 - y0, x1 - x0), mode="nearest-exact").to(t.dtype)
    return resized.reshape(lead + (y1 - y0, x1 - x0)), (x0, y0, x1, y1)
