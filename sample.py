"""
Sampling from a REPA-E (or frozen-VAE) SiT: Euler ODE / Euler-Maruyama SDE with interval CFG, written as
PNGs 000000.png... and one ADM-format .npz (arr_0: (N, H, W, 3) uint8) for fid.py and the ADM suite.
The tuned VAE as a product: its reconstructions of a data set (the rFID pair and PSNR), and its export.

  torchrun --nproc_per_node=8 sample.py --ckpt exps/run/checkpoints/0400000.pt --num-fid-samples 50000 \
      --mode sde --num-steps 250 --cfg-scale 2.2 --guidance-low 0 --guidance-high 0.65
  python sample.py --ckpt ... --class-labels 1,207,360 --grid       # one PNG grid for a figure
  torchrun --nproc_per_node=8 sample.py --reconstruct --data-dir /imagenet/val --ckpt ...   # or --vae-ckpt
  python sample.py --export-vae exps/run/checkpoints/0400000.pt     # released .pt files and a diffusers folder
"""
import argparse
import json
import math
import os
import re
import shutil
import time
import zipfile

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torchvision
from PIL import Image

import repae
from repae import euler_sampler, fail, guided


#################################################################################
#                  Samplers: time runs from t = 1 (noise) to t = 0 (data)        #
#################################################################################
# The SiT predicts a velocity v(x_t, t, y). Classifier-free guidance mixes the conditional and the
# null-label (index num_classes) predictions, only for guidance_low <= t <= guidance_high.

def score_from_velocity(v, x, t):
    """Score of x_t from the predicted velocity on the linear path (alpha = 1 - t, sigma = t):
    ((1-t)/(-1) * v - x) / (t^2 - ((1-t)/(-1)) * t)."""
    ratio = (1 - t) / -1
    return (ratio * v - x) / (t ** 2 - ratio * t)


def per_sample_randn(generators, like):
    """N(0, I) like `like`, row i from generators[i]: a sample's noise does not depend on its batch."""
    return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in generators]).to(like.device)


@torch.no_grad()
def euler_maruyama_sampler(model, noise, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                           generators=None):
    """Euler-Maruyama on linspace(1, 0.04, N) then 0, diffusion w(t) = 2t, drift v - w/2 * score;
    the last step to 0 takes the mean (no noise). Noise is drawn before each model call, in float64,
    with randn_like as the reference, or from one CPU generator per sample when `generators` is given."""
    f64 = torch.float64
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=f64), torch.zeros(1, dtype=f64)])
    x = noise.to(torch.float64)
    cfg = dict(cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1].tolist(), t_steps[1:].tolist())):
        dt, w = t_next - t_cur, 2.0 * t_cur
        last = i == len(t_steps) - 2
        eps = None if last else torch.randn_like(x) if generators is None else per_sample_randn(generators, x)
        deps = None if last else eps * abs(dt) ** 0.5
        drift = guided(model, x, t_cur, y, **cfg,
                       fn=lambda v, x_in, t: v - 0.5 * w * score_from_velocity(v, x_in, t))
        x = x + drift * dt if last else x + drift * dt + w ** 0.5 * deps
    return x


#################################################################################
#                       Checkpoints: EMA SiT, VAE, latent statistics             #
#################################################################################
# One loader for this project's checkpoints, released REPA-E ones (ema + tuned vae + args) and
# frozen-VAE ones (no vae key: --vae-ckpt or the run's vae_ckpt). Always the EMA weights.

MODEL_FLAGS = ("model", "vae", "resolution", "num_classes", "encoder_depth")


def run_config(ckpt, args):
    """The run's settings: repae.py's defaults < the checkpoint's args (official ones lack e.g. `smoke`) < the
    flags given."""
    cfg = vars(repae.parse_args([], check=False))
    cfg.update(vars(ckpt["args"]) if isinstance(ckpt.get("args"), argparse.Namespace) else {})
    return argparse.Namespace(**{**cfg, **{k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}})


def load_checkpoint(args):
    """(checkpoint, run config) of --ckpt."""
    ckpt = repae.load_file(args.ckpt, "--ckpt", mmap=True)     # only the EMA SiT and the VAE are read
    if not isinstance(ckpt, dict) or "ema" not in ckpt:
        fail(f"'{args.ckpt}' has no 'ema' weights, so it is not a SiT training checkpoint; pass one saved by "
             f"repae.py or a released REPA-E checkpoint with --ckpt")
    if getattr(ckpt.get("args"), "path_type", "linear") != "linear":      # the released --path-type cosine
        fail(f"'{args.ckpt}' was trained on the {ckpt['args'].path_type} path; these samplers follow the linear one")
    return ckpt, run_config(ckpt, args)


def run_vae(ckpt, cfg, args):
    """(VAE, where its weights came from): --vae-ckpt (a released .pt, a diffusers folder or its .safetensors), else
    the checkpoint's `vae`, else the VAE file of a frozen-VAE run (its args' vae_ckpt)."""
    vae = repae.build_vae(cfg)
    if args.vae_ckpt:
        (state, _), vae_from = repae.read_vae(args.vae_ckpt, vae, "--vae-ckpt"), args.vae_ckpt
    elif "vae" in ckpt:
        state, vae_from = ckpt["vae"], f"'{args.ckpt}'"
    elif cfg.vae_ckpt and os.path.exists(cfg.vae_ckpt):
        (state, _), vae_from = repae.read_vae(cfg.vae_ckpt, vae, "--vae-ckpt"), cfg.vae_ckpt
    else:
        fail(f"'{args.ckpt}' holds no VAE (a frozen-VAE run) and its VAE checkpoint '{cfg.vae_ckpt}' does not "
             f"exist; pass the VAE weights with --vae-ckpt")
    repae.load_state(vae, state, f"the VAE from {vae_from}", "--vae-ckpt/--vae")
    return vae.eval(), vae_from


def load_models(args, device, log):
    """(EMA SiT, VAE, latents scale, latents bias, run config); decode with z = z_n / scale + bias."""
    ckpt, cfg = load_checkpoint(args)
    # projector widths from the weights themselves, so the strict load needs no DINOv2
    ema = ckpt["ema"]
    n_proj = len({k.split(".")[1] for k in ema if k.startswith("projectors.")})
    z_dims = [ema[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)]
    vae, vae_from = run_vae(ckpt, cfg, args)
    model = repae.build_sit(cfg, z_dims, vae)
    repae.load_state(model, ema, f"the EMA SiT in '{args.ckpt}'", "--ckpt and --model/--vae/--resolution")
    # The EMA BN buffers are the latent statistics the SiT was trained with (initialised from the
    # VAE's file, then tracked); --latents-stats is for checkpoints that normalised with a fixed file.
    scale, bias = repae.load_latent_stats(args.latents_stats, vae.z_channels) if args.latents_stats else \
        model.latent_stats()
    log(f"EMA SiT {'smoke-size ' * cfg.smoke}{cfg.model} from '{args.ckpt}' (step {ckpt.get('steps')}), "
        f"VAE from {vae_from}, latent stats from {args.latents_stats or 'the EMA BatchNorm'}")
    return model.eval().to(device), vae.to(device), scale.to(device), bias.to(device), cfg


#################################################################################
#         Per-sample randomness: any process count, any resume, same images      #
#################################################################################
# Sample i draws its label, its starting noise and its SDE noise from its own generator, seeded by
# (--global-seed, i). Batches are fixed index ranges, so every float is the same whoever draws them.

def draw_inputs(indices, global_seed, latent_shape, num_classes, schedule=None):
    """(noise, labels, generators) of samples `indices`; the label is always drawn, so the noise is the
    same whether labels come from the generator (uniform) or from a schedule (balanced, --class-labels)."""
    # mt19937 keeps 32 seed bits: sample i gets offset + i, distinct within a run, the offset hashed from the seed
    offset = int(np.random.SeedSequence(global_seed).generate_state(1)[0])
    gens = [torch.Generator().manual_seed((offset + i) % 2 ** 32) for i in indices]
    y = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in gens])
    return noise, (y if schedule is None else schedule[list(indices)]), gens


def label_schedule(args, num_classes):
    """None (uniform labels from each sample's generator), exactly N / num_classes per class in a
    seeded order (--balanced), or the --class-labels of a grid."""
    labels = torch.tensor(args.class_labels) if args.class_labels else None
    if labels is not None and (labels.min() < 0 or labels.max() >= num_classes):
        fail(f"--class-labels must lie in [0, {num_classes - 1}], the model's classes")
    if not args.balanced:
        return labels
    if args.num_fid_samples % num_classes:
        fail(f"--balanced needs --num-fid-samples divisible by the {num_classes} classes")
    perm = torch.randperm(args.num_fid_samples, generator=torch.Generator().manual_seed(args.global_seed))
    return torch.arange(num_classes).repeat_interleave(args.num_fid_samples // num_classes)[perm]


@torch.no_grad()
def generate(indices, model, vae, scale, bias, schedule, args, amp):
    """uint8 (len(indices), H, W, 3) images of samples `indices`."""
    shape = (model.in_channels, args.resolution // vae.factor, args.resolution // vae.factor)
    noise, y, gens = draw_inputs(indices, args.global_seed, shape, model.num_classes, schedule)
    noise, y = noise.to(scale.device), y.to(scale.device)
    cfg = dict(num_steps=args.num_steps, cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
               guidance_high=args.guidance_high)
    with amp():
        z_n = euler_maruyama_sampler(model, noise, y, **cfg, generators=gens) \
            if args.mode == "sde" else euler_sampler(model, noise, y, **cfg, heun=args.heun)
    return to_uint8(repae.decode_latent(vae, z_n, scale, bias))


def to_uint8(images):
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) by truncation, as the official generate.py whose samples gave the
    paper's FIDs."""
    return (255 * (images + 1) / 2).clamp(0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


#################################################################################
#              Main: PNG folder (resumable) and .npz, or one PNG grid            #
#################################################################################
# DiT sample_ddp.py layout: one process per GPU, each draws its share of the missing batches;
# rank 0 writes the .npz once all N PNGs exist. Settings are kept in args.json to refuse mixing.
# Reconstructions (below) fill their two folders the same way (fill_folders).

def weights_name(path):
    """exps/<run>/checkpoints/<step>.pt -> <run>-<step>, as generate.py names its folder; another file -> its stem;
    a diffusers folder, or its .safetensors -> the folder's name."""
    path = os.path.abspath(path)
    if path.endswith(".safetensors"):
        path = os.path.dirname(path)
    ckpt_dir, name = os.path.split(path if os.path.isdir(path) else os.path.splitext(path)[0])
    return f"{os.path.basename(os.path.dirname(ckpt_dir))}-{name}" if os.path.basename(ckpt_dir) == "checkpoints" \
        else name


def sample_folder(args):
    """<sample-dir>/<run>-<step>-<settings>."""
    what = "grid" if args.grid else f"n{args.num_fid_samples}{'-balanced' if args.balanced else ''}"
    return os.path.join(args.sample_dir, f"{weights_name(args.ckpt)}-{args.mode}{args.num_steps}"
                                         f"{'-heun' if args.heun else ''}-cfg{args.cfg_scale}-{args.guidance_low}"
                                         f"-{args.guidance_high}-seed{args.global_seed}-{what}")


def save(path, write):
    """repae.write_atomic; a write error (a full disk) is returned as the sentence to stop with (exit status 1), else
    None: what was written before it is kept, and the same command continues."""
    e = repae.write_atomic(path, write)
    if e:
        return (f"could not write '{path}' ({e}); the samples written so far are kept: free some space, then run "
                f"the same command again")


class _Unreadable(Exception):
    """A PNG write_npz cannot read, carried through repae.write_atomic (which takes an OSError for a full disk)."""


def _png_array(sample_dir, i, shape=None):
    try:
        with Image.open(f"{sample_dir}/{i:06d}.png") as im:
            a = np.asarray(im)
        if shape is not None and a.shape != shape:
            raise ValueError(f"{sample_dir}/{i:06d}.png is {a.shape}, {sample_dir}/000000.png {shape}")
        return a.astype(np.uint8, copy=False)
    except Exception as e:
        raise _Unreadable(e) from e


def write_npz(sample_dir, n, log):
    """<sample_dir>.npz from its n PNGs: arr_0, (N, H, W, 3) uint8, the ADM format, stored uncompressed as np.savez
    writes it (fid.py memory-maps it). Streamed PNG by PNG: one image in memory, not N (9.8 GB at 50k). A PNG that
    cannot be read raises its own error, no .npz or .npz.tmp left. Returns save's error."""
    path, unreadable = f"{sample_dir}.npz", None
    try:
        shape = (n, *_png_array(sample_dir, 0).shape)

        def write(f):   # np.savez's layout: a zip64 member arr_0.npy, ZIP_STORED, a .npy 1.0 header, C-order rows
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
                    zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for i in range(n):
                    member.write(_png_array(sample_dir, i, shape[1:]).data)
        error = save(path, write)
    except _Unreadable as e:
        unreadable = e.args[0]
        if os.path.lexists(f"{path}.tmp"):      # repae.write_atomic's, left by an error it does not catch
            os.remove(f"{path}.tmp")
    if unreadable:
        raise unreadable                        # the PNG's own error, outside the handler: no chained _Unreadable
    if not error:
        log(f"saved {path} {shape}")
    return error


def fill_folders(folders, settings, n, b, draw, dist_env, log, doing):
    """PNGs 000000.png ... of images 0..n-1 in each of `folders`, then each folder's .npz (rank 0). Batches are the
    fixed index ranges [0, b), [b, 2b) ...; draw(indices) gives one uint8 (B, H, W, 3) array per folder. A folder
    whose args.json holds other settings is refused; a batch with any PNG missing is redrawn whole (same batch, same
    floats, same PNGs), and kept PNGs are never rewritten."""
    world, rank, work, error = dist_env.world, dist_env.rank, [None, None], None   # (refusal, todo) of rank 0
    png = lambda folder, i: os.path.join(folder, f"{i:06d}.png")
    if dist_env.is_main:                                    # rank 0 lists the work, every rank takes its share
        for folder in folders:
            saved = os.path.join(folder, "args.json")
            old = json.load(open(saved)) if os.path.isfile(saved) else settings
            if old != settings and not work[0]:
                work[0] = (f"'{folder}' holds images made with other settings (old, new): "
                           f"{ {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v} }; "
                           f"pass another --sample-dir")
        for folder in folders if not work[0] else []:
            os.makedirs(folder, exist_ok=True)
            error = error or save(os.path.join(folder, "args.json"),
                                  lambda f: f.write(json.dumps(settings, indent=2).encode()))
        if not work[0] and not error:
            work[1] = [list(range(s, min(s + b, n))) for s in range(0, n, b)
                       if not all(os.path.exists(png(f, i)) for f in folders for i in range(s, min(s + b, n)))]
            log(f"{n} images in {' and '.join(folders)}: {n - sum(map(len, work[1]))} already there; {doing} the "
                f"rest with {world} process(es) on {dist_env.device.type}")
    repae.fail_together(error, dist_env)                    # rank 0's write errors stop every rank
    if world > 1:
        dist.broadcast_object_list(work, src=0, group=dist_env.ctrl)
    if work[0]:
        fail(work[0])
    todo = work[1]
    total, done, t0 = sum(map(len, todo)), 0, time.time()
    for indices in todo[rank::world]:
        for folder, images in zip(folders, draw(indices)):
            for i, image in zip(indices, images):
                if not os.path.exists(png(folder, i)):      # kept PNGs are never rewritten
                    error = save(png(folder, i), lambda f: Image.fromarray(image).save(f, format="PNG"))
                    if error:                               # this process's own PNG: it stops, and says why
                        fail(error, code=1, own=True)
        done += len(indices)
        rate = done * world / (time.time() - t0)            # rank 0's pace times the processes
        log(f"{min(done * world, total)}/{total} done, {rate:.2f} images/s, "
            f"ETA {max(total - done * world, 0) / rate / 60:.1f} min")
    if world > 1:
        dist.barrier(group=dist_env.ctrl)
    if dist_env.is_main and all(os.path.exists(png(f, i)) for f in folders for i in range(n)):
        for folder in folders:
            error = error or write_npz(folder, n, log)
    repae.fail_together(error, dist_env)                    # and every rank waits for the .npz files


@torch.no_grad()
def main(args):
    dist_env = repae.init_distributed(allow_tf32=args.tf32)
    device, world = dist_env.device, dist_env.world
    log = (lambda msg: print(msg, flush=True)) if dist_env.is_main else (lambda msg: None)
    model, vae, scale, bias, cfg = load_models(args, device, log)
    args.resolution = cfg.resolution
    if args.cfg_scale > 1 and model.y_embedder.embedding_table.num_embeddings == model.num_classes:
        fail("this SiT was trained without label dropout (--cfg-prob 0), so it has no null label; use --cfg-scale 1")
    schedule = label_schedule(args, model.num_classes)
    dtype = repae.AMP_DTYPES[args.mixed_precision]
    amp = lambda: torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype is not None)
    gen = lambda indices: generate(indices, model, vae, scale, bias, schedule, args, amp)
    sample_dir = sample_folder(args)

    if args.grid:
        if world > 1:
            fail("--grid draws a few images in one process; run it with python sample.py, not torchrun")
        images = torch.from_numpy(gen(range(len(schedule)))).permute(0, 3, 1, 2)
        grid = torchvision.utils.make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2)
        os.makedirs(os.path.dirname(os.path.abspath(sample_dir)), exist_ok=True)
        write = lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG")
        repae.fail_together(save(f"{sample_dir}.png", write), dist_env)
        return log(f"saved {sample_dir}.png")

    settings = {k: v for k, v in dict(vars(args), ckpt=os.path.abspath(args.ckpt)).items() if k not in NOT_SETTINGS}
    doing = f"drawing ({args.mode}, {args.num_steps} steps, cfg {args.cfg_scale} on [{args.guidance_low}, " \
            f"{args.guidance_high}])"
    fill_folders([sample_dir], settings, args.num_fid_samples, args.pproc_batch_size, lambda i: [gen(i)], dist_env,
                 log, doing)


#################################################################################
#        Reconstructions: the rFID pair and PSNR of a VAE on a data set          #
#################################################################################
# rFID compares the data set's ADM centre crops with their reconstructions through the VAE (ImageNet val, 50k
# images at 256 px in the paper): the same resumable folders, one pair of .npz files for fid.py.

@torch.no_grad()
def reconstruct_batch(indices, images, vae, device):
    """uint8 (B, H, W, 3) ADM crops of images `indices`, as the training loader makes them, and their reconstructions:
    the decoded posterior mode (a sampled latent would add the posterior's noise to what is measured)."""
    real = torch.stack([images[i]["x"] for i in indices])
    recon = vae.decode(vae.encode(real.to(device).float() / 127.5 - 1).mode())
    return real.permute(0, 2, 3, 1).numpy(), to_uint8(recon)


def npz_chunks(path, k=256):
    """The images of an ADM .npz as write_npz stores it, k at a time: 50k images at 256 px are 9.8 GB."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        np.lib.format.read_magic(f)
        shape = np.lib.format.read_array_header_1_0(f)[0]
        for s in range(0, shape[0], k):
            rows = min(k, shape[0] - s)
            yield np.frombuffer(f.read(rows * math.prod(shape[1:])), np.uint8).reshape(rows, *shape[1:])


def psnr(real_npz, recon_npz):
    """Mean over images of 10 log10(255^2 / MSE_i) on the uint8 pairs; an exact reconstruction (MSE 0) counts as
    100 dB rather than infinity."""
    values = []
    for a, b in zip(npz_chunks(real_npz), npz_chunks(recon_npz)):
        mse = ((a.astype(np.float64) - b) ** 2).reshape(len(a), -1).mean(axis=1)
        values.append(10 * np.log10(255 ** 2 / np.maximum(mse, 255 ** 2 * 1e-10)))
    return float(np.concatenate(values).mean())


def reconstruct(args):
    """--reconstruct: <sample-dir>/<vae>-<data>-<res>px-n<N>-real/ and -recon/ (PNGs, resumable, any number of
    processes), their .npz files, and the PSNR printed by rank 0."""
    dist_env = repae.init_distributed(allow_tf32=args.tf32)
    log = (lambda msg: print(msg, flush=True)) if dist_env.is_main else (lambda msg: None)
    ckpt, cfg = load_checkpoint(args) if args.ckpt else \
        ({}, argparse.Namespace(vae=args.vae or "f8d4", resolution=args.resolution or 256, smoke=False))
    vae, vae_from = run_vae(ckpt, cfg, args)
    args.vae, args.resolution, n = cfg.vae, cfg.resolution, args.num_fid_samples
    if args.resolution % vae.factor:
        fail(f"--resolution {args.resolution} is not a multiple of {vae.factor}, the {args.vae} VAE's downsampling, "
             f"so its reconstructions would have another size; pass a multiple of {vae.factor}")
    root = args.data_dir
    images = repae.ImageFolder(root, args.resolution)
    if len(images) < n:
        fail(f"--data-dir '{root}' holds {len(images)} images, fewer than --num-fid-samples {n}; pass "
             f"--num-fid-samples {len(images)} or fewer")
    name = os.path.join(args.sample_dir, f"{weights_name(args.ckpt or args.vae_ckpt)}-"
                                         f"{os.path.basename(os.path.abspath(root))}-{args.resolution}px-n{n}")
    settings = {k: os.path.abspath(v) if k in ("ckpt", "vae_ckpt", "data_dir") and v else v
                for k, v in vars(args).items() if k in RECONSTRUCT_SETTINGS}
    log(f"VAE {'smoke-size ' * cfg.smoke}{cfg.vae} from {vae_from}; the first {n} images of '{root}' at "
        f"{args.resolution} px")
    vae = vae.to(dist_env.device)
    fill_folders([f"{name}-real", f"{name}-recon"], settings, n, args.pproc_batch_size,
                 lambda indices: reconstruct_batch(indices, images, vae, dist_env.device), dist_env, log,
                 "reconstructing (posterior mode)")
    if dist_env.is_main:
        log(f"PSNR {psnr(f'{name}-real.npz', f'{name}-recon.npz'):.3f} dB, the mean over the {n} images of "
            f"10 log10(255^2 / MSE) on uint8; rFID: python fid.py {name}-recon.npz {name}-real.npz")


#################################################################################
#          Export: the tuned VAE in the released layout and as diffusers         #
#################################################################################
# The E2E-VAE of an end-to-end run, for a new SiT trained on it (paper Sec. 4.3) or for any diffusers pipeline.

def diffusers_weights(vae):
    """The VAE's state dict in diffusers' AutoencoderKL names; its attention's 1x1 convolutions are linear layers
    there (the same weights, the two trailing 1-sized dims dropped)."""
    state = {}
    for k, v in vae.state_dict().items():
        k = repae.diffusers_key(k, len(vae.decoder.up))
        linear = re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", k)
        state[k] = (v[:, :, 0, 0] if linear else v).contiguous()
    return state


def write_folder(folder, files):
    """files {name: bytes} into folder, all or none: written into folder.tmp, then renamed. Returns the write error,
    its folder.tmp removed, or None."""
    tmp = f"{folder}.tmp"
    if os.path.isdir(tmp):                                  # an earlier export's, stopped mid-way
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for name, data in files.items():
        if e := repae.write_atomic(os.path.join(tmp, name), lambda f: f.write(data)):
            shutil.rmtree(tmp)
            return e
    os.replace(tmp, folder)


def export_vae(args):
    """--export-vae CKPT: the tuned VAE (E2E-VAE) as <output-dir>/e2e-<vae>-<step>.pt (the released layout), its
    -latents-stats.pt from the EMA SiT's BatchNorm buffers and its -discriminator-ckpt.pt, and as the diffusers
    AutoencoderKL folder <output-dir>/e2e-<vae>-<step>/ (config.json, diffusion_pytorch_model.safetensors)."""
    ckpt = repae.load_file(args.export_vae, "--export-vae")
    if not isinstance(ckpt, dict) or "vae" not in ckpt or "ema" not in ckpt:
        fail(f"'{args.export_vae}' has no 'vae' and 'ema' entries; export needs an end-to-end (REPA-E) checkpoint")
    run = run_config(ckpt, args)                            # the run's VAE type; ours or a released checkpoint
    if run.freeze_vae:
        fail(f"'{args.export_vae}' comes from a frozen-VAE run, whose VAE is the unchanged {run.vae_ckpt}; export "
             f"the checkpoint of an end-to-end run")
    vae = repae.build_vae(run)
    repae.load_state(vae, ckpt["vae"], f"the VAE in '{args.export_vae}'", "--export-vae")
    var, mean = ckpt["ema"]["bn.running_var"], ckpt["ema"]["bn.running_mean"]
    path = os.path.join(args.output_dir, f"e2e-{run.vae}-{ckpt.get('steps', 0):07d}.pt")
    folder = os.path.splitext(path)[0]                      # --vae-ckpt takes it; its companions are the .pt's
    for existing in (path, folder):
        if os.path.exists(existing):
            fail(f"'{existing}' already exists (an earlier export, maybe of another run); pass another --output-dir")
    os.makedirs(args.output_dir, exist_ok=True)
    # diffusers scales latents by one number; latents_mean/std hold the per-channel BatchNorm statistics
    config = dict(repae.diffusers_config(vae), sample_size=run.resolution,
                  scaling_factor=1 / math.sqrt(var.double().mean()), latents_mean=mean.tolist(),
                  latents_std=var.sqrt().tolist(), force_upcast=True)
    files = {"config.json": json.dumps(config, indent=2).encode(),
             "diffusion_pytorch_model.safetensors": safetensors.torch.save(diffusers_weights(vae))}
    stats = dict(latents_scale=var.rsqrt().view(1, -1, 1, 1), latents_bias=mean.view(1, -1, 1, 1))
    pt = lambda obj: lambda file: repae.write_atomic(file, lambda f: torch.save(obj, f))
    writes = [(repae.beside(path, "-latents-stats.pt"), pt(stats)), (folder, lambda file: write_folder(file, files)),
              (path, pt(vae.state_dict()))]         # the VAE last: its file means a whole export
    if "discriminator" in ckpt:
        writes.insert(0, (repae.beside(path, "-discriminator-ckpt.pt"), pt(ckpt["discriminator"])))
    for file, write in writes:
        if e := write(file):
            fail(f"could not write '{file}' ({e}); free some space and export again", code=1)
    print(f"wrote {path} with its -latents-stats.pt, and the diffusers folder {folder}; train a new SiT on it with "
          f"--freeze-vae --vae-ckpt {path}")


#################################################################################
#                                 Command line                                   #
#################################################################################
# Flag names of the official REPA-E generate.py. Model settings default to the checkpoint's args.
# Defaults: the paper's evaluation sampler (SDE, 250 steps) without guidance.

def class_labels(text):                                     # argparse: "invalid class_labels value: '1,2,'"
    return [int(c) for c in text.split(",")]


FROM_CKPT = " (default: the checkpoint's)"
# args.json of a sample folder: every flag but where the files go, the batch size and these (refused or unread there)
NOT_SETTINGS = ("sample_dir", "pproc_batch_size", "exp_path", "train_steps", "export_vae", "output_dir", "reconstruct",
                "data_dir")
RECONSTRUCT_SETTINGS = ("ckpt", "vae_ckpt", "vae", "resolution", "data_dir", "num_fid_samples", "tf32")
# flags of the sampler and the SiT, which --reconstruct never reads
SAMPLER_FLAGS = ("latents_stats", "global_seed", "mode", "num_steps", "heun", "cfg_scale", "guidance_low",
                 "guidance_high", "balanced", "class_labels", "grid", "mixed_precision", "model", "num_classes",
                 "encoder_depth")


def parse_args(argv=None):
    p = repae.Parser(description="Sample a REPA-E / SiT checkpoint to PNGs and an ADM .npz; reconstruct a data set "
                                 "through a VAE (rFID, PSNR); export a run's tuned VAE")
    a = p.add_argument
    a("--ckpt", default=None, help="training checkpoint (repae.py or released REPA-E): its EMA SiT is used")
    a("--exp-path", default=None, help="a run folder; with --train-steps N its checkpoints/<N>.pt (generate.py)")
    a("--train-steps", type=repae.at_least(0), default=None, help="the step of the --exp-path checkpoint")
    a("--vae-ckpt", default=None, help="VAE weights (a released .pt, a diffusers folder or its .safetensors); "
                                       "default: the checkpoint's `vae`, else the run's --vae-ckpt")
    a("--latents-stats", default=None, help="latent statistics file; default: the EMA SiT's BatchNorm buffers")
    a("--sample-dir", default="samples", help="parent of the PNG folder <run>-<step>-<settings> and its .npz")
    a("--num-fid-samples", type=repae.at_least(1), default=50_000,
      help="images to sample (the FID reference: 50k), or the first images of --data-dir to reconstruct")
    a("--pproc-batch-size", type=repae.at_least(1), default=128, help="batch per process")
    a("--global-seed", type=repae.at_least(0), default=0, help="sample i draws from its own (seed, i) generator")
    a("--mode", default="sde", choices=["ode", "sde"], help="Euler ODE or Euler-Maruyama SDE sampler")
    a("--num-steps", type=repae.at_least(1), default=250, help="sampler steps")
    a("--heun", action=argparse.BooleanOptionalAction, default=False, help="Heun correction (ODE only)")
    a("--cfg-scale", type=float, default=1.0, help="1 = no guidance; paper: 2.2 (SD-VAE SiT-XL/2), 2.5 (E2E-VA-VAE)")
    a("--guidance-low", type=float, default=0.0, help="guidance applies for guidance-low <= t <= guidance-high")
    a("--guidance-high", type=float, default=1.0, help="paper: 0.65 (SD-VAE SiT-XL/2), 0.75 (E2E-VA-VAE)")
    a("--balanced", action="store_true", help="exactly N / num_classes samples of each class")
    a("--class-labels", type=class_labels, help="comma-separated classes of a --grid figure, one image each")
    a("--grid", action="store_true", help="write one PNG grid of --class-labels instead of the FID folder")
    a("--mixed-precision", default="no", choices=list(repae.AMP_DTYPES), help="SiT autocast on CUDA (CPU: fp32)")
    a("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA, as generate.py")
    a = p.add_argument_group("the VAE alone", "reconstructions of a data set through the VAE of --ckpt or of "
                             "--vae-ckpt, or the export of a run's tuned VAE").add_argument
    a("--reconstruct", action="store_true", help="write <name>-real/ and <name>-recon/ (PNGs, .npz) of --data-dir "
                                                 "under --sample-dir, and print the PSNR")
    a("--data-dir", default=None, help="images to reconstruct, an ImageFolder tree (e.g. ImageNet val)")
    a("--export-vae", metavar="CKPT", help="write the tuned VAE of an end-to-end checkpoint to --output-dir")
    a("--output-dir", default="pretrained/e2e", help="where --export-vae writes e2e-<vae>-<step>.pt and its folder")
    a = p.add_argument_group("overrides of the checkpoint's settings",
                             "each defaults to the checkpoint's own args (a checkpoint without args: repae.py's "
                             "defaults); give one only for a checkpoint whose args are wrong or missing").add_argument
    # SUPPRESS: --help says "(default: the checkpoint's)", not None; the flags not given are set to None below
    a("--model", default=argparse.SUPPRESS, choices=list(repae.SiT_models), help="the SiT" + FROM_CKPT)
    a("--vae", default=argparse.SUPPRESS, choices=list(repae.vae_models),
      help="the VAE layout, f8d4 without a --ckpt" + FROM_CKPT)
    a("--resolution", type=repae.at_least(32), default=argparse.SUPPRESS,
      help="image side in pixels, 256 without a --ckpt" + FROM_CKPT)
    a("--num-classes", type=repae.at_least(1), default=argparse.SUPPRESS,
      help="class labels (the null label is this index)" + FROM_CKPT)
    a("--encoder-depth", type=repae.at_least(1), default=argparse.SUPPRESS,
      help="SiT block whose tokens feed the projectors" + FROM_CKPT)
    args = p.parse_args(argv)
    for k in MODEL_FLAGS:
        setattr(args, k, getattr(args, k, None))            # None: the checkpoint's own setting
    given = lambda keys: [f"--{k.replace('_', '-')}" for k in keys
                          if getattr(args, k) != (None if k in MODEL_FLAGS else p.get_default(k))]
    if args.export_vae:
        if extra := given(k for k in vars(args) if k not in ("export_vae", "output_dir")):
            p.error(f"--export-vae writes a checkpoint's VAE to --output-dir and reads no other flag; drop "
                    f"{', '.join(extra)}")
        return args
    if given(["output_dir"]):
        p.error("--output-dir is where --export-vae writes; sample.py --sample-dir is the parent of its folders")
    if (args.exp_path is None) != (args.train_steps is None) or args.ckpt and args.exp_path:
        p.error("name the checkpoint with --ckpt, or with --exp-path and --train-steps (generate.py's flags)")
    if args.exp_path:
        args.ckpt = os.path.join(args.exp_path, "checkpoints", f"{args.train_steps:07d}.pt")
    if args.reconstruct:
        if extra := given(SAMPLER_FLAGS):
            p.error(f"--reconstruct encodes and decodes images, with no SiT or sampler; drop {', '.join(extra)}")
        if not args.data_dir:
            p.error("--reconstruct needs the images: pass --data-dir (an ImageFolder tree, e.g. ImageNet val)")
        if bool(args.ckpt) == bool(args.vae_ckpt):
            p.error("--reconstruct takes the VAE of a run (--ckpt) or a VAE file or diffusers folder (--vae-ckpt); "
                    "give one")
        return args
    if args.data_dir:
        p.error("--data-dir holds the images of --reconstruct; add --reconstruct, or drop --data-dir")
    if not args.ckpt:
        p.error("name the checkpoint with --ckpt, or with --exp-path and --train-steps (generate.py's flags)")
    if args.heun and args.mode != "ode":
        p.error("--heun corrects the ODE sampler only; add --mode ode")
    if args.cfg_scale < 1:
        p.error("--cfg-scale below 1 is not guidance; use 1 for none")
    if args.guidance_low > args.guidance_high:
        p.error("--guidance-low must not exceed --guidance-high")
    if bool(args.grid) != bool(args.class_labels):
        p.error("--grid and --class-labels go together: the grid shows one image per listed class")
    if args.balanced and args.class_labels:
        p.error("--balanced sets the labels of the FID folder; drop it with --class-labels")
    return args


if __name__ == "__main__":
    args = parse_args()
    (export_vae if args.export_vae else reconstruct if args.reconstruct else main)(args)
