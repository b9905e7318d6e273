"""
Inception metrics (FID, sFID, IS, precision/recall) as the ADM evaluator computes them
(openai/guided-diffusion, evaluations/evaluator.py, TensorFlow, on the 2015 Inception graph), with
pytorch-fid's PyTorch port of that graph: the graph's own preprocessing, IS over chunks of 5000
samples, and precision/recall from float16 distance blocks.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz
    python fid.py samples_dir/ ref.npz --metrics fid,is --json --save-stats samples_stats.npz

Exit status 0 on success; 2 on bad input, reported as one line `fid.py: error: ...` on stderr.
"""
import argparse
import json
import os
import struct
import sys
import time
import tokenize
import warnings
import zipfile
import zlib

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux,
                                          InceptionB, InceptionC, InceptionD, InceptionE)

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool")
FEATURE_DIMS = {"mu": 2048, "sigma": 2048, "mu_s": 2023, "sigma_s": 2023, "pool": 2048}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


class InputError(ValueError):
    """Bad input the user can fix: reported as one line on stderr, exit status 2."""

#################################################################################
#                          FID Inception network                                #
#################################################################################
# torchvision's Inception3 with the blocks patched to compute what the TensorFlow graph computes.
# The state-dict layout is Inception3(num_classes=1008, aux_logits=False), as in pytorch-fid.

def _tf_avg_pool(x):
    # TensorFlow's 3x3 average pool ignores the zero padding at the borders.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionC(InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionE(InceptionE):
    max_pool = False  # the graph's last block (Mixed_7c) max-pools its pool branch

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


def _tf1_resize_matrix(n_in, n_out):
    """(n_out, n_in) weights of TF1's ResizeBilinear along one axis."""
    # The 2015 graph's ResizeBilinear predates half_pixel_centers: source = destination * (in / out), both
    # in float32, no half-pixel offset; the neighbours floor(source) and floor(source) + 1, the latter
    # clamped at the last row/column, weigh 1 - frac and frac.
    scale = float(np.float32(n_in) / np.float32(n_out))  # float32 division, as TF computes the scale
    src = torch.arange(n_out, dtype=torch.float32) * scale
    lo = src.floor().long()
    frac, rows = src - lo, torch.arange(n_out)
    m = torch.zeros(n_out, n_in)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, (lo + 1).clamp_max(n_in - 1)), frac, accumulate=True)  # clamped: both weigh the last row
    return m


def tf1_resize_bilinear(x, size):
    """(N, C, H, W) float -> (N, C, size, size) as TF1's ResizeBilinear, up to float32 rounding."""
    # Two small matmuls: about 2% of Inception's FLOPs at 256px, and fast on a GPU, unlike gathers.
    rows, cols = (_tf1_resize_matrix(n, size).to(x.device) for n in x.shape[2:])
    return rows @ x @ cols.T


def preprocess(images):
    """uint8 (N, H, W, 3) -> the graph's input: ResizeBilinear to 299x299 of [0, 255] floats, then (x - 128) / 128."""
    # pytorch-fid instead resizes with F.interpolate (half-pixel centres) and scales with 2x/255 - 1:
    # close, but not what the ADM evaluator's graph computes.
    return (tf1_resize_bilinear(images.permute(0, 3, 1, 2).float(), 299) - 128) / 128


class InceptionFID(Inception3):
    """uint8 NHWC images -> (pool features N x 2048, sFID spatial features N x 2023, logits N x 1008)."""

    def __init__(self):
        blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE, InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False, inception_blocks=blocks)
        self.Mixed_7c.max_pool = True

    def forward(self, images):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}.")
        # NHWC memory layout: oneDNN's convolutions run 1.5x faster in it on CPU (and cuDNN's prefer it).
        x = preprocess(images).contiguous(memory_format=torch.channels_last)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                     "Mixed_6b", "Mixed_6c", "Mixed_6d"):
            x = getattr(self, name)(x)
        # ADM's sFID tensor "mixed_6/conv" = TF block mixed_6 (TF numbers mixed, mixed_1..mixed_10 over
        # Mixed_5b..Mixed_7c, so mixed_6 is Mixed_6d) / its 1x1 branch after BN+ReLU = the first 192
        # channels of Mixed_6d's output. ADM keeps 7 channels and flattens NHWC, so must we, or the
        # features would not line up with the mu_s/sigma_s stored in ADM's reference batches.
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
        for name in ("Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(self, name)(x)
        pool = x.flatten(1)
        # IS uses the logits without the bias: the TF evaluators read "softmax/logits/MatMul",
        # which precedes the bias add (torch-fidelity's "logits_unbiased" does the same).
        return pool, spatial, pool @ self.fc.weight.T


def _download_weights():
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, path)
        except OSError as e:  # URLError and socket errors are OSErrors
            raise InputError(f"could not download the Inception weights ({e}); fetch {WEIGHTS_URL} "
                             "on a machine with network access and pass it with --inception-ckpt PATH.") from e
    return path


def build_inception(ckpt=None):
    # Weights come from --inception-ckpt or the torch hub cache; only the latter may download.
    if ckpt is not None and not os.path.isfile(ckpt):
        raise InputError(f"--inception-ckpt {ckpt} does not exist.")
    path = ckpt or _download_weights()
    return _inception_from_state(_load_weights(path, cached=ckpt is None), path)


def _load_weights(path, cached=False):
    """torch.load(path) of the Inception weights, or one InputError sentence on a file it cannot read."""
    fix = "pass pt_inception-2015-12-05-6726825d.pth with --inception-ckpt."
    what = f"the cached Inception weights {path} are" if cached else f"{path} is"
    if cached:
        fix = f"delete it to download it again, or {fix}"
    try:
        # Warnings would be extra stderr lines: random bytes opening with a pickle PROTO opcode make torch warn
        # about the protocol before failing; the strict key check of _inception_from_state decides, not them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # the file exists (checked) but cannot be opened or read: not a damaged file
        raise InputError(f"{what} not readable ({e.strerror or e}); {fix}") from e
    except Exception as e:
        # A damaged or foreign file makes torch's weights-only unpickler raise nearly anything: UnpicklingError,
        # EOFError, IndexError (pop from empty list), KeyError (a memo miss), UnicodeDecodeError, struct.error,
        # TypeError, ValueError, RuntimeError (a cut zip archive, a wrong magic number). Only the type goes into
        # the sentence: torch's UnpicklingError text advises weights_only=False, wrong for a corrupt file.
        kind = type(e).__name__ if type(e).__module__ in ("builtins", "_pickle", "pickle") else \
            f"{type(e).__module__}.{type(e).__name__}"
        raise InputError(f"{what} not a readable PyTorch checkpoint ({kind}): the file is corrupt or not a "
                         f"checkpoint; {fix}") from e


def _inception_from_state(state, path):
    model = InceptionFID()
    expected = model.state_dict()
    got = state if isinstance(state, dict) else {}
    wrong = [k for k in expected if k not in got or getattr(got[k], "shape", None) != expected[k].shape]
    wrong += [k for k in got if k not in expected]
    if wrong:
        raise InputError(f"{path} does not hold the pytorch-fid Inception weights ({len(wrong)} keys missing, "
                         f"unexpected or of another shape, e.g. {wrong[0]}); pass them with --inception-ckpt.")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)

#################################################################################
#                              Input loading                                    #
#################################################################################
# A side is a .npz (ADM images in arr_0 and/or precomputed statistics) or a folder of images. Everything
# that can be checked from headers is checked here, before any Inception pass. Images reach the network
# in batches from DataLoader workers (50k samples at 256px would be ~10 GB in memory at once), so that
# PNG decoding and .npz reading run in parallel with the network instead of starving a GPU.

ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError)  # a bad CRC, bad deflate data, a cut compressed stream


def _npz_headers(path):
    """{member: (shape, dtype, fortran order, data offset in the member, in the file if stored uncompressed)}."""
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not a valid .npz file (not a zip archive); write it with numpy.savez.")
    headers = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with zf.open(info) as f:
                try:
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
                    shape, fortran, dtype = read_header(f)
                except (ValueError, KeyError, tokenize.TokenError, *ZIP_DAMAGE) as e:  # bad magic, version or dict
                    raise InputError(f"{path} is not a valid .npz file: {info.filename} is not a .npy array ({e}).") \
                        from e
                name, offset = info.filename.removesuffix(".npy"), f.tell()
            if dtype.hasobject:  # np.load would need allow_pickle, which can run arbitrary code
                raise InputError(f"{path}: {name} holds Python objects; fid.py only reads numeric arrays.")
            if info.file_size != offset + int(np.prod(shape)) * dtype.itemsize:
                raise InputError(f"{path}: {name} is truncated or padded ({info.file_size} bytes for {shape}).")
            start = None
            if info.compress_type == zipfile.ZIP_STORED:  # np.savez: raw bytes after the member's local header
                with open(path, "rb") as raw:
                    raw.seek(info.header_offset)
                    name_len, extra_len = struct.unpack("<HH", raw.read(30)[26:])  # the header's last 4 of 30 bytes
                start = info.header_offset + 30 + name_len + extra_len + offset
            headers[name] = (shape, dtype, fortran, offset, start)
    return headers


class _NpzArray(torch.utils.data.Dataset):
    """arr_0 of an uncompressed .npz, memory-mapped: random access, so every worker can read its share."""

    def __init__(self, path, start, shape):
        self.path, self.start, self.shape, self.array = path, start, shape, None

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        if self.array is None:  # mapped in each worker: a memmap sent to a worker would be pickled whole
            self.array = np.memmap(self.path, np.uint8, "r", offset=self.start, shape=self.shape)
        return np.array(self.array[i]), ""


class _NpzStream(torch.utils.data.IterableDataset):
    """arr_0 of a compressed .npz, decompressed in one stream, batch by batch."""

    def __init__(self, path, shape, offset, batch_size):
        self.path, self.shape, self.offset, self.batch_size = path, shape, offset, batch_size

    def __iter__(self):
        size = int(np.prod(self.shape[1:]))
        try:  # damage past the header shows only here; handed back as text, as _FolderImages does
            with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
                f.read(self.offset)  # skip the .npy header
                for i in range(0, self.shape[0], self.batch_size):
                    n = min(self.batch_size, self.shape[0] - i)
                    yield torch.frombuffer(bytearray(f.read(n * size)), dtype=torch.uint8).view(n, *self.shape[1:]), ""
        except ZIP_DAMAGE as e:
            yield None, f"{self.path} is damaged past its header ({e}); regenerate it."


def _npz_images(path, headers):
    shape, dtype, fortran, offset, start = headers["arr_0"]
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        order = " in Fortran order; save it as np.ascontiguousarray(arr_0)" if fortran else ""
        raise InputError(f"{path}: arr_0 must be uint8 images of shape (N, H, W, 3), got {dtype} {shape}{order}.")
    if shape[0] < 1:
        raise InputError(f"{path} holds no images in arr_0.")

    def read(batch_size, workers=0, pin_memory=False):
        if start is not None:  # np.savez (sample.py, ADM's batches): all workers copy images out of the map
            loader = torch.utils.data.DataLoader(_NpzArray(path, start, shape), batch_size=batch_size,
                                                 num_workers=workers, collate_fn=_collate, pin_memory=pin_memory)
        else:  # np.savez_compressed: decompression is sequential, one worker overlaps it with the network
            loader = torch.utils.data.DataLoader(_NpzStream(path, shape, offset, batch_size), batch_size=None,
                                                 num_workers=min(workers, 1), pin_memory=pin_memory)
        yield from _batches(loader)
    return shape[0], read


class _FolderImages(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        # A decoding error is handed back as text: raised inside a worker, it would reach the user
        # wrapped in the worker's traceback instead of as one sentence naming the file.
        try:
            with Image.open(self.files[i]) as im:
                return np.array(im.convert("RGB")), ""  # a writable copy, as torch.from_numpy wants
        except (OSError, SyntaxError) as e:  # PIL's errors for truncated or damaged image data
            return None, f"{self.files[i]} cannot be decoded ({e}); delete or regenerate it."


def _collate(items):
    errors = [e for _, e in items if e]
    if errors:
        return None, errors[0]
    # default_collate stacks straight into shared memory inside a worker: one copy fewer on the way out
    return torch.utils.data.default_collate([torch.from_numpy(im) for im, _ in items]), ""


def _batches(loader):
    for batch, error in loader:
        if error:
            raise InputError(error)
        yield batch


def _folder_images(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise InputError(f"{path} holds no png/jpg/jpeg/webp images.")
    sizes = {}
    for f in files:
        try:
            with Image.open(f) as im:  # reads the header only: cheap enough for every file
                sizes.setdefault(im.size, f)
        except OSError as e:  # PIL.UnidentifiedImageError and unreadable files
            raise InputError(f"{f} is not a readable image ({e}); delete or regenerate it.") from e
    if len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise InputError(f"images in {path} differ in resolution: {f1} is {s1[0]}x{s1[1]}, {f2} is {s2[0]}x{s2[1]}.")

    def read(batch_size, workers=0, pin_memory=False):
        yield from _batches(torch.utils.data.DataLoader(_FolderImages(files), batch_size=batch_size,
                                                        num_workers=workers, collate_fn=_collate,
                                                        pin_memory=pin_memory))
    return len(files), read


def _check_stats(path, headers):
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean in headers) != (cov in headers):
            have, lack = (mean, cov) if mean in headers else (cov, mean)
            raise InputError(f"{path} has {have} without {lack}.")
        if mean in headers:
            (s, dm, *_), (c, dc, *_) = headers[mean], headers[cov]
            if len(s) != 1 or c != (s[0], s[0]) or dm.kind != "f" or dc.kind != "f":
                raise InputError(f"{path}: {mean} must be a float vector (d,) and {cov} a float matrix (d, d), "
                                 f"got {dm} {s} and {dc} {c}.")
    if "pool" in headers and (len(headers["pool"][0]) != 2 or headers["pool"][1].kind != "f"):
        raise InputError(f"{path}: pool must be float features of shape (N, d), got {headers['pool'][1]} "
                         f"{headers['pool'][0]}.")


def load_side(path):
    """-> (stats, images): precomputed arrays by name, and None or (count, read(batch_size, workers, pin))."""
    if not os.path.exists(path):
        raise InputError(f"{path} does not exist.")
    if os.path.isdir(path):
        return {}, _folder_images(path)
    if not path.endswith(".npz"):
        raise InputError(f"{path} is neither a .npz file nor a folder of images.")
    try:  # zipfile's own errors on a damaged directory, member header or member data
        headers = _npz_headers(path)
        if "arr_0" not in headers and not any(k in headers for k in STAT_KEYS):
            raise InputError(f"{path} has neither images (arr_0) nor statistics ({', '.join(STAT_KEYS)}).")
        _check_stats(path, headers)
        with np.load(path, allow_pickle=False) as f:
            stats = {k: f[k] for k in STAT_KEYS if k in headers}
    except (*ZIP_DAMAGE, NotImplementedError) as e:
        raise InputError(f"{path} is a damaged .npz file ({type(e).__name__}: {e}); regenerate it.") from e
    return stats, _npz_images(path, headers) if "arr_0" in headers else None

#################################################################################
#                           Feature extraction                                  #
#################################################################################
# One Inception pass per side yields everything any metric needs; a side is only run through
# the network when its statistics file lacks something that was asked for.

@torch.inference_mode()
def extract_features(model, images, batch_size, device, name, workers=0):
    count, read = images
    device = torch.device(device)
    feats, done = ([], [], []), 0
    t0 = last = time.perf_counter()
    for batch in read(batch_size, workers, pin_memory=device.type == "cuda"):
        # Pinned batches copy asynchronously; features stay on the device until the end, so the loop
        # never waits for the GPU and the workers keep decoding.
        for out, t in zip(feats, model(batch.to(device, non_blocking=True))):
            out.append(t)
        done += len(batch)
        if done == count or time.perf_counter() - last > 10:  # a line every 10 s keeps logs short
            last = time.perf_counter()
            print(f"{name}: {done}/{count} images, {done / (last - t0):.1f} images/s", file=sys.stderr, flush=True)
    return tuple(torch.cat(f).cpu().numpy() for f in feats)


def derive_statistics(pool, spatial, logits, keys):
    """The statistics named in keys, from Inception features: mean/covariance, raw pool features, softmax."""
    # float64 means and softmax where ADM has float32 ones: FID and IS move by ~1e-6 relative at most.
    derive = {"mu": lambda: pool.mean(0, dtype=np.float64), "sigma": lambda: np.cov(pool, rowvar=False),
              "mu_s": lambda: spatial.mean(0, dtype=np.float64), "sigma_s": lambda: np.cov(spatial, rowvar=False),
              "pool": lambda: pool, "probs": lambda: scipy.special.softmax(logits.astype(np.float64), axis=1)}
    return {k: derive[k]() for k in dict.fromkeys(keys)}


def resolve_side(path, stats, images, need, get_features):
    # Precomputed statistics win (ADM's reference mu/sigma); the rest comes from the images.
    missing = [k for k in dict.fromkeys(need) if k not in stats]
    if not missing:
        return stats
    return {**stats, **derive_statistics(*get_features(images, path), missing)}

#################################################################################
#                                 Metrics                                       #
#################################################################################
# FID/sFID, IS and k-NN precision/recall as the ADM evaluator computes them: Frechet distance and IS
# in float64, pairwise distances in float16 blocks of 10000 x 10000 (torch, on the chosen device).

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), in float64."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(f"statistics differ in dimension: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}.")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise both covariances
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding leaves a tiny imaginary part; a large one is a real failure
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise InputError(f"sqrtm(sigma1 sigma2) has imaginary component {np.abs(covmean.imag).max():.3g}: "
                             "the covariances are rank-deficient (computed from no more samples than dimensions?).")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, split_size=5000):
    """Mean over consecutive chunks of split_size samples of exp(E_x KL(p(y|x) || p(y)))."""
    # ADM's compute_inception_score(split_size=5000): chunks of 5000 in sample order, the last one
    # shorter, so 10 equal splits only at N = 50,000. rel_entr makes 0*log(0) = 0 (ADM, in float32,
    # would give nan if a probability underflowed to 0).
    probs = np.asarray(probs, dtype=np.float64)
    scores = [np.exp(scipy.special.rel_entr(part, part.mean(0, keepdims=True)).sum(1).mean())
              for part in (probs[i:i + split_size] for i in range(0, len(probs), split_size))]
    return float(np.mean(scores))


def _to_fp16_(t):
    # Round in place to the nearest float16 and keep computing in float32: float32 has more than
    # 2 * 11 + 2 bits, so one float32 operation then this rounding equals the float16 operation.
    return t.copy_(t.half())


def _distance_block(u, v):
    """Squared distances of rows of u to rows of v as ADM's DistanceBlock computes them."""
    # ADM casts the features to float16 and computes max(|u|^2 - 2 u.v + |v|^2, 0) in float16, every
    # operation rounded to float16 (the matmul accumulates in float32 on a GPU; TF's float16 reduce_sum
    # accumulates in float16 in CUB's order, which cannot be reproduced exactly: we accumulate in float32).
    # If any entry of the block is not finite, ADM recomputes the whole block in float32.
    u16, v16 = _to_fp16_(u.clone()), _to_fp16_(v.clone())
    norm_u = _to_fp16_(_to_fp16_(u16.square()).sum(1, keepdim=True))
    norm_v = _to_fp16_(_to_fp16_(v16.square()).sum(1))
    d = _to_fp16_(u16 @ v16.T)
    d = _to_fp16_(_to_fp16_(_to_fp16_(d.mul_(-2)).add_(norm_u)).add_(norm_v)).clamp_min_(0)  # -2uv overflows as ADM's
    if torch.isfinite(d).all():
        return d
    return (u.square().sum(1, keepdim=True) - 2 * u @ v.T + v.square().sum(1)).clamp_min_(0)


def _knn_radii(x, k, chunk):
    # ADM's radius is the (k+1)-th smallest distance of a row including the one to itself (index k of
    # the partition), taken from the float16 blocks; keeping each block's k+1 smallest bounds memory.
    radii = []
    for i in range(0, len(x), chunk):
        best = []
        for j in range(0, len(x), chunk):
            d = _distance_block(x[i:i + chunk], x[j:j + chunk])
            best.append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
        radii.append(torch.cat(best, 1).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


K = 3  # ADM's nhood_sizes=(3,)


def precision_recall(real_feats, fake_feats, k=K, device="cpu", chunk=10000):
    """Kynkaanniemi et al. 2019: precision = share of fakes inside some real k-NN ball, recall vice versa."""
    # chunk = ADM's row/column batch size, so that the float32 fallback covers the same blocks. As in
    # ADM's evaluate_pr, one block of real (rows) x fake (columns) distances serves both directions,
    # and a point inside a ball means distance <= radius.
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (real_feats, fake_feats))
    if min(len(real), len(fake)) <= k:
        raise InputError(f"precision/recall with k={k} needs more than {k} samples per side.")
    r_real, r_fake = _knn_radii(real, k, chunk), _knn_radii(fake, k, chunk)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    for i in range(0, len(real), chunk):
        for j in range(0, len(fake), chunk):
            d = _distance_block(real[i:i + chunk], fake[j:j + chunk])
            real_in[i:i + chunk] |= (d <= r_fake[j:j + chunk]).any(1)
            fake_in[j:j + chunk] |= (d <= r_real[i:i + chunk, None]).any(0)
    return fake_in.double().mean().item(), real_in.double().mean().item()


def compute_metrics(metrics, samples, ref, device="cpu"):
    """Results by display name from the two sides' statistics (as derive_statistics or a .npz gives them)."""
    results = {}
    if "fid" in metrics:
        results["FID"] = frechet_distance(samples["mu"], samples["sigma"], ref["mu"], ref["sigma"])
    if "sfid" in metrics:
        results["sFID"] = frechet_distance(samples["mu_s"], samples["sigma_s"], ref["mu_s"], ref["sigma_s"])
    if "is" in metrics:
        results["IS"] = inception_score(samples["probs"])
    if "pr" in metrics:
        results["Precision"], results["Recall"] = precision_recall(ref["pool"], samples["pool"], device=device)
    return results

#################################################################################
#                       Sample counts, decided up front                         #
#################################################################################
# A covariance of N samples has rank at most N - 1: FID's 2048 x 2048 covariance is full rank only
# with N > 2048, sFID's 2023 x 2023 one only with N > 2023; with fewer, sqrtm(sigma1 sigma2) fails or
# is meaningless. Precision/recall needs the k = 3 nearest neighbours besides the sample itself, IS
# one sample. Precomputed mu/sigma (ADM's reference batches) are taken as they are.

NEEDS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s"), "is": ("probs",), "pr": ("pool",)}
MIN_SAMPLES = {"fid": 2048 + 1, "sfid": 2023 + 1, "is": 1, "pr": K + 1}
REQUIRES = {"fid": "FID needs more than 2048 samples per side (N samples give a covariance of rank N-1 at most)",
            "sfid": "sFID needs more than 2023 samples per side (2023-d spatial features)",
            "is": "IS needs at least 1 sample image",
            "pr": f"precision/recall needs more than {K} samples per side (k={K} neighbours besides the sample)"}
NAMES = {"fid": "FID", "sfid": "sFID", "is": "IS", "pr": "precision/recall"}


def _shortfall(metric, path, stats, images):
    """None if this side can serve the metric, else why not."""
    key = NEEDS[metric][0]
    if key in stats and key != "pool":
        return None
    if key == "pool" and "pool" in stats:
        n, what = len(stats["pool"]), "pool features"
    elif images is None:
        lacks = "" if metric == "is" else f" and no {'/'.join(NEEDS[metric])}"
        return f"{REQUIRES[metric]}, {path} has no images{lacks}"
    else:
        n, what = images[0], "images"
    return None if n >= MIN_SAMPLES[metric] else f"{REQUIRES[metric]}, {path} has {n} {what}"


def _why_not(metric, sides):
    """None if both sides (the samples alone, for IS) can serve the metric, else why not."""
    return next((r for r in (_shortfall(metric, *s) for s in (sides[:1] if metric == "is" else sides)) if r), None)


def choose_metrics(requested, sides):
    """-> (metrics to compute, a note on those left out or None); requested None = all that the inputs allow."""
    why = {m: _why_not(m, sides) for m in NEEDS}
    allowed = [m for m in NEEDS if why[m] is None]
    refused = [m for m in requested or NEEDS if why[m]]
    if requested and refused or not allowed:
        hint = f"these inputs allow --metrics {','.join(allowed)}" if allowed else "these inputs allow no metric"
        raise InputError(f"{'; '.join(why[m] for m in refused)}; {hint}.")
    chosen = [m for m in requested or NEEDS if m in allowed]
    note = (f"fid.py: skipping {', '.join(NAMES[m] for m in refused)}: {'; '.join(why[m] for m in refused)}. "
            f"Computing {', '.join(NAMES[m] for m in chosen)}." if refused else None)
    return chosen, note


def check_dimensions(metrics, sides):
    # Statistics from a file must match what the other side gives (its file or the Inception features).
    for m in (m for m in metrics if m != "is"):
        key = NEEDS[m][0]
        dims = [(path, stats[key].shape[-1] if key in stats else FEATURE_DIMS[key]) for path, stats, _ in sides]
        if dims[0][1] != dims[1][1]:
            raise InputError(f"{NAMES[m]}: {dims[0][0]} gives {dims[0][1]}-d {key}, {dims[1][0]} {dims[1][1]}-d; "
                             "both sides must come from the same Inception features.")

#################################################################################
#                                    CLI                                        #
#################################################################################
# Everything that can be checked (flags, files, sample counts, dimensions, the Inception checkpoint)
# is checked before the first Inception pass; then one line per metric (or one JSON object).

def _save_keys(save_stats, side):
    """-> (statistics --save-stats writes, a note on those it leaves out or None)."""
    if save_stats is None:
        return [], None
    path, _, images = side
    if images is None:
        raise InputError(f"--save-stats writes statistics computed from images, and {path} has none.")
    if not save_stats.endswith(".npz") or not os.path.isdir(os.path.dirname(os.path.abspath(save_stats))):
        raise InputError(f"--save-stats {save_stats} must be a .npz path in an existing folder.")
    # A rank-deficient covariance saved here would later pass as precomputed reference statistics.
    keys = [k for m in ("fid", "sfid") if _shortfall(m, *side) is None for k in NEEDS[m]] + ["pool"]
    left = [k for k in STAT_KEYS if k not in keys]
    return keys, (f"fid.py: --save-stats left out {', '.join(left)}: {images[0]} samples give rank-deficient "
                  "covariances." if left else None)


def run(args):
    sides = [(path, *load_side(path)) for path in (args.samples, args.reference)]
    metrics, note = choose_metrics(args.metrics, sides)
    check_dimensions(metrics, sides)
    save_keys, save_note = _save_keys(args.save_stats, sides[0])
    needs = ([k for m in metrics for k in NEEDS[m]] + save_keys,
             [k for m in metrics if m != "is" for k in NEEDS[m]])  # IS looks at the samples only
    model = None
    if any(k not in stats for (_, stats, _), need in zip(sides, needs) for k in need):
        model = build_inception(args.inception_ckpt).to(args.device)
    if note:
        print(note, file=sys.stderr, flush=True)
    workers = args.workers
    if workers is None:  # workers keep a GPU fed; on CPU the network takes ~100x longer than decoding a PNG,
        # so decoding in the main process costs ~1% and workers would only take cores from the network
        workers = min(8, os.cpu_count() or 1) if torch.device(args.device).type == "cuda" else 0

    def get_features(images, path):
        return extract_features(model, images, args.batch_size, args.device, path, workers)
    samples, ref = [resolve_side(*side, need, get_features) for side, need in zip(sides, needs)]
    results = compute_metrics(metrics, samples, ref, args.device)
    if args.save_stats:  # only once everything succeeded: a failed run leaves nothing behind
        with open(args.save_stats, "wb") as f:
            np.savez(f, **{k: samples[k] for k in save_keys})
        if save_note:
            print(save_note, file=sys.stderr)
    return results


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, like every other bad-input error of fid.py, instead of argparse's usage dump.
        self.exit(2, f"fid.py: error: {message} (see fid.py --help)\n")


def _count(minimum):
    def count(text):
        n = int(text)  # a ValueError becomes argparse's "invalid count value"
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n
    return count


def _metric_list(text):
    names = list(dict.fromkeys(m.strip() for m in text.split(",")))
    unknown = [m for m in names if m not in NEEDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {', '.join(unknown)}; choose from fid, sfid, is, pr")
    return names


def _device(text):
    try:
        device = torch.device(text)
    except RuntimeError as e:  # torch's error for an unknown device string
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine; use --device cpu")
    return text


def parse_args(argv=None):
    p = _Parser(prog="fid.py", allow_abbrev=False,  # --inception is not --inception-ckpt, as in repae.py, sample.py
                description="FID, sFID, Inception Score and precision/recall as the ADM evaluator computes them.")
    p.add_argument("samples", help="samples: .npz (arr_0 uint8 NHWC, or statistics) or a folder of images")
    p.add_argument("reference", help="reference: same formats, e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--metrics", type=_metric_list, default=None,
                   help="comma list of fid, sfid, is, pr (default: all that the sample counts allow)")
    p.add_argument("--inception-ckpt", default=None, help="local pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=_count(1), default=200, help="images per Inception batch")
    p.add_argument("--workers", type=_count(0), default=None,
                   help="DataLoader processes reading images (default: 8 or the CPU count with CUDA, 0 on CPU)")
    p.add_argument("--save-stats", default=None, help="write the samples' mu, sigma, mu_s, sigma_s, pool here (.npz)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of one line per metric")
    return p.parse_args(argv)


def main(args):
    # The reference numbers come from float32 convolutions and matmuls: no TF32 on GPUs that have it.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        results = run(args)
    except InputError as e:  # bad input: one sentence, no traceback
        print(f"fid.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(results) if args.json else "\n".join(f"{k}: {v:.4f}" for k, v in results.items()))


if __name__ == "__main__":
    main(parse_args())
