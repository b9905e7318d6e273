"""
Sampling from a REPA-E (or frozen-VAE) SiT: Euler ODE / Euler-Maruyama SDE with interval CFG, written as
PNGs 000000.png... and one ADM-format .npz (arr_0: (N, H, W, 3) uint8) for fid.py and the ADM suite.

  torchrun --nproc_per_node=8 sample.py --ckpt exps/run/checkpoints/0400000.pt --num-fid-samples 50000 \
      --mode sde --num-steps 250 --cfg-scale 2.2 --guidance-low 0 --guidance-high 0.65
  python sample.py --ckpt ... --class-labels 1,207,360 --grid       # one PNG grid for a figure
"""
import argparse
import json
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image

import repae
from repae import euler_sampler, fail, guided, interpolant


#################################################################################
#                  Samplers: time runs from t = 1 (noise) to t = 0 (data)        #
#################################################################################
# The SiT predicts a velocity v(x_t, t, y). Classifier-free guidance mixes the conditional and the
# null-label (index num_classes) predictions, only for guidance_low <= t <= guidance_high.

def score_from_velocity(v, x, t, path_type):
    """Score of x_t from the predicted velocity: for the linear path
    ((1-t)/(-1) * v - x) / (t^2 - ((1-t)/(-1)) * t)."""
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


def per_sample_randn(generators, like):
    """N(0, I) like `like`, row i from generators[i]: a sample's noise does not depend on its batch."""
    return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in generators]).to(like.device)


@torch.no_grad()
def euler_maruyama_sampler(model, noise, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                           path_type="linear", generators=None):
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
                       fn=lambda v, x_in, t: v - 0.5 * w * score_from_velocity(v, x_in, t, path_type))
        x = x + drift * dt if last else x + drift * dt + w ** 0.5 * deps
    return x


#################################################################################
#                       Checkpoints: EMA SiT, VAE, latent statistics             #
#################################################################################
# One loader for this project's checkpoints, released REPA-E ones (ema + tuned vae + args) and
# frozen-VAE ones (no vae key: --vae-ckpt or the run's vae_ckpt). Always the EMA weights.

MODEL_FLAGS = ("model", "vae", "resolution", "num_classes", "encoder_depth", "path_type")


def load_models(args, device, log):
    """(EMA SiT, VAE, latents scale, latents bias, run config); decode with z = z_n / scale + bias."""
    ckpt = repae.load_file(args.ckpt, "--ckpt", mmap=True)     # only the EMA SiT and the VAE are read
    if not isinstance(ckpt, dict) or "ema" not in ckpt:
        fail(f"'{args.ckpt}' has no 'ema' weights, so it is not a SiT training checkpoint; pass one saved by "
             f"repae.py or a released REPA-E checkpoint with --ckpt")
    # the run's settings: repae defaults < the checkpoint's args (official ones lack e.g. `smoke`) < flags given
    cfg, ema = vars(repae.parse_args([], check=False)), ckpt["ema"]
    cfg.update(vars(ckpt["args"]) if isinstance(ckpt.get("args"), argparse.Namespace) else {})
    cfg = argparse.Namespace(**{**cfg, **{k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}})
    # projector widths from the weights themselves, so the strict load needs no DINOv2
    n_proj = len({k.split(".")[1] for k in ema if k.startswith("projectors.")})
    z_dims = [ema[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)]
    vae = repae.build_vae(cfg)
    model = repae.build_sit(cfg, z_dims, vae)
    repae.load_state(model, ema, f"the EMA SiT in '{args.ckpt}'", "--ckpt and --model/--vae/--resolution")
    if args.vae_ckpt:
        vae_state, vae_from = repae.load_file(args.vae_ckpt, "--vae-ckpt"), args.vae_ckpt
    elif "vae" in ckpt:
        vae_state, vae_from = ckpt["vae"], f"'{args.ckpt}'"
    elif cfg.vae_ckpt and os.path.isfile(cfg.vae_ckpt):
        vae_state, vae_from = repae.load_file(cfg.vae_ckpt, "--vae-ckpt"), cfg.vae_ckpt
    else:
        fail(f"'{args.ckpt}' holds no VAE (a frozen-VAE run) and its VAE checkpoint '{cfg.vae_ckpt}' does not "
             f"exist; pass the VAE weights with --vae-ckpt")
    repae.load_state(vae, vae_state, f"the VAE from {vae_from}", "--vae-ckpt/--vae")
    # The EMA BN buffers are the latent statistics the SiT was trained with (initialised from the
    # VAE's file, then tracked); --latents-stats is for checkpoints that normalised with a fixed file.
    scale, bias = repae.load_latent_stats(args.latents_stats, vae.z_channels) if args.latents_stats else \
        model.latent_stats()
    log(f"EMA SiT {'smoke-size ' * cfg.smoke}{cfg.model} from '{args.ckpt}' (step {ckpt.get('steps')}), "
        f"VAE from {vae_from}, latent stats from {args.latents_stats or 'the EMA BatchNorm'}")
    return model.eval().to(device), vae.eval().to(device), scale.to(device), bias.to(device), cfg


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
        z_n = euler_maruyama_sampler(model, noise, y, **cfg, path_type=args.path_type, generators=gens) \
            if args.mode == "sde" else euler_sampler(model, noise, y, **cfg, heun=args.heun)
    images = repae.decode_latent(vae, z_n, scale, bias)
    # [-1, 1] -> uint8 by truncation, as the official generate.py whose samples gave the paper's FIDs
    return (255 * (images + 1) / 2).clamp(0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


#################################################################################
#              Main: PNG folder (resumable) and .npz, or one PNG grid            #
#################################################################################
# DiT sample_ddp.py layout: one process per GPU, each draws its share of the missing batches;
# rank 0 writes the .npz once all N PNGs exist. Settings are kept in args.json to refuse mixing.

def sample_folder(args):
    """<sample-dir>/<run>-<step>-<settings> for exps/<run>/checkpoints/<step>.pt, as generate.py names its folder."""
    ckpt_dir, name = os.path.split(os.path.splitext(os.path.abspath(args.ckpt))[0])
    if os.path.basename(ckpt_dir) == "checkpoints":
        name = f"{os.path.basename(os.path.dirname(ckpt_dir))}-{name}"
    what = "grid" if args.grid else f"n{args.num_fid_samples}{'-balanced' if args.balanced else ''}"
    return os.path.join(args.sample_dir, f"{name}-{args.mode}{args.num_steps}{'-heun' if args.heun else ''}"
                                         f"-cfg{args.cfg_scale}-{args.guidance_low}-{args.guidance_high}"
                                         f"-seed{args.global_seed}-{what}")


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


@torch.no_grad()
def main(args):
    dist_env = repae.init_distributed(allow_tf32=args.tf32)
    device, world, rank = dist_env.device, dist_env.world, dist_env.rank
    log = (lambda msg: print(msg, flush=True)) if dist_env.is_main else (lambda msg: None)
    model, vae, scale, bias, cfg = load_models(args, device, log)
    args.resolution, args.path_type = cfg.resolution, cfg.path_type
    if args.cfg_scale > 1 and model.y_embedder.embedding_table.num_embeddings == model.num_classes:
        fail("this SiT was trained without label dropout (--cfg-prob 0), so it has no null label; use --cfg-scale 1")
    schedule = label_schedule(args, model.num_classes)
    dtype = repae.AMP_DTYPES[args.mixed_precision]
    amp = lambda: torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype is not None)
    gen = lambda indices: generate(indices, model, vae, scale, bias, schedule, args, amp)
    sample_dir = sample_folder(args)
    png = lambda i: os.path.join(sample_dir, f"{i:06d}.png")

    if args.grid:
        if world > 1:
            fail("--grid draws a few images in one process; run it with python sample.py, not torchrun")
        images = torch.from_numpy(gen(range(len(schedule)))).permute(0, 3, 1, 2)
        grid = torchvision.utils.make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2)
        os.makedirs(os.path.dirname(os.path.abspath(sample_dir)), exist_ok=True)
        write = lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG")
        repae.fail_together(save(f"{sample_dir}.png", write), dist_env)
        return log(f"saved {sample_dir}.png")

    n, b, work, error = args.num_fid_samples, args.pproc_batch_size, [None, None], None   # (refusal, todo) of rank 0
    settings = {k: v for k, v in dict(vars(args), ckpt=os.path.abspath(args.ckpt)).items()
                if k not in ("sample_dir", "pproc_batch_size", "exp_path", "train_steps")}
    if dist_env.is_main:                                    # rank 0 lists the work, every rank takes its share
        saved = os.path.join(sample_dir, "args.json")
        old = json.load(open(saved)) if os.path.isfile(saved) else settings
        if old != settings:
            work[0] = (f"'{sample_dir}' holds samples drawn with other settings (old, new): "
                       f"{ {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v} }; "
                       f"pass another --sample-dir")
        else:
            os.makedirs(sample_dir, exist_ok=True)
            error = save(saved, lambda f: f.write(json.dumps(settings, indent=2).encode()))
        if not work[0] and not error:
            # A batch with any PNG missing is redrawn whole: same batch, same floats, same PNGs.
            work[1] = [list(range(s, min(s + b, n))) for s in range(0, n, b)
                       if not all(os.path.exists(png(i)) for i in range(s, min(s + b, n)))]
            log(f"{n} samples in {sample_dir}: {n - sum(map(len, work[1]))} already there; drawing the rest "
                f"({args.mode}, {args.num_steps} steps, cfg {args.cfg_scale} on [{args.guidance_low}, "
                f"{args.guidance_high}]) with {world} process(es) on {device.type}")
    repae.fail_together(error, dist_env)                    # rank 0's write errors stop every rank
    if world > 1:
        dist.broadcast_object_list(work, src=0, group=dist_env.ctrl)
    if work[0]:
        fail(work[0])
    todo = work[1]
    total, done, t0 = sum(map(len, todo)), 0, time.time()
    for indices in todo[rank::world]:
        for i, image in zip(indices, gen(indices)):
            if not os.path.exists(png(i)):                   # kept PNGs are never rewritten
                error = save(png(i), lambda f: Image.fromarray(image).save(f, format="PNG"))
                if error:                                   # this process's own PNG: it stops, and says why
                    fail(error, code=1, own=True)
        done += len(indices)
        rate = done * world / (time.time() - t0)            # rank 0's pace times the processes
        log(f"{min(done * world, total)}/{total} drawn, {rate:.2f} images/s, "
            f"ETA {max(total - done * world, 0) / rate / 60:.1f} min")
    if world > 1:
        dist.barrier(group=dist_env.ctrl)
    if dist_env.is_main and all(os.path.exists(png(i)) for i in range(n)):
        error = write_npz(sample_dir, n, log)
    repae.fail_together(error, dist_env)                    # and every rank waits for the .npz


#################################################################################
#                                 Command line                                   #
#################################################################################
# Flag names of the official REPA-E generate.py. Model settings default to the checkpoint's args.
# Defaults: the paper's evaluation sampler (SDE, 250 steps) without guidance.

def class_labels(text):                                     # argparse: "invalid class_labels value: '1,2,'"
    return [int(c) for c in text.split(",")]


FROM_CKPT = " (default: the checkpoint's)"


def parse_args(argv=None):
    p = repae.Parser(description="Sample a REPA-E / SiT checkpoint to PNGs and an ADM .npz")
    a = p.add_argument
    a("--ckpt", default=None, help="training checkpoint (repae.py or released REPA-E): its EMA SiT is used")
    a("--exp-path", default=None, help="a run folder; with --train-steps N its checkpoints/<N>.pt (generate.py)")
    a("--train-steps", type=repae.at_least(0), default=None, help="the step of the --exp-path checkpoint")
    a("--vae-ckpt", default=None, help="VAE weights; default: the checkpoint's `vae`, else the run's --vae-ckpt")
    a("--latents-stats", default=None, help="latent statistics file; default: the EMA SiT's BatchNorm buffers")
    a("--sample-dir", default="samples", help="parent of the PNG folder <run>-<step>-<settings> and its .npz")
    a("--num-fid-samples", type=repae.at_least(1), default=50_000, help="images to sample (the FID reference: 50k)")
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
    a = p.add_argument_group("overrides of the checkpoint's settings",
                             "each defaults to the checkpoint's own args (a checkpoint without args: repae.py's "
                             "defaults); give one only for a checkpoint whose args are wrong or missing").add_argument
    # SUPPRESS: --help says "(default: the checkpoint's)", not None; the flags not given are set to None below
    a("--model", default=argparse.SUPPRESS, choices=list(repae.SiT_models), help="the SiT" + FROM_CKPT)
    a("--vae", default=argparse.SUPPRESS, choices=list(repae.vae_models), help="the VAE layout" + FROM_CKPT)
    a("--resolution", type=repae.at_least(32), default=argparse.SUPPRESS, help="image side in pixels" + FROM_CKPT)
    a("--num-classes", type=repae.at_least(1), default=argparse.SUPPRESS,
      help="class labels (the null label is this index)" + FROM_CKPT)
    a("--encoder-depth", type=repae.at_least(1), default=argparse.SUPPRESS,
      help="SiT block whose tokens feed the projectors" + FROM_CKPT)
    a("--path-type", default=argparse.SUPPRESS, choices=["linear", "cosine"], help="the interpolant" + FROM_CKPT)
    args = p.parse_args(argv)
    for k in MODEL_FLAGS:
        setattr(args, k, getattr(args, k, None))            # None: the checkpoint's own setting
    if (args.ckpt is None) == (args.exp_path is None) or (args.exp_path is None) != (args.train_steps is None):
        p.error("name the checkpoint with --ckpt, or with --exp-path and --train-steps (generate.py's flags)")
    if args.exp_path:
        args.ckpt = os.path.join(args.exp_path, "checkpoints", f"{args.train_steps:07d}.pt")
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
    main(parse_args())
