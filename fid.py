"""
Inception metrics (FID, sFID, IS, precision/recall) as the ADM evaluator computes them
(openai/guided-diffusion, evaluations/evaluator.py, TensorFlow, on the 2015 Inception graph), with
pytorch-fid's PyTorch port of that graph: the graph's own preprocessing, IS over chunks of 5000
samples, and precision/recall from float16 distance blocks.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz
    python fid.py samples_dir/ ref.npz --metrics fid,is --json --save-stats samples_stats.npz
"""
import argparse
import json
import os
import sys
import time
import zipfile

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
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")

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
        x = preprocess(images)
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


def build_inception(ckpt=None):
    # Weights come from --inception-ckpt or the torch hub cache; only the latter may download.
    if ckpt is None:
        ckpt = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))
        if not os.path.exists(ckpt):
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            try:
                torch.hub.download_url_to_file(WEIGHTS_URL, ckpt)
            except OSError as e:  # URLError and socket errors are OSErrors
                raise ValueError(f"could not download the Inception weights ({e}); fetch {WEIGHTS_URL} "
                                 "on a machine with network access and pass it with --inception-ckpt PATH.") from e
    elif not os.path.isfile(ckpt):
        raise ValueError(f"--inception-ckpt {ckpt} does not exist.")
    model = InceptionFID()
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), strict=True)
    return model.eval().requires_grad_(False)

#################################################################################
#                              Input loading                                    #
#################################################################################
# A side is a .npz (ADM images in arr_0 and/or precomputed statistics) or a folder of images.
# Images are streamed in batches: 50k samples at 256px would be ~10 GB in memory at once.

def _npz_images(path):
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = read_header[version](f)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        raise ValueError(f"{path}: arr_0 must be uint8 of shape (N, H, W, 3), got {dtype} {shape}.")
    if shape[0] < 2:
        raise ValueError(f"{path} holds {shape[0]} image(s); statistics need at least 2.")

    def read(batch_size):
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            read_header[np.lib.format.read_magic(f)](f)
            for i in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - i)
                yield np.frombuffer(f.read(n * int(np.prod(shape[1:]))), np.uint8).reshape(n, *shape[1:])
    return shape[0], read


def _folder_images(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
    if len(files) < 2:
        raise ValueError(f"{path} holds {len(files)} png/jpg/jpeg/webp image(s); statistics need at least 2.")
    sizes = {}
    for f in files:
        with Image.open(f) as im:  # reads the header only
            sizes.setdefault(im.size, f)
    if len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise ValueError(f"images in {path} differ in resolution: {f1} is {s1[0]}x{s1[1]}, {f2} is {s2[0]}x{s2[1]}.")

    def read(batch_size):
        for i in range(0, len(files), batch_size):
            yield np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[i:i + batch_size]])
    return len(files), read


def load_side(path):
    """-> (stats, images): precomputed arrays by name, and None or (count, read(batch_size) generator)."""
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist.")
    if os.path.isdir(path):
        return {}, _folder_images(path)
    if not path.endswith(".npz"):
        raise ValueError(f"{path} is neither a .npz file nor a folder of images.")
    with np.load(path) as f:
        stats = {k: f[k] for k in STAT_KEYS if k in f.files}
        has_images = "arr_0" in f.files
    if not stats and not has_images:
        raise ValueError(f"{path} has neither images (arr_0) nor statistics ({', '.join(STAT_KEYS)}).")
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean in stats) != (cov in stats):
            raise ValueError(f"{path} has {mean if mean in stats else cov} without {cov if mean in stats else mean}.")
    return stats, _npz_images(path) if has_images else None

#################################################################################
#                           Feature extraction                                  #
#################################################################################
# One Inception pass per side yields everything any metric needs; a side is only run through
# the network when its statistics file lacks something that was asked for.

@torch.inference_mode()
def extract_features(model, images, batch_size, device, name):
    count, read = images
    pools, spatials, logits, done = [], [], [], 0
    t0 = last = time.perf_counter()
    for batch in read(batch_size):
        for out, t in zip((pools, spatials, logits), model(torch.tensor(batch, device=device))):
            out.append(t.cpu().numpy())
        done += len(batch)
        if done == count or time.perf_counter() - last > 10:  # a line every 10 s keeps logs short
            last = time.perf_counter()
            print(f"{name}: {done}/{count} images, {done / (last - t0):.1f} images/s", file=sys.stderr, flush=True)
    return np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits)


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
    if images is None:
        raise ValueError(f"{path} has no images (arr_0) to compute {', '.join(missing)} from; statistics files "
                         "serve FID (mu, sigma), sFID (mu_s, sigma_s) and precision/recall (pool), IS needs images.")
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
        raise ValueError(f"statistics differ in dimension: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}.")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise both covariances
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding leaves a tiny imaginary part; a large one is a real failure
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has imaginary component {np.abs(covmean.imag).max():.3g}.")
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


def precision_recall(real_feats, fake_feats, k=3, device="cpu", chunk=10000):
    """Kynkaanniemi et al. 2019: precision = share of fakes inside some real k-NN ball, recall vice versa."""
    # chunk = ADM's row/column batch size, so that the float32 fallback covers the same blocks. As in
    # ADM's evaluate_pr, one block of real (rows) x fake (columns) distances serves both directions,
    # and a point inside a ball means distance <= radius.
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (real_feats, fake_feats))
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per side.")
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
#                                    CLI                                        #
#################################################################################
# Works out which statistics each side needs for the requested metrics, builds the network only
# if some side must be run through it, and prints one line per metric (or one JSON object).

NEEDS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s"), "pr": ("pool",), "is": ("probs",)}


def run(args):
    metrics = args.metrics.split(",")
    unknown = set(metrics) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from fid, sfid, is, pr.")
    model = None

    def get_features(images, path):
        nonlocal model
        if model is None:
            model = build_inception(args.inception_ckpt).to(args.device)
        return extract_features(model, images, args.batch_size, args.device, path)

    sample_need = [k for m in metrics for k in NEEDS[m]] + (list(STAT_KEYS) if args.save_stats else [])
    ref_need = [k for m in metrics if m != "is" for k in NEEDS[m]]  # IS looks at the samples only
    samples = resolve_side(args.samples, *load_side(args.samples), sample_need, get_features)
    ref = resolve_side(args.reference, *load_side(args.reference), ref_need, get_features)
    if args.save_stats:
        np.savez(args.save_stats, **{k: samples[k] for k in STAT_KEYS})

    return compute_metrics(metrics, samples, ref, args.device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FID, sFID, Inception Score and precision/recall (ADM evaluator definitions).")
    p.add_argument("samples", help="samples: .npz (arr_0 uint8 NHWC, or statistics) or a folder of images")
    p.add_argument("reference", help="reference: same formats, e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--metrics", default="fid,sfid,is,pr", help="comma list of fid, sfid, is, pr")
    p.add_argument("--inception-ckpt", default=None, help="local pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--save-stats", default=None, help="write the samples' mu, sigma, mu_s, sigma_s, pool here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of one line per metric")
    return p.parse_args(argv)


def main(args):
    torch.backends.cudnn.allow_tf32 = False  # the reference numbers come from float32 convolutions
    try:
        results = run(args)
    except ValueError as e:  # bad input: one sentence, no traceback
        print(f"fid.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(results) if args.json else "\n".join(f"{k}: {v:.4f}" for k, v in results.items()))


if __name__ == "__main__":
    main(parse_args())
