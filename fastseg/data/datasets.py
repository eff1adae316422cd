"""Segmentation datasets: the base class, image/mask folders and the ISBI 2012 / CamVid presets.

Every dataset's ``ds[i]`` is a dict:

- "image": float32 (C, H, W) in [0, 1] (C = 1 grayscale, 3 RGB);
- "mask": int64 (H', W') class ids, ``ignore_index`` where unlabeled;
- "weight": float32 (H', W'), only when built with ``weight_map=``;
- "name": str (the file stem, or "<kind>-<index:05d>" for synthetic data).

H' x W' equals H x W unless a MirrorPad transform made the image larger by 2 * context.
Datasets have ``num_classes``, ``ignore_index``, ``in_channels``, ``class_names`` and a length.

Determinism: ``transform(sample, generator)`` draws all its randomness from a
``torch.Generator`` seeded with ``mix_seed(seed, epoch, index)``; the same (seed, epoch, index)
gives the same sample in any worker process. Call ``set_epoch(e)`` before each epoch (with a
DataLoader, before creating its iterator, and without ``persistent_workers``: workers hold a
copy of the dataset).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from fastseg.data.transforms import _int_arg
from fastseg.data.weight_map import unet_weight_map

__all__ = ["SegmentationDataset", "SegmentationFolder", "isbi2012_membrane", "camvid",
           "read_image", "mix_seed",
           "IMAGE_EXTENSIONS", "ISBI2012_CLASS_NAMES", "CAMVID_CLASS_NAMES",
           "CAMVID_CLASS_WEIGHTS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ISBI2012_CLASS_NAMES = ("membrane", "cell")
CAMVID_CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                      "Fence", "Car", "Pedestrian", "Bicyclist")
# SegNet's median-frequency balancing weights for the 11 CamVid classes, in class-id order.
CAMVID_CLASS_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418,
                        0.6823, 6.2478, 7.3614)

_MASK64 = (1 << 64) - 1
_WEIGHT_MAP_KEYS = ("w0", "sigma", "class_balance", "background")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A 64-bit seed from integers (SplitMix64 chained over them): unlike ``hash()`` it is the
    same in every process and Python run, and nearby inputs give unrelated seeds."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (_int_arg("mix_seed", "value", v) & _MASK64))
    return h


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class. Subclasses set ``num_classes``, ``ignore_index``, ``in_channels`` and
    ``class_names`` and implement ``__len__`` and ``load(i) -> {"image", "mask", "name"}``
    (untransformed, fresh tensors). ``__getitem__`` adds the cached weight map (with
    ``weight_map=``) and applies ``transform`` with the (seed, epoch, index) generator.

    ``weight_map``: None, or a dict of :func:`unet_weight_map` keywords (w0, sigma,
    class_balance, background; the ignore index is the dataset's). Each index's map is
    computed on the untransformed mask on first use and kept in memory (per process: every
    DataLoader worker builds its own), then transformed along with the mask.
    """

    num_classes: int
    ignore_index: int
    in_channels: int
    class_names: list

    def __init__(self, *, transform=None, seed: int = 0, weight_map: dict | None = None) -> None:
        where = type(self).__name__
        if transform is not None and not callable(transform):
            raise TypeError(f"{where}: transform must be None or callable as "
                            f"transform(sample, generator), got {type(transform).__name__}")
        self.transform = transform
        self.seed = _int_arg(where, "seed", seed)
        self.epoch = 0
        if weight_map is not None:
            if not isinstance(weight_map, dict):
                raise TypeError(f"{where}: weight_map must be None or a dict of unet_weight_map "
                                f"keywords {_WEIGHT_MAP_KEYS}, got {type(weight_map).__name__}")
            unknown = sorted(set(weight_map) - set(_WEIGHT_MAP_KEYS))
            if unknown:
                raise TypeError(f"{where}: weight_map has unknown keys {unknown}; allowed: "
                                f"{list(_WEIGHT_MAP_KEYS)} (the ignore index is the dataset's)")
            unet_weight_map(np.zeros((1, 1), np.int64), **weight_map)  # check the values now
            weight_map = dict(weight_map)
        self.weight_map = weight_map
        self._weights: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> dict:
        """The untransformed sample ``index`` (0 <= index < len): image, mask, name."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = _int_arg(type(self).__name__, "epoch", epoch)

    def __getitem__(self, index) -> dict:
        n = len(self)
        i = _int_arg(type(self).__name__, "index", index)
        if not -n <= i < n:
            raise IndexError(f"{type(self).__name__}: index {i} out of range for {n} samples")
        i %= n
        sample = self.load(i)
        if self.weight_map is not None:
            if i not in self._weights:
                self._weights[i] = unet_weight_map(sample["mask"], **self.weight_map,
                                                   ignore_index=self.ignore_index)
            sample["weight"] = self._weights[i].clone()  # the cache must stay untouched
        if self.transform is not None:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, i))
            sample = self.transform(sample, generator)
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(len={len(self)}, num_classes={self.num_classes}, "
                f"in_channels={self.in_channels}, ignore_index={self.ignore_index})")


# --- reading files ----------------------------------------------------------------------------

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_INTEGER_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_UNMAPPED = np.iinfo(np.int64).min  # a LUT entry for values the label_map lacks


def _scan(directory, what: str) -> dict[str, str]:
    """{stem: path} of the image files in ``directory``."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        state = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ValueError(f"{what} directory {directory!r} {state}")
    files: dict[str, str] = {}
    for name in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in files:
            raise ValueError(f"two {what} files share the stem {stem!r}: "
                             f"{files[stem]!r} and {os.path.join(directory, name)!r}")
        files[stem] = os.path.join(directory, name)
    if not files:
        raise ValueError(f"no {what} files ({', '.join(IMAGE_EXTENSIONS)}) in {directory!r}")
    return files


def _names(stems, limit: int = 5) -> str:
    stems = sorted(stems)
    more = f" and {len(stems) - limit} more" if len(stems) > limit else ""
    return ", ".join(repr(s) for s in stems[:limit]) + more


def _open(path: str, what: str, decode: bool):
    """A Pillow image (decoded with ``decode``, else only its header read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if not decode:
                return im.mode, im.size  # (W, H)
            im.load()  # the pixels stay in memory when the file is closed
            return im
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"cannot read {what} file {path!r}: {error}") from error


def _image_array(im, path: str) -> np.ndarray:
    """(C, H, W) float32 in [0, 1]."""
    mode = im.mode
    if mode in ("1", "L", "LA"):
        return np.asarray(im.convert("L"), np.float32)[None] / 255.0
    if mode.startswith("I"):  # 16-bit grayscale (Pillow may widen it to 32-bit "I")
        a = np.asarray(im).astype(np.float32)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"image file {path!r} (mode {mode}) has values in "
                             f"[{a.min():g}, {a.max():g}]: expected 8- or 16-bit data")
        return a[None] / 65535.0
    if mode == "F":
        a = np.asarray(im, np.float32)
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"float image file {path!r} has values in [{a.min():g}, "
                             f"{a.max():g}]: expected [0, 1]")
        return a[None].copy()
    # RGB, RGBA, palette, CMYK, YCbCr...: RGB
    return np.asarray(im.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0


# ITU-R BT.601 luma, as Pillow's RGB -> L conversion uses
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)[:, None, None]


def read_image(path, channels: int | None = None) -> torch.Tensor:
    """One image file (PNG, JPEG, TIFF... through Pillow) as a float32 (C, H, W) tensor in
    [0, 1], read as the datasets read their images: grayscale (8-bit, or 16-bit scaled by
    1/65535) gives C = 1, anything else RGB, C = 3. ``channels`` 1 or 3 converts to that many
    (RGB -> gray by BT.601 luma, gray -> RGB by repetition); None keeps the file's.
    Unreadable files raise ValueError naming the file."""
    if channels not in (None, 1, 3):
        raise ValueError(f"read_image: channels must be None, 1 or 3, got {channels!r}")
    path = os.fspath(path)
    image = _image_array(_open(path, "image", decode=True), path)
    if channels == 1 and image.shape[0] == 3:
        image = (image * _LUMA).sum(0, keepdims=True)
    elif channels == 3 and image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    return torch.from_numpy(np.ascontiguousarray(image, np.float32))


class SegmentationFolder(SegmentationDataset):
    """Images and masks in two directories, paired by file stem (``a.png`` with ``a.tif``...;
    PNG, JPEG and TIFF through Pillow), in sorted stem order (or the order of ``stems``).

    Images: grayscale (8-bit, 16-bit scaled by 1/65535) gives C = 1, anything else (RGB,
    RGBA, palette: converted to RGB) C = 3; ``in_channels`` must agree for all files.
    Masks: single-channel integer images (palette PNGs read as their indices). ``label_map``
    {mask value: class id} maps values (class id may be ``ignore_index``); values that are
    neither in it nor ``ignore_index`` are an error. For colour-coded masks use a map
    {(r, g, b): class id}: masks are then read as RGB and every colour must be in it.

    ``num_classes``: when given, class ids outside [0, num_classes) that are not
    ``ignore_index`` are an error (raised when the sample is loaded). When None it is the
    largest class id in the ``label_map``, or without one it is inferred as the largest mask
    value + 1, which reads and decodes every mask once at construction (about 2-5 ms per
    512x512 PNG); pass ``num_classes`` to skip that scan.

    ``stems``: only these files (a list of stems, in this order), e.g. for a split.

    Construction checks the directories, the pairing (in full, whatever ``stems``), every
    file's header (readable, image and mask sizes equal, channel counts equal); decoding
    errors (a truncated file) and bad mask values are raised when a sample is read. All
    errors are ``ValueError`` naming the file(s).

    A mask of values {0, 255} with ``ignore_index=255`` and no ``label_map`` makes every
    foreground pixel "ignore": a UserWarning says so (once per dataset).
    """

    def __init__(self, images, masks, *, num_classes: int | None = None,
                 label_map: dict | None = None, ignore_index: int = 255, transform=None,
                 seed: int = 0, weight_map: dict | None = None, class_names=None,
                 stems=None) -> None:
        super().__init__(transform=transform, seed=seed, weight_map=weight_map)
        self.ignore_index = _int_arg("SegmentationFolder", "ignore_index", ignore_index)
        image_files, mask_files = _scan(images, "image"), _scan(masks, "mask")
        self.images_dir, self.masks_dir = os.fspath(images), os.fspath(masks)
        for missing, have, other_dir, kind in (
                (set(image_files) - set(mask_files), "image", self.masks_dir, "a mask"),
                (set(mask_files) - set(image_files), "mask", self.images_dir, "an image")):
            if missing:
                raise ValueError(f"{len(missing)} {have} file(s) without {kind} of the same "
                                 f"stem in {other_dir!r}: {_names(missing)}")
        self.stems = self._select(stems, image_files)
        self.image_paths = [image_files[s] for s in self.stems]
        self.mask_paths = [mask_files[s] for s in self.stems]
        self._set_label_map(label_map)
        self._check_headers()
        self._warned_binary = False
        self._set_num_classes(num_classes)
        if class_names is None:
            class_names = [f"class_{c}" for c in range(self.num_classes)]
        self.class_names = [str(n) for n in class_names]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"SegmentationFolder: class_names has {len(self.class_names)} "
                             f"names for num_classes={self.num_classes}")

    @staticmethod
    def _select(stems, image_files: dict) -> list[str]:
        if stems is None:
            return sorted(image_files)
        if isinstance(stems, str) or not all(isinstance(s, str) for s in stems):
            raise TypeError(f"SegmentationFolder: stems must be a list of file stems (str), "
                            f"got {stems!r}")
        stems = list(stems)
        unknown = [s for s in stems if s not in image_files]
        if unknown:
            raise ValueError(f"SegmentationFolder: {len(unknown)} stem(s) not in the folders: "
                             f"{_names(unknown)}")
        if len(set(stems)) != len(stems):
            raise ValueError("SegmentationFolder: stems has duplicates")
        if not stems:
            raise ValueError("SegmentationFolder: stems is empty")
        return stems

    def _set_label_map(self, label_map) -> None:
        """Parse label_map into {raw value: class id}; colour keys become r << 16 | g << 8 | b."""
        self._colour = False
        self._table: dict[int, int] | None = None
        self._luts: dict = {}
        self.label_map = None
        if label_map is None:
            return
        if not isinstance(label_map, dict) or not label_map:
            raise TypeError(f"SegmentationFolder: label_map must be a non-empty dict "
                            f"{{mask value: class id}} or {{(r, g, b): class id}}, "
                            f"got {label_map!r}")
        self.label_map = dict(label_map)
        keys = list(label_map)
        self._colour = isinstance(keys[0], tuple)
        table = {}
        for key, value in label_map.items():
            value = _int_arg("SegmentationFolder", f"label_map[{key!r}]", value)
            if self._colour:
                if (not isinstance(key, tuple) or len(key) != 3
                        or not all(isinstance(c, int) and 0 <= c <= 255 for c in key)):
                    raise ValueError(f"SegmentationFolder: colour label_map keys must all be "
                                     f"(r, g, b) tuples of ints in [0, 255], got {key!r}")
                table[(key[0] << 16) | (key[1] << 8) | key[2]] = value
            else:
                key = _int_arg("SegmentationFolder", "label_map key (a mask value, or an "
                               "(r, g, b) tuple for every key)", key, minimum=0)
                table[key] = value
        self._table = table

    def _check_headers(self) -> None:
        first = None
        for image_path, mask_path in zip(self.image_paths, self.mask_paths):
            mode, size = _open(image_path, "image", decode=False)
            mask_mode, mask_size = _open(mask_path, "mask", decode=False)
            channels = 1 if mode in _GRAY_MODES else 3
            if first is None:
                first = (image_path, mode, channels)
            elif channels != first[2]:
                raise ValueError(f"image {image_path!r} (mode {mode}) has {channels} channel(s) "
                                 f"but the first image {first[0]!r} (mode {first[1]}) has "
                                 f"{first[2]}: all images must agree")
            if size != mask_size:
                raise ValueError(f"image {image_path!r} is {size[0]}x{size[1]} (WxH) but its "
                                 f"mask {mask_path!r} is {mask_size[0]}x{mask_size[1]}")
            if not self._colour and mask_mode not in _INTEGER_MASK_MODES:
                raise ValueError(f"mask {mask_path!r} has mode {mask_mode}: expected a "
                                 f"single-channel integer image (L, P, I;16, I, 1), or pass a "
                                 f"colour label_map {{(r, g, b): class id}} for RGB masks")
        self.in_channels = first[2]

    def _set_num_classes(self, num_classes) -> None:
        if num_classes is not None:
            self.num_classes = _int_arg("SegmentationFolder", "num_classes", num_classes, 1)
        elif self._table is not None:
            ids = [v for v in self._table.values() if v != self.ignore_index]
            if not ids or min(ids) < 0:
                raise ValueError(f"SegmentationFolder: label_map must map to class ids >= 0 "
                                 f"or ignore_index={self.ignore_index}, got {self.label_map}")
            self.num_classes = max(ids) + 1
        else:
            # Infer from the data: decode every mask once (see the class docstring).
            self.num_classes = None
            top = -1
            for path in self.mask_paths:
                labels = self._read_mask(path)
                labels = labels[labels != self.ignore_index]
                if labels.size:
                    top = max(top, int(labels.max()))
            if top < 0:
                raise ValueError(f"SegmentationFolder: every mask pixel in {self.masks_dir!r} is "
                                 f"ignore_index={self.ignore_index}; nothing to train on")
            self.num_classes = top + 1
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(f"SegmentationFolder: ignore_index={self.ignore_index} is a class "
                             f"id (num_classes={self.num_classes}); use a value outside "
                             f"[0, {self.num_classes})")
        if self._table is not None:
            bad = sorted(v for v in self._table.values()
                         if not (0 <= v < self.num_classes or v == self.ignore_index))
            if bad:
                raise ValueError(f"SegmentationFolder: label_map maps to {bad}, outside "
                                 f"[0, {self.num_classes}) and not ignore_index="
                                 f"{self.ignore_index}")

    def _map(self, raw: np.ndarray, path: str) -> np.ndarray:
        """Apply the label_map (a lookup table for 8/16-bit masks, else np.unique)."""
        passthrough = None if self._colour else self.ignore_index
        if raw.dtype in (np.uint8, np.uint16):
            lut = self._luts.get(raw.dtype)
            if lut is None:
                lut = np.full(np.iinfo(raw.dtype).max + 1, _UNMAPPED, np.int64)
                if passthrough is not None and 0 <= passthrough < len(lut):
                    lut[passthrough] = passthrough
                for key, value in self._table.items():
                    if key < len(lut):
                        lut[key] = value
                self._luts[raw.dtype] = lut
            out = lut[raw]
        else:
            values, inverse = np.unique(raw, return_inverse=True)
            mapped = np.array([self._table.get(int(v), v if v == passthrough else _UNMAPPED)
                               for v in values], np.int64)
            out = mapped[inverse.reshape(raw.shape)]
        unmapped = out == _UNMAPPED
        if unmapped.any():
            bad = np.unique(raw[unmapped])
            shown = ([tuple(int(c) for c in ((v >> 16) & 255, (v >> 8) & 255, v & 255))
                      for v in bad[:10]] if self._colour else bad[:10].tolist())
            raise ValueError(f"mask {path!r} has values not in label_map (nor ignore_index="
                             f"{self.ignore_index}): {shown}"
                             + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
        return out

    def _read_mask(self, path: str) -> np.ndarray:
        """The mask file as int64 (H, W) class ids, checked."""
        im = _open(path, "mask", decode=True)
        if self._colour:
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
            raw = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        else:
            if im.mode not in _INTEGER_MASK_MODES:
                raise ValueError(f"mask {path!r} has mode {im.mode}: expected a single-channel "
                                 f"integer image")
            raw = np.asarray(im)
            if raw.dtype == np.bool_:  # mode "1": classes 0 and 1
                raw = raw.astype(np.uint8)
            raw = raw.astype(raw.dtype.newbyteorder("="))  # big-endian I;16B -> native
        if self._table is not None:
            labels = self._map(raw, path)
        else:
            labels = raw.astype(np.int64)
            if self.ignore_index == 255 and not self._warned_binary and (labels == 255).any() \
                    and ((labels == 0) | (labels == 255)).all():
                self._warned_binary = True
                warnings.warn(
                    f"mask {path!r} holds only the values 0 and 255, and 255 is the ignore index "
                    f"(ignore_index=255): every 255 pixel would be ignored, so the model would "
                    f"train on nothing but class 0. For binary masks pass "
                    f"label_map={{0: 0, 255: 1}}.", UserWarning, stacklevel=4)
        if self.num_classes is not None:
            bad = ((labels < 0) | (labels >= self.num_classes)) & (labels != self.ignore_index)
        else:
            bad = (labels < 0) & (labels != self.ignore_index)
        if bad.any():
            values = np.unique(labels[bad])
            after = " (after label_map)" if self._table is not None else ""
            raise ValueError(f"mask {path!r} has class ids{after} outside [0, "
                             f"{self.num_classes if self.num_classes is not None else 'inf'}) "
                             f"that are not ignore_index={self.ignore_index}: "
                             f"{values[:10].tolist()}"
                             + (f" and {len(values) - 10} more" if len(values) > 10 else ""))
        return labels

    def __len__(self) -> int:
        return len(self.stems)

    def load(self, index: int) -> dict:
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        image = read_image(image_path)
        mask = self._read_mask(mask_path)
        if image.shape[1:] != mask.shape:
            raise ValueError(f"image {image_path!r} is {image.shape[1]}x{image.shape[2]} but "
                             f"its mask {mask_path!r} is {mask.shape[0]}x{mask.shape[1]} (HxW)")
        if image.shape[0] != self.in_channels:
            raise ValueError(f"image {image_path!r} has {image.shape[0]} channel(s), the "
                             f"dataset {self.in_channels}")
        return {"image": image, "mask": torch.from_numpy(np.ascontiguousarray(mask)),
                "name": self.stems[index]}


# --- presets ----------------------------------------------------------------------------------

def isbi2012_membrane(root, split: str = "train", *, train_count: int = 20,
                      **kw) -> SegmentationFolder:
    """ISBI 2012 EM membranes: ``root/images/NN.png`` and ``root/labels/NN.png`` (0 = membrane,
    255 = cell interior, mapped to classes 0 and 1). ``split``: "train" = the first
    ``train_count`` files in sorted order, "val" = the rest, "all" = every file. Other
    keywords (transform, seed, weight_map, ignore_index) go to :class:`SegmentationFolder`."""
    images, labels = os.path.join(root, "images"), os.path.join(root, "labels")
    stems = sorted(_scan(images, "image"))
    if split not in ("train", "val", "all"):
        raise ValueError(f"isbi2012_membrane: split must be 'train', 'val' or 'all', got {split!r}")
    if split != "all":
        train_count = _int_arg("isbi2012_membrane", "train_count", train_count, minimum=1)
        if train_count > len(stems) or (split == "val" and train_count == len(stems)):
            raise ValueError(f"isbi2012_membrane: train_count={train_count} leaves no "
                             f"{split} files of the {len(stems)} in {images!r}")
        stems = stems[:train_count] if split == "train" else stems[train_count:]
    return SegmentationFolder(images, labels, num_classes=2, label_map={0: 0, 255: 1},
                              class_names=list(ISBI2012_CLASS_NAMES), stems=stems, **kw)


def camvid(root, split: str = "train", **kw) -> SegmentationFolder:
    """CamVid, SegNet's 11-class version: ``root/<split>/*.png`` RGB images with
    ``root/<split>annot/*.png`` class ids 0..10; id 11 (void) becomes ``ignore_index``
    (default 255). ``split``: "train", "val" or "test". SegNet's median-frequency class
    weights are ``CAMVID_CLASS_WEIGHTS``. Other keywords (transform, seed, weight_map,
    ignore_index) go to :class:`SegmentationFolder`."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"camvid: split must be 'train', 'val' or 'test', got {split!r}")
    ignore_index = _int_arg("camvid", "ignore_index", kw.pop("ignore_index", 255))
    label_map = {c: c for c in range(len(CAMVID_CLASS_NAMES))}
    label_map[len(CAMVID_CLASS_NAMES)] = ignore_index
    return SegmentationFolder(os.path.join(root, split), os.path.join(root, split + "annot"),
                              num_classes=len(CAMVID_CLASS_NAMES), label_map=label_map,
                              ignore_index=ignore_index, class_names=list(CAMVID_CLASS_NAMES),
                              **kw)
