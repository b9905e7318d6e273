"""
REPA-E: end-to-end tuning of a VAE together with a latent diffusion transformer (arXiv 2504.10483).

The whole recipe in one file, in the order of the paper's method section: VAE tokenizer -> L_REG (the VAE's own
losses) -> SiT with BatchNorm latent normalisation -> DINOv2 alignment target -> L_DIFF and L_REPA -> the flow ODE
-> the REPA-E step -> models from flags -> data -> run folder and checkpoints -> training loop -> other modes -> CLI.
The rule that makes end-to-end tuning work: L_REPA updates the VAE and the SiT, L_DIFF updates the SiT only
(stop-gradient on the latent), and L_REG keeps the VAE a good autoencoder.

  torchrun --nproc_per_node=8 repae.py --data-dir /imagenet/train --vae-ckpt pretrained/sdvae/sdvae-f8d4.pt
  python repae.py --smoke            # tiny random-weight run of the whole pipeline on a CPU
"""
import argparse
import atexit
import contextlib
import copy
import functools
import gc
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image


def say(kind, msg, own=False):
    """`<program>: <kind>: <msg>` on stderr; under torchrun only rank 0 speaks, but any rank of its own error."""
    if own or os.environ.get("RANK", "0") == "0":
        print(f"{os.path.basename(sys.argv[0])}: {kind}: {msg}", file=sys.stderr, flush=True)


def fail(msg, code=2, own=False):
    """Stop with one sentence that says what is wrong and what to do, no stack trace. Exit status 2: bad input,
    found before anything was written; 1: a run that went wrong later (see the Training loop banner). own: an error
    of this process alone (its own file), said by it whatever its rank."""
    say("error", msg, own)
    raise SystemExit(code)


def need_file(path, flag):
    if not path or not os.path.isfile(path):
        what = "is a folder, not a file" if path and os.path.isdir(path) else "does not exist"
        fail(f"weights file '{path}' {what}; pass the right path with {flag}")


def load_file(path, flag, mmap=False):
    """torch.load a weights file safely; the pickled argparse.Namespace of REPA-E checkpoints is allowed. mmap: read
    lazily through the page cache, so that the processes sampling from one ~12 GB checkpoint share what they read."""
    need_file(path, flag)
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file: say which and stop, never continue with it
        fail(f"could not read '{path}' ({type(e).__name__}: {str(e).splitlines()[0]}); "
             f"the file is corrupt or not a PyTorch checkpoint, replace it or pass another with {flag}")


def load_state(module, state, what, flag):
    """load_state_dict(strict=True), but a mismatch names the keys and shapes that differ."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        fail(f"{what} does not match the model ({len(missing)} missing keys {missing[:3]}, "
             f"{len(unexpected)} unexpected keys {unexpected[:3]}, shape mismatches {shapes[:3]}); "
             f"check {flag} and the model flags")
    module.load_state_dict(state, strict=True)


def fetch(url, filename, flag):
    """Path of a weights file in the torch hub cache, downloaded once; fails fast and names the fix offline."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path)
        except OSError as e:
            fail(f"could not download {url} ({e}); download it by hand and pass its path with {flag}")
    return path


def requires_grad(params, flag):
    for p in params:
        p.requires_grad_(flag)


#################################################################################
#                 VAE: the LDM AutoencoderKL (SD-VAE f8d4, IN/VA-VAE f16d32)     #
#################################################################################
# The tokenizer that REPA-E tunes. Key names follow the official LDM/REPA-E checkpoints so that
# sdvae-f8d4.pt, invae/vavae f16d32 and the `vae` entry of a REPA-E checkpoint load with strict=True.

def Normalize(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = Normalize(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = Normalize(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):                                   # (B, c_in, H, W) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1x1-conv projections, as in LDM)."""
    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):                                   # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).flatten(2).transpose(1, 2)[:, None] for f in (self.q, self.k, self.v))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Resample(nn.Module):
    """`downsample`: asymmetric pad and a stride-2 3x3 conv, as the LDM checkpoints expect. `upsample`: nearest x2
    as a broadcast, whose backward is a plain sum (deterministic on CUDA, unlike upsample_nearest2d's), a 3x3 conv."""
    def __init__(self, c, up):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(c, c, 3, 1 if up else 2, 1 if up else 0)

    def forward(self, x):
        if not self.up:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        B, C, H, W = x.shape
        return self.conv(x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2 * H, 2 * W))


def vae_level(c_in, c_out, blocks, attn):
    """One resolution level: `blocks` res blocks, each followed by attention where the level has it."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(blocks))
    level.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(blocks if attn else 0))
    return level


def run_level(level, h, checkpointing=False):
    for i, block in enumerate(level.block):
        if checkpointing and torch.is_grad_enabled():       # --vae-checkpointing: recompute in backward
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        else:
            h = block(h)
        h = level.attn[i](h) if len(level.attn) else h
    return h


def mid_block(c):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, z_channels, attn_levels, num_res_blocks):
        super().__init__()
        self.conv_in, self.down, c = nn.Conv2d(3, ch, 3, 1, 1), nn.ModuleList(), ch
        for i, mult in enumerate(ch_mult):
            self.down.append(vae_level(c, ch * mult, num_res_blocks, i in attn_levels))
            c = ch * mult
            if i != len(ch_mult) - 1:
                self.down[-1].downsample = Resample(c, up=False)
        self.mid = mid_block(c)
        self.norm_out, self.conv_out = Normalize(c), nn.Conv2d(c, 2 * z_channels, 3, 1, 1)

    def forward(self, x):                                   # (B, 3, H, W) -> (B, 2z, H/f, W/f)
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
            h = level.downsample(h) if hasattr(level, "downsample") else h
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    checkpointing = False                                   # --vae-checkpointing

    def __init__(self, ch, ch_mult, z_channels, attn_levels, num_res_blocks):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in, self.mid, self.up = nn.Conv2d(z_channels, c, 3, 1, 1), mid_block(c), nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            self.up.insert(0, vae_level(c, ch * ch_mult[i], num_res_blocks + 1, i in attn_levels))  # up[0]: full res
            c = ch * ch_mult[i]
            if i != 0:
                self.up[0].upsample = Resample(c, up=True)
        self.norm_out, self.conv_out = Normalize(c), nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z):                                   # (B, z, h, w) -> (B, 3, h*f, w*f)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = run_level(level, h, self.checkpointing)
            h = level.upsample(h) if hasattr(level, "upsample") else h
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The VAE posterior q(z|x) = N(mean, std^2), computed in float32 whatever the autocast dtype."""
    def __init__(self, moments):                            # (B, 2z, h, w)
        self.mean, logvar = moments.float().chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self):
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self):
        return self.mean

    def kl(self):                                           # KL(q || N(0, I)) per sample, (B,)
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, ch_mult, z_channels, attn_levels=(), ch=128, num_res_blocks=2):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, z_channels, attn_levels, num_res_blocks)
        self.decoder = Decoder(ch, ch_mult, z_channels, attn_levels, num_res_blocks)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.z_channels, self.factor = z_channels, 2 ** (len(ch_mult) - 1)

    def encode(self, x):                                    # x in [-1, 1]
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x):
        posterior = self.encode(x)
        z = posterior.sample()                              # REPA-E trains on sampled latents
        return posterior, z, self.decode(z)


vae_models = {
    "f8d4": functools.partial(AutoencoderKL, ch_mult=(1, 2, 4, 4), z_channels=4),            # SD-VAE
    "f16d32": functools.partial(AutoencoderKL, ch_mult=(1, 1, 2, 2, 4), z_channels=32,         # IN-/VA-VAE
                                attn_levels=(4,)),
}


def beside(vae_ckpt, suffix):
    """The released names of a VAE's companion files: sdvae-f8d4.pt -> sdvae-f8d4-latents-stats.pt, ...;
    only the file's own extension is replaced, never a '.pt' in a folder name."""
    return os.path.splitext(vae_ckpt)[0] + suffix


def load_latent_stats(path, channels):
    """Per-channel latent statistics saved next to a VAE checkpoint: the BatchNorm's starting point."""
    stats = load_file(path, "--latents-stats")
    if not {"latents_scale", "latents_bias"} <= set(stats):
        fail(f"'{path}' has no latents_scale/latents_bias; pass the VAE's -latents-stats.pt with --latents-stats")
    scale, bias = stats["latents_scale"].flatten().float(), stats["latents_bias"].flatten().float()
    if len(scale) != channels or len(bias) != channels:
        fail(f"'{path}' holds the scale and bias of {len(scale)} and {len(bias)} latent channels, but the VAE has "
             f"{channels}; pass this VAE's -latents-stats.pt with --latents-stats")
    return scale, bias


#################################################################################
#          L_REG: the VAE regulariser (L1 + LPIPS + KL + GAN), PatchGAN          #
#################################################################################
# Keeps the VAE a good autoencoder while L_REPA reshapes its latents (paper Sec. 3.3):
# L_REG = L1 + LPIPS + 1e-6 KL + 0.1 GAN, the discriminator trained with the hinge loss.

LPIPS_HEADS_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"   # taming vgg.pth


class LPIPS(nn.Module):
    """Zhang et al. 2018 perceptual distance in the taming layout: torchvision's VGG16 `features` read after
    relu1_2 ... relu5_3, unit-normalised, squared difference, learned 1x1 heads (keys lin0.model.1.weight ...)."""
    taps = (3, 8, 15, 22, 29)                               # indices of relu1_2 ... relu5_3 in vgg16().features

    def __init__(self, narrow=1):                           # narrow: channels / narrow (--smoke's tiny LPIPS)
        super().__init__()
        cfg = [v if v == "M" else v // narrow for v in torchvision.models.vgg.cfgs["D"]]
        self.features = torchvision.models.vgg.make_layers(cfg)[:30]   # keys 0 ... 29 of vgg16().features
        head = lambda c: nn.Sequential(OrderedDict(model=nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))))
        self.heads = nn.ModuleDict({f"lin{i}": head(c // narrow) for i, c in enumerate((64, 128, 256, 512, 512))})
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False).eval()

    def train(self, mode=True):                             # frozen, always eval (dropout slots off)
        return super().train(False)

    def forward(self, x, y):                                # (B, 3, H, W) each -> (B,)
        # Faithful to the released code: it maps inputs with 2x-1 as if they were in [0, 1], but the
        # step passes images in [-1, 1], so LPIPS sees [-3, 1]. The published checkpoints come from this.
        x, y = (((2 * v - 1) - self.shift) / self.scale for v in (x, y))
        d, heads = 0, iter(self.heads.values())
        for i, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if i in self.taps:
                nx, ny = (v / (v.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for v in (x, y))
                d = d + next(heads)((nx - ny) ** 2).mean(dim=(1, 2, 3))
        return d


def load_lpips(vgg_ckpt=None, heads_ckpt=None, random_weights=False, narrow=1):
    """torchvision's vgg16-397923af.pth (its `features.N` entries) and the taming heads vgg.pth; a file that
    --random-weights leaves unnamed stays random."""
    lpips = LPIPS(narrow)
    if vgg_ckpt or not random_weights:
        vgg = load_file(vgg_ckpt or fetch(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url,
                                          "vgg16-397923af.pth", "--vgg-ckpt"), "--vgg-ckpt")
        load_state(lpips.features, {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")},
                   "the VGG16 weights", "--vgg-ckpt")
    if heads_ckpt or not random_weights:
        heads = load_file(heads_ckpt or fetch(LPIPS_HEADS_URL, "vgg_lpips.pth", "--lpips-ckpt"), "--lpips-ckpt")
        load_state(lpips.heads, heads, "the LPIPS heads (vgg.pth)", "--lpips-ckpt")
    return lpips


class NLayerDiscriminator(nn.Module):
    """PatchGAN of taming-transformers: 3 strided 4x4 convs, 64 base channels, BatchNorm, LeakyReLU 0.2."""
    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers, mult = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*layers, nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, float(isinstance(m, nn.BatchNorm2d)), 0.02)   # conv N(0, .02), BN N(1, .02)
            if isinstance(m, nn.BatchNorm2d):
                nn.init.zeros_(m.bias)

    def forward(self, x):                                   # (B, 3, H, W) -> (B, 1, h, w) patch logits
        return self.main(x)


def vae_regulariser(x, recon, posterior, lpips, disc):
    """L_REG on images in [-1, 1], in float32 as the reference computes it (autocast off)."""
    with torch.autocast(x.device.type, enabled=False):
        x, recon = x.float(), recon.float()
        l1 = (x - recon).abs().mean()                       # / exp(logvar) with the reference's fixed logvar = 0
        lp = lpips(x, recon).mean()
        kl = posterior.kl().mean()
        gan = -disc(recon).mean()                           # generator loss, active from step 0
    return l1 + lp + 1e-6 * kl + 0.1 * gan, dict(l1=l1, lpips=lp, kl=kl, gan=gan)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


#################################################################################
#         SiT with BatchNorm latent normalisation and REPA projector(s)          #
#################################################################################
# The latent diffusion transformer (DiT architecture, velocity prediction). Its input BatchNorm
# (no affine, eps 1e-4) turns the VAE latent z into z_n; the projector reads block `encoder_depth`.

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos positions (MAE): first half encodes the column, second half the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    emb = [torch.cat([(p.flatten()[:, None] * omega).sin(), (p.flatten()[:, None] * omega).cos()], 1)
           for p in (cols, rows)]
    return torch.cat(emb, 1).float()                        # (grid*grid, dim)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)

    def forward(self, x):                                   # (N, C, H, W) -> (N, T, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.freq_dim = freq_dim

    def forward(self, t):                                   # (N,) in [0, 1], used as is (not x1000)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra 'null' row (index num_classes) for classifier-free guidance."""
    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y, train):
        if train and self.dropout_prob > 0:                 # label dropout teaches the unconditional model
            y = torch.where(torch.rand(y.shape[0], device=y.device) < self.dropout_prob, self.num_classes, y)
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        norm = (lambda: nn.LayerNorm(dim // num_heads)) if qk_norm else nn.Identity   # timm's qk_norm, --qk-norm
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x):                                   # (N, T, D)
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)   # flash kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):                                # (N, T, D), (N, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def projector(dim, projector_dim, z_dim):
    return nn.Sequential(nn.Linear(dim, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


class SiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, z_dims=(768,), encoder_depth=8,
                 projector_dim=2048, bn_momentum=0.1, qk_norm=False):
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            fail(f"--encoder-depth {encoder_depth} must be between 1 and the SiT depth {depth}")
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.num_classes, self.encoder_depth = patch_size, num_classes, encoder_depth
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.projectors = nn.ModuleList(projector(hidden_size, projector_dim, z) for z in z_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        # No affine parameters on purpose: an affine BN could shrink the latent scale and so "hack"
        # the diffusion loss. Running stats start from the VAE's latent statistics (init_bn).
        self.bn = nn.BatchNorm2d(in_channels, eps=1e-4, momentum=bn_momentum, affine=False)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight                     # patch embed initialised like a linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                   self.final_layer.linear]:
            nn.init.zeros_(m.weight)                        # adaLN-Zero: every block starts as identity
            nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_bn(self, latents_scale, latents_bias):
        """running_mean = bias, running_var = (1 / scale)^2: z_n = (z - bias) * scale before training."""
        self.bn.running_mean.copy_(latents_bias)
        self.bn.running_var.copy_((1 / latents_scale).pow(2))   # as released: scale.pow(-2) can differ by 1 ulp

    def latent_stats(self):
        """(scale, bias) to decode: z = z_n / scale + bias; read them from the EMA model."""
        return self.bn.running_var.rsqrt(), self.bn.running_mean

    def unpatchify(self, x):                                # (N, T, p*p*C) -> (N, C, H, W)
        N, T, _ = x.shape
        p, c, h = self.patch_size, self.out_channels, int(T ** 0.5)
        return x.reshape(N, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(N, c, h * p, h * p)

    def forward(self, x, t, y, mode="train"):
        """x: (N, C, H, W) noisy normalised latent x_t, t: (N,) in [0, 1], y: (N,) labels (num_classes = null).
        mode "train": (v, zs_tilde); "align": (None, zs_tilde), stopping after block encoder_depth
        (the VAE-update pass needs nothing deeper); "sample": (v, None), no projector."""
        x = self.x_embedder(x) + self.pos_embed             # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        zs_tilde = None
        for i, block in enumerate(self.blocks, 1):
            x = block(x, c)
            if i == self.encoder_depth and mode != "sample":
                zs_tilde = [proj(x) for proj in self.projectors]          # (N, T, z_dim) each
                if mode == "align":
                    return None, zs_tilde
        return self.unpatchify(self.final_layer(x, c)), zs_tilde


SiT_models = {f"SiT-{name}/{p}": functools.partial(SiT, depth=d, hidden_size=h, num_heads=k, patch_size=p)
              for name, (d, h, k) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                      "XL": (28, 1152, 16)}.items() for p in (1, 2, 4, 8)}


#################################################################################
#              Alignment target: frozen DINOv2 patch tokens via timm             #
#################################################################################
# L_REPA aligns SiT tokens with a pretrained visual encoder (REPA). DINOv2-B is the paper's
# default; timm's create_model(img_size=224) gives the same tokens as the torch.hub route.

DINOV2 = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}   # timm name, width
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_timm_name(enc_type):
    """'dinov2-vit-b' -> vit_base_patch14_dinov2.lvd142m; 'dinov2-vit-b-reg' -> the reg4 variant."""
    match = re.fullmatch(r"dinov2-vit-([sblg])(-reg)?", enc_type)
    if not match:
        fail(f"--enc-type '{enc_type}' is not one of dinov2-vit-{{s,b,l,g}} or dinov2-vit-{{s,b,l,g}}-reg")
    return f"vit_{DINOV2[match[1]][0]}_patch14{'_reg4' if match[2] else ''}_dinov2.lvd142m"


def load_encoder(enc_type, resolution, ckpt=None, random_weights=False, **overrides):
    """Frozen, eval-mode DINOv2 whose patch grid matches the SiT token grid (224 px for 256 px images)."""
    import timm
    from huggingface_hub import try_to_load_from_cache
    name = dinov2_timm_name(enc_type)
    kw = dict(img_size=resolution * 224 // 256, num_classes=0, **overrides)
    if ckpt:
        need_file(ckpt, "--enc-ckpt")
    if not ckpt and not random_weights and not isinstance(try_to_load_from_cache(f"timm/{name}", "model.safetensors"),
                                                          str) and not online():
        fail(f"DINOv2 weights timm/{name} are not in the Hugging Face cache and huggingface.co cannot be "
             f"reached; download model.safetensors once elsewhere and pass it with --enc-ckpt")
    try:
        enc = timm.create_model(name, pretrained=not random_weights or bool(ckpt), **kw,
                                **(dict(pretrained_cfg_overlay=dict(file=ckpt)) if ckpt else {}))
    except Exception as e:                                  # a local file of another model, or not a weights file
        if not ckpt:
            raise
        smoke = " (--smoke builds tiny encoders: drop it to load real weights)" * bool(overrides)
        fail(f"could not load '{ckpt}' as {name} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); --enc-ckpt "
             f"names one model.safetensors per --enc-type, in the same order{smoke}")
    return enc.eval().requires_grad_(False)


def online():
    """Checked before a hub call because timm's hub client retries for about a minute when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):   # as huggingface_hub reads it
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):    # only the hub client can try the proxy
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3.0).close()
        return True
    except OSError:
        return False


@torch.no_grad()
def encoder_targets(encoders, x):
    """x: uint8 (B, 3, H, W) -> [ (B, T, z_dim) ] patch tokens after the final norm, class/registers dropped."""
    x = torchvision.transforms.functional.normalize(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    x = F.interpolate(x, size=x.shape[-1] * 224 // 256, mode="bicubic")
    return [enc.forward_features(x)[:, enc.num_prefix_tokens:] for enc in encoders]


#################################################################################
#                    Losses: L_DIFF (velocity) and L_REPA (alignment)            #
#################################################################################
# x_t = alpha_t z_n + sigma_t eps with target v = d_alpha z_n + d_sigma eps (linear: v = eps - z_n);
# L_REPA = -cos(h_phi(SiT tokens), DINOv2 tokens), averaged over tokens, batch and encoders.

def interpolant(t, path_type):
    """(alpha_t, sigma_t, d alpha_t/dt, d sigma_t/dt) for the linear (default) or cosine path."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    a = math.pi / 2
    return torch.cos(a * t), torch.sin(a * t), -a * torch.sin(a * t), a * torch.cos(a * t)


def sample_t(n, weighting, path_type, device):
    """t ~ U(0, 1) (default) or log-normal sigma = exp(N(0, 1)) mapped to t, as in the reference."""
    if weighting == "uniform":
        return torch.rand(n, device=device)
    sigma = torch.randn(n, device=device).exp()
    return sigma / (1 + sigma) if path_type == "linear" else 2 / math.pi * torch.atan(sigma)


def noisy_input(z_n, t, eps, path_type):
    alpha, sigma, d_alpha, d_sigma = interpolant(t.view(-1, 1, 1, 1), path_type)
    return alpha * z_n + sigma * eps, d_alpha * z_n + d_sigma * eps      # x_t, v


def diffusion_loss(v_pred, v):                              # mean over C,H,W then batch, float32
    return (v_pred.float() - v.float()).pow(2).mean()


def repa_loss(zs_tilde, zs):
    """Negative cosine similarity; normalised in float32 because fp16 normalize is a known NaN source."""
    return torch.stack([-(F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1).mean()
                        for a, b in zip(zs_tilde, zs)]).mean()


#################################################################################
#               Sampling: the flow ODE from t = 1 (noise) to t = 0 (data)        #
#################################################################################
# The SiT predicts the velocity v of the interpolant above; integrating dx/dt = v backwards in t turns noise
# into a latent. Training previews use it; sample.py adds the SDE, DDP sharding and the .npz.

def guided(model, x, t, y, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, fn=lambda v, x, t: v, t_cfg=None):
    """fn(v, x, t) of the SiT's velocity at (x, t), with classifier-free guidance where t_cfg (default t) lies in
    [guidance_low, guidance_high]: uncond + s (cond - uncond), the null label being index num_classes. The
    unconditional pass runs only inside the interval, batched with the conditional one."""
    t_cfg = t if t_cfg is None else t_cfg
    use_cfg = cfg_scale > 1.0 and guidance_low <= t_cfg <= guidance_high
    x_in = torch.cat([x, x]) if use_cfg else x
    y_in = torch.cat([y, torch.full_like(y, model.num_classes)]) if use_cfg else y
    t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device)
    v = model(x_in.to(torch.float32), t_in.to(torch.float32), y_in, mode="sample")[0].to(torch.float64)
    d = fn(v, x_in, t_in.view(-1, 1, 1, 1))
    if use_cfg:
        d_cond, d_uncond = d.chunk(2)
        d = d_uncond + cfg_scale * (d_cond - d_uncond)
    return d


@torch.no_grad()
def euler_sampler(model, noise, y, num_steps=50, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, heun=False):
    """The flow ODE dx/dt = v from t = 1 (noise) to t = 0 (data): Euler on linspace(1, 0, N+1), in float64, with
    an optional Heun correction on all but the last step (guided iff the predictor's t lies in the interval)."""
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = noise.to(torch.float64)
    cfg = dict(cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1].tolist(), t_steps[1:].tolist())):
        d = guided(model, x, t_cur, y, **cfg)
        x_next = x + (t_next - t_cur) * d
        if heun and i < num_steps - 1:
            d_next = guided(model, x_next, t_next, y, **cfg, t_cfg=t_cur)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


def decode_latent(vae, z_n, scale, bias):
    """Images in [-1, 1] from a sampled normalised latent: z = z_n / scale + bias undoes the SiT's input BatchNorm."""
    return vae.decode(z_n.float() / scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))


#################################################################################
#                 The REPA-E step: VAE update, discriminator, SiT, EMA           #
#################################################################################
# One training step = three updates in this order (spec Sec. 2). The VAE sees L_REG + 1.5 L_REPA
# through a frozen eval-mode SiT; the SiT sees L_DIFF + 0.5 L_REPA on the detached latent.

@torch.no_grad()
def latent_diagnostics(z):
    """The paper's Table 1 probes of latent collapse: spatial variance (over H, W per image and channel,
    averaged) and total variation (sum of absolute neighbour differences per image, averaged)."""
    z = z.float()
    tv = (z[:, :, 1:] - z[:, :, :-1]).abs().sum((1, 2, 3)) + (z[..., 1:] - z[..., :-1]).abs().sum((1, 2, 3))
    return dict(latent_var=z.var(dim=(2, 3)).mean(), latent_tv=tv.mean())


@torch.no_grad()
def update_ema(ema, model, decay):
    """EMA of parameters and float buffers (the BN running stats define the sampling latent scale)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.lerp_(b, 1 - decay) if b.is_floating_point() else e.copy_(b)


def optimizer_step(loss, params, opt, m, args, sync):
    """backward of loss / K (K micro-batches per update, as accelerate scales it); after the last micro-batch
    also clip the grad norm and step. Returns the pre-clip norm as a tensor (no host sync), else None."""
    m.scaler.scale(loss / args.gradient_accumulation_steps).backward()
    if not sync:
        return None
    m.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    m.scaler.step(opt)
    opt.zero_grad(set_to_none=True)
    return norm


def repae_step(x, y, m, args, moments=None, sync=True):
    """x: uint8 images (B, 3, H, W), y: labels (B,), moments: a frozen VAE's cached posterior (mean, std) or None;
    m: models (m.*_ddp: their DDP wrappers), optimisers, grad scaler, m.mark (--benchmark's phase timer); sync=False:
    a micro-batch that only accumulates. Returns every loss and grad norm, detached. Switches: --freeze-vae (REPA,
    with --proj-coeff 0 vanilla SiT) and --no-stop-grad (the naive ablation: L_DIFF also reaches the VAE)."""
    amp = functools.partial(torch.autocast, x.device.type, dtype=m.amp_dtype, enabled=m.amp_dtype is not None)
    with amp():
        zs = encoder_targets(m.encoders, x)                 # 1. alignment targets, no grad
    m.mark("dinov2")
    x_vae = x.float() / 127.5 - 1
    logs = {}
    if moments is not None:                                 # cached posterior: train_ldm_only.py's sample_posterior
        mean, std = moments.float().chunk(2, dim=1)
        z = mean + std * torch.randn_like(mean)
    elif args.freeze_vae:
        with torch.no_grad(), amp():
            z = m.vae.encode(x_vae).sample()
    else:
        with amp():
            posterior, z, recon = m.vae_ddp(x_vae)          # 2. VAE forward, sampled latent z
    t = sample_t(z.shape[0], args.weighting, args.path_type, z.device)   # drawn once, reused in 5.
    eps = torch.randn_like(z)

    if not args.freeze_vae:
        # 3. VAE update. SiT frozen and in eval mode: its BN uses (and keeps) the running stats and
        # labels are not dropped. Only the alignment depth is run unless L_DIFF must reach the VAE too.
        m.sit.eval()
        requires_grad(m.sit_params, False)
        requires_grad(m.disc.parameters(), False)
        with amp():
            x_t, v = noisy_input(m.sit.bn(z), t, eps, args.path_type)
            v_pred, zs_tilde = m.sit(x_t, t, y, mode="align" if args.stop_grad else "train")
        l_reg, reg = vae_regulariser(x_vae, recon, posterior, m.lpips, m.disc)
        vae_repa = repa_loss(zs_tilde, zs)
        loss_vae = l_reg + args.vae_align_proj_coeff * vae_repa
        if not args.stop_grad:
            loss_vae = loss_vae + diffusion_loss(v_pred, v)
        logs["grad_norm_vae"] = optimizer_step(loss_vae, m.vae.parameters(), m.opt_vae, m, args, sync)
        requires_grad(m.sit_params, True)
        requires_grad(m.disc.parameters(), True)
        m.sit.train()
        m.mark("vae")
        # 4. Discriminator update: hinge loss, real and fake passes separately (batch statistics each).
        with torch.autocast(x.device.type, enabled=False):
            logits_real, logits_fake = m.disc_ddp(x_vae), m.disc_ddp(recon.detach().float())
            loss_disc = hinge_d_loss(logits_real, logits_fake)
        logs["grad_norm_disc"] = optimizer_step(loss_disc, m.disc.parameters(), m.opt_disc, m, args, sync)
        logs.update(loss_vae=loss_vae, vae_l_repa=vae_repa, **reg, loss_disc=loss_disc,
                    logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
        m.mark("discriminator")

    # 5. SiT update on z.detach(): the stop-gradient that keeps L_DIFF from collapsing the latents.
    # BN: batch statistics; with a frozen VAE the fixed latent statistics, as LDM-only training does.
    m.sit.bn.train(not args.freeze_vae)
    with amp():
        x_t, v = noisy_input(m.sit.bn(z.detach()), t, eps, args.path_type)
        v_pred, zs_tilde = m.sit_ddp(x_t, t, y)
        l_diff = diffusion_loss(v_pred, v)
        l_repa = repa_loss(zs_tilde, zs) if zs else torch.zeros((), device=x.device)
        loss_sit = l_diff + args.proj_coeff * l_repa
    logs["grad_norm_sit"] = optimizer_step(loss_sit, m.sit_params, m.opt, m, args, sync)
    if sync:
        # fp16 only: one loss-scale update per step for the three optimisers (PyTorch's AMP recipe; one scale across
        # the micro-batches), where the released code's accelerate updates it after each of the three steps.
        m.scaler.update()
        update_ema(m.ema, m.sit, args.ema_decay)            # 6. EMA of parameters and BN buffers
    m.mark("sit")
    logs.update(loss_sit=loss_sit, l_diff=l_diff, l_repa=l_repa, **latent_diagnostics(z.detach()))
    return {k: v.detach().float() for k, v in logs.items() if v is not None}


def train_step(batches, m, args, device):
    """One optimiser update from K micro-batches (--gradient-accumulation-steps, the semantics of accelerate's
    accumulate in the released code): gradients of each loss / K summed over the micro-batches, then clipped and
    applied once; DDP all-reduces only on the last micro-batch (no_sync before it). Returns the last one's logs."""
    for i, b in enumerate(batches):
        sync = i == len(batches) - 1
        with contextlib.ExitStack() as stack:
            for ddp in [] if sync else m.ddp:
                stack.enter_context(ddp.no_sync())
            x, y = b["x"].to(device, non_blocking=True), b["y"].to(device, non_blocking=True)
            moments = b["moments"].to(device, non_blocking=True) if "moments" in b else None
            logs = repae_step(x, y, m, args, moments, sync)
    if len(batches) > 1 and dist.is_initialized() and not isinstance(m.sit.bn, nn.SyncBatchNorm):
        # gloo has no SyncBatchNorm, and DDP broadcasts buffers only in a forward after a synced one: the last
        # micro-batch's BN update stayed on its rank. Rank 0's, as with one micro-batch, keeps the replicas equal.
        for buffer in [*m.sit.buffers(), *m.ema.buffers()]:
            dist.broadcast(buffer, 0)
    return logs


#################################################################################
#                  Building the models from the command line                     #
#################################################################################
# Pretrained pieces come from local paths or their hubs; --random-weights (implied by --smoke and
# --benchmark) builds with random weights every piece whose file is not given: no network call at all.

# --smoke: tiny versions of the named models (LPIPS a quarter as wide), so that a run takes minutes on a CPU
SMOKE = dict(sit=dict(hidden_size=64, num_heads=2, projector_dim=128), vae=dict(ch=32, num_res_blocks=1),
             encoder=dict(depth=2, embed_dim=64, num_heads=2))
AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # --mixed-precision: autocast on CUDA


def build_vae(args):
    if not getattr(args, "smoke", False):
        return vae_models[args.vae]()
    levels = len(vae_models[args.vae].keywords["ch_mult"])   # same depth and latent, narrow: f8d4 -> (1, 1, 2, 2)
    return vae_models[args.vae](**SMOKE["vae"], ch_mult=(1,) * (levels - 2) + (2, 2))


def load_vae(args):
    """build_vae with the --vae-ckpt weights; without that file (--random-weights) it stays random."""
    vae = build_vae(args)
    if args.vae_ckpt:
        state = load_file(args.vae_ckpt, "--vae-ckpt")
        if "vae" in state and "ema" in state:
            fail(f"--vae-ckpt '{args.vae_ckpt}' is a REPA-E training checkpoint; write its VAE with --export-vae "
                 f"{args.vae_ckpt} and pass the written e2e-*.pt with --vae-ckpt")
        load_state(vae, state, f"--vae-ckpt '{args.vae_ckpt}'",
                   "--vae-ckpt/--vae" + ", --smoke (it builds a tiny VAE)" * args.smoke)
    return vae


def build_sit(args, z_dims, vae):
    smoke = dict(SMOKE["sit"], depth=max(4, args.encoder_depth)) if getattr(args, "smoke", False) else {}
    return SiT_models[args.model](input_size=args.resolution // vae.factor, in_channels=vae.z_channels,
                                  num_classes=args.num_classes, class_dropout_prob=args.cfg_prob, z_dims=z_dims,
                                  encoder_depth=args.encoder_depth, bn_momentum=args.bn_momentum,
                                  qk_norm=getattr(args, "qk_norm", False), **smoke)


def encoder_types(args):
    """The alignment encoders; vanilla SiT (frozen VAE, no alignment) needs none, and no projector."""
    return [] if args.freeze_vae and args.proj_coeff == 0 else args.enc_type.split(",")


def build(args, device):
    """Every model, optimiser and the grad scaler of a run, on `device`, as a namespace for repae_step."""
    m = SimpleNamespace(mark=lambda phase: None, ddp=[], vae=load_vae(args))
    stats = args.latents_stats or (args.vae_ckpt and beside(args.vae_ckpt, "-latents-stats.pt"))
    c = m.vae.z_channels
    scale, bias = load_latent_stats(stats, c) if stats else (torch.ones(c), torch.zeros(c))
    enc_types = encoder_types(args)
    ckpts = args.enc_ckpt.split(",") if args.enc_ckpt else [None] * len(enc_types)
    m.encoders = [load_encoder(e, args.resolution, c, args.random_weights, **(SMOKE["encoder"] if args.smoke else {}))
                  .to(device) for e, c in zip(enc_types, ckpts)]
    m.sit = build_sit(args, [e.embed_dim for e in m.encoders], m.vae)
    tokens = (args.resolution // m.vae.factor // m.sit.patch_size) ** 2
    for e, name in zip(m.encoders, enc_types):
        if e.patch_embed.num_patches != tokens:
            fail(f"{name} gives {e.patch_embed.num_patches} tokens but the SiT has {tokens}; pick a --model "
                 f"patch size that matches the VAE ({args.vae}: SiT-*/2 for f8d4, SiT-*/1 for f16d32)")
    m.sit.init_bn(scale, bias)
    m.vae.to(device)
    m.sit.to(device)
    m.ema = copy.deepcopy(m.sit).requires_grad_(False).eval()
    # As the released train_repae.py, whose requires_grad(model, True) before every SiT update also switches
    # on the sin-cos pos_embed: in REPA-E runs it is trained, clipped and EMA'd like every SiT parameter. It is
    # switched on here, before DDP wraps the SiT, so that DDP averages its gradient (the released multi-GPU runs
    # wrapped it frozen and trained one pos_embed per GPU). train_ldm_only.py never unfreezes it.
    m.sit.pos_embed.requires_grad_(not args.freeze_vae)
    m.sit_params = [p for p in m.sit.parameters() if p.requires_grad]
    adamw = functools.partial(torch.optim.AdamW, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                              weight_decay=args.adam_weight_decay, fused=device.type == "cuda")
    m.opt = adamw(m.sit.parameters(), lr=args.learning_rate)
    if args.freeze_vae:
        m.vae.eval().requires_grad_(False)
    else:
        m.lpips = load_lpips(args.vgg_ckpt, args.lpips_ckpt, args.random_weights, 4 if args.smoke else 1).to(device)
        m.disc = NLayerDiscriminator()
        if args.disc_pretrained_ckpt:
            load_state(m.disc, load_file(args.disc_pretrained_ckpt, "--disc-pretrained-ckpt"),
                       "--disc-pretrained-ckpt", "--disc-pretrained-ckpt")
        m.disc.to(device)
        m.opt_vae = adamw(m.vae.parameters(), lr=args.vae_learning_rate)
        m.opt_disc = adamw(m.disc.parameters(), lr=args.disc_learning_rate)
    m.amp_dtype = AMP_DTYPES[args.mixed_precision] if device.type == "cuda" else None   # CPU: float32
    m.scaler = torch.amp.GradScaler(device.type, enabled=m.amp_dtype == torch.float16)
    m.vae.decoder.checkpointing = args.vae_checkpointing
    return m


def compile_blocks(m):
    """--compile, regionally: every instance of a repeated block type (SiT and DINOv2 blocks, the VAE's res and
    attention blocks) runs one compiled code object, so compile time is that of a few blocks, not of whole
    models; LPIPS and the discriminator are small and compiled whole. In place: state_dict keys stay official."""
    torch._dynamo.config.cache_size_limit = 64              # one static graph per block shape and grad mode
    blocks = [b for b in m.vae.modules() if isinstance(b, (ResnetBlock, AttnBlock))]
    for module in [*m.sit.blocks, *blocks, *(b for e in m.encoders for b in e.blocks)] + \
            ([m.lpips, m.disc] if hasattr(m, "disc") else []):
        module.compile(dynamic=False)                       # the VAE's levels differ in shape: no symbolic dims


def wrap_distributed(m, dist_env):
    """DDP wrappers for the three trained models. Passes that need no parameter gradient (the frozen
    SiT in the VAE update, the discriminator's generator pass) call the bare modules."""
    if dist_env.world > 1 and dist_env.device.type == "cuda":
        m.sit.bn = nn.SyncBatchNorm.convert_sync_batchnorm(m.sit.bn)     # BN statistics over the global batch
    ddp = (lambda mod: nn.parallel.DistributedDataParallel(mod, device_ids=dist_env.device_ids)) \
        if dist_env.world > 1 else (lambda mod: mod)
    m.sit_ddp = ddp(m.sit)
    if hasattr(m, "disc"):
        m.vae_ddp, m.disc_ddp = ddp(m.vae), ddp(m.disc)
    m.ddp = [w for w in (m.sit_ddp, getattr(m, "vae_ddp", None), getattr(m, "disc_ddp", None))
             if isinstance(w, nn.parallel.DistributedDataParallel)]
    return m


#################################################################################
#          Data: ImageFolder with the ADM centre crop, latent cache, smoke       #
#################################################################################
# ImageNet as class sub-folders, centre-cropped the ADM way to uint8 (3, R, R) tensors. The data
# order is a function of (seed, epoch), so a resumed run sees exactly the batches it would have.

def center_crop_arr(image, size):
    """ADM: halve with BOX while the short side >= 2 * size, BICUBIC-resize the short side, centre crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)     # PIL: unidentified, truncated, corrupt or huge


def load_image(path, size):
    with Image.open(path) as image:
        image = image.convert("RGB")
    return torch.from_numpy(center_crop_arr(image, size)).permute(2, 0, 1)   # uint8 (3, size, size)


class ImageFolder(torchvision.datasets.ImageFolder):
    """Items {x, y, skipped} and, from a latent cache, the image's posterior moments. An unreadable image is
    replaced by the next readable one and named in one warning line; `skipped` counts it in the log, so one
    broken file among a million neither stops a run nor goes unnoticed."""
    def __init__(self, root, size, cache=None):
        super().__init__(root, allow_empty=True)
        self.size, self.cache, self.moments = size, cache, None

    def __getitem__(self, i):
        for j in (k % len(self) for k in range(i, i + len(self))):
            try:
                x = load_image(self.samples[j][0], self.size)
                break
            except UNREADABLE as e:
                print(f"{os.path.basename(sys.argv[0])}: warning: skipped unreadable image '{self.samples[j][0]}' "
                      f"({e})", file=sys.stderr, flush=True)
        item = dict(x=x, y=self.targets[j], skipped=j != i)
        if self.cache:
            if self.moments is None:                        # opened in each worker: never pickle a memmap
                self.moments = np.load(self.cache + ".npy", mmap_mode="r")
            item["moments"] = torch.from_numpy(np.array(self.moments[j]))
        return item


class SmokeImages(torch.utils.data.Dataset):
    """Procedural class-conditional images, no download: class k is a disc of hue k/num_classes on a dark
    vertical gradient, at a seeded random place and size. Random weights + these images: not a benchmark."""
    def __init__(self, n, size, num_classes):
        self.n, self.size, self.num_classes = n, size, num_classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        y, g = i % self.num_classes, torch.Generator().manual_seed(i)
        hue = torch.tensor(y / self.num_classes * 2 * math.pi)
        color = 0.5 + 0.5 * torch.cos(hue - torch.tensor([0, 2.094, -2.094]))
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([0.5, 0.5, 0.2]) + torch.tensor([0.25, 0.25, 0.15])) \
            * self.size
        yy, xx = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        disc = (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2).float()
        image = disc * color[:, None, None] + (1 - disc) * (yy.float() / self.size * 0.3)
        return dict(x=(image * 255).round().to(torch.uint8), y=y, skipped=False)


def build_dataset(args):
    """The training images, checked up front as far as that is cheap on ImageNet: the folder layout, the classes,
    the first image decodes, and a latent cache matches this data, VAE and resolution."""
    if args.smoke and not args.data_dir:
        return SmokeImages(args.max_images or 256, args.resolution, args.num_classes)
    root = args.data_dir
    if not os.path.isdir(root) or not any(e.is_dir() for e in os.scandir(root)):
        fail(f"--data-dir '{root}' is not a folder with one sub-folder of images per class (an ImageFolder tree; "
             f"the released preprocessing.py's images.h5 is not read here)")
    cache = os.path.join(root, args.vae_latents_name) if args.vae_latents_name and not args.cache_latents else None
    ds = ImageFolder(root, args.resolution, cache)
    if len(ds) == 0 or len(ds.classes) > args.num_classes:
        fail(f"--data-dir '{root}' holds {len(ds)} images (.jpg, .png, ...) in {len(ds.classes)} class sub-folders "
             f"for --num-classes {args.num_classes}; it needs images, and no more classes than that")
    try:
        load_image(ds.samples[0][0], args.resolution)
    except UNREADABLE as e:
        fail(f"cannot read the first image '{ds.samples[0][0]}' ({e}); check that --data-dir holds image files")
    if cache:
        check_latent_cache(ds, args)
    if args.max_images:                                     # a spread-out subset that keeps every class
        ds = torch.utils.data.Subset(ds, np.linspace(0, len(ds) - 1, min(args.max_images, len(ds))).astype(int))
    if len(ds) < args.batch_size * args.gradient_accumulation_steps and not args.cache_latents:
        fail(f"the data has {len(ds)} images, fewer than one update (--batch-size {args.batch_size} x "
             f"--gradient-accumulation-steps {args.gradient_accumulation_steps})")
    return ds


def cache_meta(ds, args):
    """What a latent cache was made from: it serves only the same images, VAE weights and resolution."""
    need_file(args.vae_ckpt, "--vae-ckpt")                  # read here, before prepare_run checks the weights files
    weights = hashlib.sha1()
    with open(args.vae_ckpt, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            weights.update(chunk)
    files = hashlib.sha1("\n".join(os.path.relpath(p, ds.root) for p, _ in ds.samples).encode()).hexdigest()
    return dict(images=len(ds), files=files, vae=args.vae, vae_weights=weights.hexdigest(), resolution=args.resolution,
                smoke=args.smoke)


def check_latent_cache(ds, args):
    if not os.path.isfile(ds.cache + ".json"):
        fail(f"there is no latent cache '{ds.cache}.npy'; write it first with --cache-latents --vae-latents-name "
             f"{args.vae_latents_name} (same --data-dir and --vae-ckpt)")
    made, now = json.load(open(ds.cache + ".json")), cache_meta(ds, args)
    if made != now:
        fail(f"the latent cache '{ds.cache}.npy' was made with another "
             f"{'/'.join(k for k in now if made.get(k) != now[k])} ({made}); write a new one with --cache-latents "
             f"and another --vae-latents-name")
    if not np.load(ds.cache + ".done.npy").all():
        fail(f"the latent cache '{ds.cache}.npy' is incomplete; run the same --cache-latents command again to end it")


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (per-epoch reshuffle, drop_last) that can start mid-epoch for an exact resume."""
    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def data_loader(ds, args, dist_env):
    return torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size // dist_env.world, num_workers=args.num_workers, drop_last=True,
        sampler=ResumableSampler(ds, dist_env.world, dist_env.rank, shuffle=True, seed=args.seed, drop_last=True),
        pin_memory=dist_env.device.type == "cuda", persistent_workers=args.num_workers > 0,
        generator=torch.Generator())                        # its own seed draws: the global RNG stays exact


#################################################################################
#        Distributed setup, run folder, checkpoints (atomic, exact resume)       #
#################################################################################
# torchrun sets RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU; `python repae.py` is a world of one.
# A small gloo group carries control messages (stop flags, RNG states) without device syncs.

def init_distributed(deterministic=False, allow_tf32=True):
    env = lambda name, default: int(os.environ.get(name, default))     # set by torchrun
    world, rank, local_rank = env("WORLD_SIZE", 1), env("RANK", 0), env("LOCAL_RANK", 0)
    cuda, procs, gpus = torch.cuda.is_available(), env("LOCAL_WORLD_SIZE", 1), torch.cuda.device_count()
    if cuda and procs > gpus:
        fail(f"{procs} processes on this machine but {gpus} visible GPU(s): start one process per GPU "
             f"(torchrun --nproc_per_node={gpus}) or make more GPUs visible with CUDA_VISIBLE_DEVICES")
    if deterministic:                                       # --deterministic, set before any cuBLAS handle exists
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        for backend in ("flash", "mem_efficient", "cudnn"):   # their backward passes accumulate with atomics
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32   # --allow-tf32
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ctrl = None
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        atexit.register(leave_process_group)
        ctrl = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return SimpleNamespace(rank=rank, world=world, device=device, ctrl=ctrl, is_main=rank == 0,
                           device_ids=[local_rank] if cuda else None)


def leave_process_group():
    """At every exit, errors and crashes included: gloo's threads must be joined before interpreter teardown (one
    freeing a tensor there aborts with SIGABRT), but an error's frames still hold the process group: in a cycle
    through its exception, or a crash's traceback kept in sys.last_* for a debugger."""
    sys.last_exc = sys.last_type = sys.last_value = sys.last_traceback = None
    gc.collect()
    dist.destroy_process_group()


def checkpoint_gb(args):
    """The size of one checkpoint (SiT, EMA and the Adam moments; VAE and discriminator with theirs when
    trained), from the parameter counts of the models built on the meta device."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    with torch.device("meta"):
        vae = build_vae(args)
        sit = count(build_sit(args, [DINOV2[e.split("-")[2]][1] for e in encoder_types(args)], vae))
        trained = count(vae) if args.freeze_vae else 3 * (count(vae) + count(NLayerDiscriminator()))
    return 4 * (4 * sit + trained) / 2 ** 30


def prepare_run(args):
    """The weights files, the run folder <output-dir>/<exp-name> and the checkpoint to resume from, checked before any
    model is built: an earlier run is never overwritten (continue it with --resume), the folder must be writable and
    its disk must hold one more checkpoint. Returns (run_dir, checkpoint path or None)."""
    for flag in ("vae_ckpt", "latents_stats", "disc_pretrained_ckpt", "vgg_ckpt", "lpips_ckpt", "enc_ckpt"):
        for path in (getattr(args, flag) or "").split(","):     # every weights file named, before any is read
            if path:
                need_file(path, f"--{flag.replace('_', '-')}")
    run_dir = os.path.join(args.output_dir, args.exp_name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    found = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".pt")) if os.path.isdir(ckpt_dir) else []
    if not args.resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        fail(f"'{run_dir}' already holds a run{f' with checkpoints up to {found[-1]}' if found else ''}; continue "
             f"it with --resume auto, or start another with a new --exp-name")
    resume = (os.path.join(ckpt_dir, found[-1]) if found else None) if args.resume == "auto" else args.resume
    if resume and not os.path.isfile(resume):
        fail(f"checkpoint '{resume}' does not exist; name an existing one with --resume or --resume-step")
    if found and os.path.abspath(resume) != os.path.abspath(os.path.join(ckpt_dir, found[-1])):
        fail(f"'{run_dir}' holds a run with checkpoints up to {found[-1]}; continuing it from '{resume}' would mix two "
             f"histories: continue it with --resume auto, or start from '{resume}' with a new --exp-name")
    parent = run_dir
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            fail(f"'{parent}' is a file, so the run folder '{run_dir}' cannot be made there; pass another --output-dir")
        parent = os.path.dirname(parent) or "."
    if not os.access(parent, os.W_OK):
        fail(f"cannot write in '{parent}', where the run folder '{run_dir}' goes; pass a writable --output-dir")
    need, free = checkpoint_gb(args), shutil.disk_usage(parent).free / 2 ** 30
    if free < need:
        fail(f"one checkpoint of this run takes {need:.2f} GB but '{parent}' has {free:.2f} GB free; free some "
             f"space or pass another --output-dir")
    return run_dir, resume


def write_atomic(path, write):
    """write(f) into path.tmp, then rename: a crash or a full disk never leaves a truncated file. A full disk is an
    OSError, or torch.save's RuntimeError when it fills mid-file. Returns that error, its .tmp removed, or None."""
    try:
        with open(f"{path}.tmp", "wb") as f:
            write(f)
        os.replace(f"{path}.tmp", path)
    except (OSError, RuntimeError) as e:
        if os.path.lexists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")
        return e


def fail_together(error, dist_env):
    """Rank 0's write error (or None) stops every rank with its one sentence, exit status 1: a rank stopping alone
    leaves the others in a collective that ends in a traceback. The other ranks wait here for rank 0."""
    error = [error]
    if dist_env.world > 1:
        dist.broadcast_object_list(error, src=0, group=dist_env.ctrl)
    if error[0]:
        fail(error[0], code=1)


def save_checkpoint(path, m, args, step, dist_env):
    """Official REPA-E keys plus what an exact resume needs (every rank's RNG, the grad scaler), written atomically
    (write_atomic); a write error stops every rank with one sentence."""
    rng = dict(cpu=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state(dist_env.device) if dist_env.device.type == "cuda" else None)
    rngs = [rng] + [None] * (dist_env.world - 1)
    if dist_env.world > 1:
        dist.all_gather_object(rngs, rng, group=dist_env.ctrl)
    error = None
    if dist_env.is_main:
        ckpt = dict(model=m.sit.state_dict(), ema=m.ema.state_dict(), vae=m.vae.state_dict(), opt=m.opt.state_dict(),
                    args=args, steps=step, rng=rngs, scaler=m.scaler.state_dict())
        if not args.freeze_vae:
            ckpt.update(discriminator=m.disc.state_dict(), opt_vae=m.opt_vae.state_dict(),
                        opt_disc=m.opt_disc.state_dict())
        e = write_atomic(path, lambda f: torch.save(ckpt, f))
        if e:
            error = f"could not write checkpoint '{path}' ({e}); the earlier checkpoints are intact: free some " \
                    f"space, then continue with --resume auto"
    fail_together(error, dist_env)


def load_checkpoint(path, m, args, dist_env):
    """This project's or a released REPA-E checkpoint. Returns (step, exact): exact when every rank's RNG state
    could be restored (same world size), so that the resumed run is bitwise the uninterrupted one."""
    ckpt = load_file(path, "--resume")
    models = dict(model=m.sit, ema=m.ema, vae=m.vae, **({} if args.freeze_vae else dict(discriminator=m.disc)))
    optimisers = dict(opt=m.opt, **({} if args.freeze_vae else dict(opt_vae=m.opt_vae, opt_disc=m.opt_disc)))
    missing = [k for k in [*models, *optimisers, "steps"] if k not in ckpt]
    if missing:
        fail(f"'{path}' lacks {missing}; it is not a training checkpoint of this configuration")
    for key, model in models.items():
        load_state(model, ckpt[key], f"the {key} weights in '{path}'", "--resume and the model flags")
    for key, opt in optimisers.items():
        opt.load_state_dict(ckpt[key])
    if "scaler" in ckpt:                                    # released checkpoints have no scaler and no RNG states
        m.scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt.get("rng")
    if rngs and len(rngs) == dist_env.world:                # exact: every rank continues its own stream
        torch.set_rng_state(rngs[dist_env.rank]["cpu"])
        if rngs[dist_env.rank]["cuda"] is not None and dist_env.device.type == "cuda":
            torch.cuda.set_rng_state(rngs[dist_env.rank]["cuda"], dist_env.device)
        return ckpt["steps"], True
    torch.manual_seed(args.seed + dist_env.rank + ckpt["steps"])   # other world size: continue, not bitwise
    return ckpt["steps"], False


#################################################################################
#                                 Training loop                                  #
#################################################################################
# DiT-style: one process per GPU, a run folder with args.json, log.txt, metrics.jsonl, checkpoints/ and samples/.
# Exit status: 0 done, or stopped by SIGTERM/SIGINT after its checkpoint; 1 the run went wrong; 2 bad input.

def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20      # Linux reports KiB


def save_grid(images, nrow, path):
    """images in [-1, 1], (N, 3, H, W) -> one PNG grid."""
    grid = torchvision.utils.make_grid(((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu(),
                                       nrow=nrow, padding=2)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


@torch.no_grad()
def write_previews(m, x, step, sample_dir, noise, labels):
    """EMA samples (Euler ODE, 50 steps, CFG 4.0: the reference's preview sampler, which it runs on the online SiT)
    and VAE reconstructions."""
    z_n = euler_sampler(m.ema, noise, labels, num_steps=50, cfg_scale=4.0)
    images = decode_latent(m.vae, z_n, *m.ema.latent_stats())
    save_grid(images, int(math.sqrt(len(noise))), f"{sample_dir}/{step:07d}-samples.png")
    x_vae = x[:8].float() / 127.5 - 1
    recon = m.vae.decode(m.vae.encode(x_vae).mode())
    save_grid(torch.cat([x_vae, recon]), len(x_vae), f"{sample_dir}/{step:07d}-recon.png")


class Monitor:
    """The periodic work of a run, kept out of the training loop: log.txt and metrics.jsonl (values leave the device
    only at log steps), the non-finite check, EMA previews, checkpoints, and the preemption signals."""
    def __init__(self, args, dist_env, run_dir, m, step, last):
        self.args, self.d, self.m, self.step0, self.last, self.saved, self.logged, self.skipped = \
            args, dist_env, m, step, last, step, step, 0
        self.ckpt_dir, self.sample_dir = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "samples")
        self.metrics, error = os.path.join(run_dir, "metrics.jsonl"), None
        if dist_env.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            os.makedirs(self.sample_dir, exist_ok=True)
            if not os.path.exists(os.path.join(run_dir, "args.json")):
                with open(os.path.join(run_dir, "args.json"), "w") as f:
                    json.dump(vars(args), f, indent=2)
            if os.path.exists(self.metrics):                # a resumed run keeps one row per step
                # a row without its newline was cut short (a full disk) after the last checkpoint: dropped
                rows = [r for r in open(self.metrics) if r.endswith("\n") and json.loads(r)["step"] <= step]
                e = write_atomic(self.metrics, lambda f: f.writelines(r.encode() for r in rows))
                if e:
                    error = f"could not rewrite '{self.metrics}' ({e}); free some space, then continue with " \
                            f"--resume auto"
            self.file = open(os.path.join(run_dir, "log.txt"), "a")
        fail_together(error, dist_env)
        # SIGTERM/SIGINT: finish the step, checkpoint, exit 0. The handler holds the list, not self: outliving the
        # run, a handler holding the models would keep the process group alive past leave_process_group
        self.stop = stop = []
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: stop.append(True))
        g, latent = torch.Generator().manual_seed(args.seed), args.resolution // m.vae.factor   # fixed previews
        self.noise = torch.randn(16, m.sit.in_channels, latent, latent, generator=g).to(dist_env.device)
        self.labels = torch.randint(0, args.num_classes, (16,), generator=g).to(dist_env.device)
        self.bad_step, self.bad_vals = torch.full((), -1, device=dist_env.device), None
        self.t0 = self.t_log = time.time()

    def log(self, msg):
        if self.d.is_main:
            print(msg, flush=True)
            print(msg, file=self.file, flush=True)

    def after_step(self, step, logs, micro):
        """After every update (micro: its K batches); True when a preemption signal asks the run to stop (a checkpoint
        is written)."""
        self.vals, self.keys = torch.stack(list(logs.values())), list(logs)
        fp16 = self.m.scaler.is_enabled()    # an overflowing gradient is then the grad scaler's: it skips that update
        checked = torch.stack([v for k, v in logs.items() if not (fp16 and k.startswith("grad_norm"))])
        new_bad = (self.bad_step < 0) & ~checked.isfinite().all()      # on the device: no host sync per step
        self.bad_step = torch.where(new_bad, step, self.bad_step)
        self.bad_vals = torch.where(new_bad, self.vals, self.vals if self.bad_vals is None else self.bad_vals)
        self.skipped += sum(int(b["skipped"].sum()) for b in micro)
        if step % self.args.log_every == 0:
            self.write_metrics(step)
        if self.d.is_main and self.args.sample_every and step % self.args.sample_every == 0:
            write_previews(self.m, micro[-1]["x"].to(self.d.device), step, self.sample_dir, self.noise, self.labels)
        stop = torch.tensor([float(bool(self.stop))])
        if self.d.world > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self.d.ctrl)
        if step % self.args.checkpointing_steps == 0 or stop.item():
            self.checkpoint(step)
        return bool(stop.item())

    def check_finite(self):                                 # collective: every rank stops together
        first = self.bad_step.clone()
        if self.d.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        if first.item() >= 0:
            names = [f"{k}={v}" for k, v in zip(self.keys, self.bad_vals.tolist()) if not math.isfinite(v)]
            kept = f"the last good checkpoint is kept in {self.ckpt_dir}, resume from it with --resume auto" \
                if os.listdir(self.ckpt_dir) else "no checkpoint was written before it"
            fail(f"non-finite loss or gradient at step {int(first)}: {', '.join(names) or 'on another rank'}; "
                 f"{kept}, and lower the learning rate", code=1)

    def write_metrics(self, step):
        self.check_finite()
        vals, skipped = self.vals.clone(), torch.tensor(self.skipped)      # skipped: this rank's count, summed
        if self.d.world > 1:
            dist.all_reduce(vals)
            dist.all_reduce(skipped, group=self.d.ctrl)
            vals /= self.d.world
        now, args, ema_bn = time.time(), self.args, self.m.ema.bn
        rate = (step - self.logged) / (now - self.t_log)
        rec = dict(step=step, **dict(zip(self.keys, vals.tolist())), bn_mean=ema_bn.running_mean.mean().item(),
                   bn_var=ema_bn.running_var.mean().item(), skipped_images=skipped.item(),
                   img_per_s=rate * args.batch_size * args.gradient_accumulation_steps, steps_per_s=rate,
                   peak_mem_gb=peak_memory_gb(self.d.device), elapsed_s=now - self.t0,
                   eta_s=(self.last - step) / rate)
        error = None
        if self.d.is_main:
            try:                                            # a full disk: a resume drops the row it cut short
                self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
                with open(self.metrics, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                error = f"could not append to the run's log.txt and metrics.jsonl ({e}); free some space, then " \
                        f"continue with --resume auto"
        fail_together(error, self.d)
        self.t_log, self.logged = now, step

    def checkpoint(self, step):
        self.check_finite()
        path = os.path.join(self.ckpt_dir, f"{step:07d}.pt")
        save_checkpoint(path, self.m, self.args, step, self.d)
        self.saved = step
        self.log(f"saved checkpoint {path}")

    def finish(self, step, stopped):
        """The last step's metrics and checkpoint, unless already written at that step."""
        if self.logged != step:
            self.write_metrics(step)
        if self.saved != step:
            self.checkpoint(step)
        self.log(f"stopped by signal at step {step}; continue with --resume auto" if stopped else
                 f"done: steps {self.step0} to {step} in {time.time() - self.t0:.1f}s")


def setup(args, dist_env, resume=None):
    """Models on every rank from the same seed (DDP then agrees from step 0, EMA and random-weight
    encoders included), then each rank reseeded for its own t, noise and label drops. Returns
    (models, step, exact): exact is False when a resume could not restore every rank's RNG."""
    torch.manual_seed(args.seed)
    m = build(args, dist_env.device)
    torch.manual_seed(args.seed + dist_env.rank)
    step, exact = load_checkpoint(resume, m, args, dist_env) if resume else (0, True)
    return wrap_distributed(m, dist_env), step, exact


def main(args):
    """Each update takes K micro-batches from the loader (train_step); Monitor does the periodic work."""
    dist_env = init_distributed(args.deterministic, args.allow_tf32)
    dataset = build_dataset(args)
    run_dir, resume = prepare_run(args)
    m, step, exact = setup(args, dist_env, resume)
    loader, K = data_loader(dataset, args, dist_env), args.gradient_accumulation_steps
    last = min(args.max_train_steps, args.epochs * (len(loader) // K))   # whichever limit comes first
    if step >= last:
        say("note", f"'{resume}' is at step {step}, the last of --max-train-steps {args.max_train_steps} and --epochs "
                    f"{args.epochs}: nothing to do")
        return
    if args.compile:
        compile_blocks(m)
    mon = Monitor(args, dist_env, run_dir, m, step, last)
    mon.log(f"SiT parameters: {sum(p.numel() for p in m.sit.parameters()):,} ({'smoke-size ' * args.smoke}"
            f"{args.model}); VAE: {sum(p.numel() for p in m.vae.parameters()):,}; {len(dataset):,} "
            f"{'procedural smoke' if isinstance(dataset, SmokeImages) else 'training'} images; {dist_env.world} "
            f"processes on {dist_env.device.type}; precision {m.amp_dtype or torch.float32}; update batch "
            f"{args.batch_size * K} ({K} x {args.batch_size})" + (" (random weights)" * args.random_weights))
    if resume:
        mon.log(f"resumed from {resume} at step {step}" + ("" if exact else " (other world size: not bitwise)"))
    epoch, start = divmod(step, len(loader) // K)
    stopped = False
    while not stopped and step < last:
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = start * K * loader.batch_size
        micro = []
        for batch in loader:
            micro.append(batch)
            if len(micro) == K:
                step += 1
                stopped = mon.after_step(step, train_step(micro, m, args, dist_env.device), micro)
                micro = []
                if stopped or step >= last:
                    break
        epoch, start = epoch + 1, 0
    mon.finish(step, stopped)


#################################################################################
#            Other modes: E2E-VAE export, latent cache, benchmark                #
#################################################################################
# --export-vae keeps the tuned VAE for a new SiT (paper Sec. 4.3); --cache-latents encodes the data once for
# frozen-VAE training (the released cache_latents.py); --benchmark times the step on synthetic data.

def export_vae(args):
    """--export-vae CKPT: the end-to-end-tuned VAE (E2E-VAE) of a REPA-E checkpoint in the released layout
    (save_vae_weights.py): <output-dir>/e2e-<vae>-<step>.pt, its -latents-stats.pt from the EMA SiT's BN buffers,
    and its -discriminator-ckpt.pt."""
    ckpt = load_file(args.export_vae, "--export-vae")
    if "vae" not in ckpt or "ema" not in ckpt:
        fail(f"'{args.export_vae}' has no 'vae' and 'ema' entries; export needs an end-to-end (REPA-E) checkpoint")
    run = ckpt.get("args", args)                            # the run's VAE type; ours or a released checkpoint
    if getattr(run, "freeze_vae", False):
        fail(f"'{args.export_vae}' comes from a frozen-VAE run, whose VAE is the unchanged {run.vae_ckpt}; "
             f"export the checkpoint of an end-to-end run")
    vae = build_vae(run)
    load_state(vae, ckpt["vae"], f"the VAE in '{args.export_vae}'", "--export-vae")
    var, mean = ckpt["ema"]["bn.running_var"], ckpt["ema"]["bn.running_mean"]
    path = os.path.join(args.output_dir, f"e2e-{run.vae}-{ckpt.get('steps', 0):07d}.pt")
    if os.path.exists(path):
        fail(f"'{path}' already exists (an earlier export, maybe of another run); pass another --output-dir")
    os.makedirs(args.output_dir, exist_ok=True)
    stats = dict(latents_scale=var.rsqrt().view(1, -1, 1, 1), latents_bias=mean.view(1, -1, 1, 1))
    files = [(beside(path, "-latents-stats.pt"), stats), (path, vae.state_dict())]   # the VAE last: a whole export
    if "discriminator" in ckpt:
        files.insert(0, (beside(path, "-discriminator-ckpt.pt"), ckpt["discriminator"]))
    for file, obj in files:
        e = write_atomic(file, lambda f: torch.save(obj, f))
        if e:
            fail(f"could not write '{file}' ({e}); free some space and export again", code=1)
    print(f"wrote {path} and its -latents-stats.pt; train a new SiT on it with --freeze-vae --vae-ckpt {path}")


@torch.no_grad()
def cache_latents(args):
    """--cache-latents: one pass over --data-dir that stores every image's posterior moments cat(mean, std) as the
    released cache_latents.py, here in <data-dir>/<name>.npy (float32 (N, 2C, h, w), a memmap) with <name>.json (what
    made it) and <name>.done.npy (one flag per image). Each process fills its share of batches; a rerun, with any
    --pproc-batch-size, redoes only the batches that hold an image not done, so a killed pass resumes."""
    dist_env = init_distributed(args.deterministic, args.allow_tf32)
    ds, base, B = build_dataset(args), os.path.join(args.data_dir, args.vae_latents_name), args.pproc_batch_size
    meta, n = cache_meta(ds, args), len(ds)
    vae = load_vae(args).to(dist_env.device).eval()
    begun, h = os.path.exists(base + ".json"), args.resolution // vae.factor    # the .json marks a pass begun
    if begun and json.load(open(base + ".json")) != meta:
        fail(f"'{base}.npy' holds the latents of another VAE, resolution or image folder; pick another "
             f"--vae-latents-name (or delete {base}.*)")
    # the .npy is sparse: what a killed pass wrote is on disk, only the rest needs room
    shape, have = (n, 2 * vae.z_channels, h, h), os.stat(base + ".npy").st_blocks * 512 if begun else 0
    need, free = (4 * math.prod(shape) - have) / 2 ** 30, shutil.disk_usage(args.data_dir).free / 2 ** 30
    if free < need:                                         # a memmap write to a full disk dies of SIGBUS, unsaid
        fail(f"the latent cache '{base}.npy' needs {need:.3g} GB more but '{args.data_dir}' has {free:.3g} GB free; "
             f"free some space there")
    error = None
    if dist_env.is_main and not begun:
        np.lib.format.open_memmap(base + ".npy", "w+", np.float32, shape).flush()
        np.lib.format.open_memmap(base + ".done.npy", "w+", np.uint8, (n,)).flush()
        e = write_atomic(base + ".json", lambda f: f.write(json.dumps(meta).encode()))
        if e:
            error = f"could not write '{base}.json' ({e}); free some space and run --cache-latents again"
    fail_together(error, dist_env)                          # the other ranks open the files only once they exist
    moments, done = np.load(base + ".npy", mmap_mode="r+"), np.load(base + ".done.npy", mmap_mode="r+")
    todo = [b for b in range(dist_env.rank, math.ceil(n / B), dist_env.world) if not done[b * B:b * B + B].all()]
    loader = torch.utils.data.DataLoader(ds, B, sampler=[i for b in todo for i in range(b * B, min(n, b * B + B))],
                                         num_workers=args.num_workers, pin_memory=dist_env.device.type == "cuda")
    t0 = time.time()
    for k, (b, batch) in enumerate(zip(todo, loader), 1):
        q = vae.encode(batch["x"].to(dist_env.device).float() / 127.5 - 1)
        moments[b * B:b * B + len(batch["x"])] = torch.cat([q.mean, q.std], 1).cpu().numpy()
        moments.flush()
        done[b * B:b * B + len(batch["x"])] = 1             # flagged only once its rows are on disk
        done.flush()
        if dist_env.is_main and (k % 50 == 0 or k == len(todo)):
            print(f"cached {k}/{len(todo)} batches of this process, {k * B / (time.time() - t0):.1f} images/s",
                  flush=True)
    if dist_env.world > 1:
        dist.barrier(group=dist_env.ctrl)
    if dist_env.is_main:
        print(f"wrote {base}.npy: {n} images' posterior moments; train with --vae-latents-name {args.vae_latents_name}")


def count_flops(fn, *args):
    """The matmul and convolution FLOPs of fn(*args), forward and backward, as FlopCounterMode counts them; with the
    math attention kernel, whose matmuls it counts on every device (it knows no formula for the CPU flash one)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        fn(*args)
    return counter.get_total_flops()


# dense bf16 peak of the GPUs (TFLOP/s) for --benchmark's MFU; the first name contained in the device's wins
PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312, "B200": 2250}


def benchmark(args):
    """--benchmark N: the configured models with random weights on synthetic batches. The FLOPs of one uncompiled
    step are counted for the MFU; then warm-up (compile) and N timed steps with a device sync at each phase
    boundary. Rank 0 prints the figures, and the graphs compiled during the timed steps (recompiles)."""
    dist_env = init_distributed(args.deterministic, args.allow_tf32)
    device, local_bs, n = dist_env.device, args.batch_size // dist_env.world, args.benchmark
    m = setup(args, dist_env)[0]
    x = torch.randint(0, 256, (local_bs, 3, args.resolution, args.resolution), dtype=torch.uint8, device=device)
    y = torch.randint(0, args.num_classes, (local_bs,), device=device)
    flops, t_warmup = count_flops(repae_step, x, y, m, args), time.perf_counter()
    if args.compile:
        compile_blocks(m)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, last, graphs = {}, [0.0], torch._dynamo.utils.counters["stats"]

    def mark(phase):
        sync()
        now = time.perf_counter()
        times.setdefault(phase, []).append(now - last[0])
        last[0] = now
    m.mark, warmup = mark, 3 if args.compile else 2
    for i in range(warmup + n):
        if i == warmup:
            times.clear()
            t_warmup, compiled = time.perf_counter() - t_warmup, graphs["unique_graphs"]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        sync()
        last[0] = time.perf_counter()
        repae_step(x, y, m, args)
    steps = torch.tensor([sum(ts) for ts in zip(*times.values())]) * 1000
    step_s = steps.median().item() / 1000
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)),
                                    None) if device.type == "cuda" else args.peak_tflops
    if dist_env.is_main:
        print(f"benchmark: {'smoke-size ' * args.smoke}{args.model} + {args.vae}, {args.resolution}px, global batch "
              f"{args.batch_size}, {dist_env.world} process(es) on {device.type}, precision "
              f"{m.amp_dtype or torch.float32}, compile {'on' if args.compile else 'off'}, {n} timed steps")
        print(f"step_time_ms: median {steps.median():.1f} min {steps.min():.1f} max {steps.max():.1f}")
        print(f"images_per_s: {args.batch_size / step_s:.2f}")
        print(f"peak_memory_gb: {peak_memory_gb(device):.2f} "
              f"({'CUDA max allocated' if device.type == 'cuda' else 'peak RSS'})")
        for phase, ts in times.items():
            print(f"time_{phase}_ms: median {1000 * torch.tensor(ts).median():.1f}")
        print(f"flops_per_step: {flops / 1e12:.4f} TFLOP per process; achieved {flops / step_s / 1e12:.2f} TFLOP/s")
        print(f"mfu: {100 * flops / step_s / (peak * 1e12):.1f}% of {peak} TFLOP/s dense bf16" if peak else
              "mfu: n/a (no known peak for this device; pass --peak-tflops)")
        print(f"warmup_s: {t_warmup:.1f} ({warmup} steps{', compile included' * args.compile}); graphs compiled: "
              f"{compiled}, of which during the timed steps (recompiles): {graphs['unique_graphs'] - compiled}")


#################################################################################
#                                Command line                                    #
#################################################################################
# Flag names follow the released train_repae.py, train_ldm_only.py and cache_latents.py, so their commands
# carry over. Defaults are the paper's headline run: SiT-XL/2 on SD-VAE (f8d4), DINOv2-B, depth 8, 0.5 / 1.5.

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (see fail), not the whole usage text; exact flag names only."""
    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def at_least(n):
    def number(text):                                       # argparse names it in "invalid number value"
        if int(text) < n:
            raise argparse.ArgumentTypeError(f"must be at least {n}, got {text}")
        return int(text)
    return number


# configs/l1_lpips_kl_gan.yaml of the released code: the L_REG that vae_regulariser computes
RELEASED_LOSS_CFG = dict(quantize_mode="vae", discriminator_start=0, discriminator_factor=1, discriminator_weight=0.1,
                         quantizer_weight=1, perceptual_loss="lpips", perceptual_weight=1, reconstruction_loss="l1",
                         reconstruction_weight=1, lecam_regularization_weight=0, kl_weight=1e-6, logvar_init=0)


def check_loss_cfg(path):
    """--loss-cfg-path is accepted when it is the released config (its leaf `key: value` lines), refused otherwise."""
    if not os.path.isfile(path):
        fail(f"--loss-cfg-path '{path}' does not exist; drop the flag, the released L1 + LPIPS + KL + GAN is built in")
    for line in open(path):
        key, _, value = (part.strip().strip("'\"") for part in line.split("#")[0].partition(":"))
        number = value.replace(".", "", 1).replace("e-", "", 1).isdigit()
        if value and RELEASED_LOSS_CFG.get(key, object()) != (float(value) if number else value):
            fail(f"--loss-cfg-path '{path}' sets {key}: {value}, but this implementation computes only the released "
                 f"configs/l1_lpips_kl_gan.yaml ({RELEASED_LOSS_CFG}); drop the flag or change the code")


def parse_args(argv=None, check=True):
    """The flags of a run; check=False: as given, with neither refusals nor derived defaults (sample.py's defaults)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = Parser(description="REPA-E: end-to-end training of a VAE and a latent diffusion transformer")
    a, on_off, trackers = p.add_argument, argparse.BooleanOptionalAction, "accepted: metrics go to the run folder"
    a("--data-dir", help="ImageFolder tree, one sub-folder per class; default: data (--smoke: procedural images)")
    a("--max-images", type=at_least(1), help="train on a spread-out subset of this many images")
    a("--resolution", type=at_least(32), default=256)
    a("--num-classes", type=at_least(1), default=1000)
    a("--model", default="SiT-XL/2", choices=list(SiT_models))
    a("--vae", "--vae-arch", default="f8d4", choices=list(vae_models))
    a("--vae-ckpt", "--vae-ckpt-path", help="VAE weights; f8d4 default: pretrained/sdvae/sdvae-f8d4.pt")
    a("--latents-stats", help="latent statistics; default: <vae-ckpt>-latents-stats.pt")
    a("--disc-pretrained-ckpt", "--disc-ckpt", help="discriminator weights; random init if absent")
    a("--vgg-ckpt", help="torchvision VGG16 weights for LPIPS; default: downloaded once")
    a("--lpips-ckpt", help="LPIPS heads (taming vgg.pth); default: downloaded once")
    a("--enc-type", default="dinov2-vit-b", help="alignment encoder(s), comma separated: dinov2-vit-{s,b,l,g}[-reg]")
    a("--enc-ckpt", help="local timm model.safetensors for each --enc-type (offline clusters)")
    a("--encoder-depth", type=at_least(1), default=8, help="SiT block whose tokens are aligned (8 for L/XL)")
    a("--proj-coeff", type=float, default=0.5, help="weight of L_REPA in the SiT loss")
    a("--vae-align-proj-coeff", type=float, default=1.5, help="weight of L_REPA in the VAE loss")
    a("--bn-momentum", type=float, default=0.1)
    a("--qk-norm", action=on_off, default=False, help="LayerNorm on queries and keys (timm's qk_norm)")
    a("--fused-attn", action=on_off, default=True, help="attention by scaled_dot_product_attention (always on)")
    a("--cfg-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    a("--path-type", default="linear", choices=["linear", "cosine"])
    a("--prediction", default="v", choices=["v"], help="velocity prediction, the released code's only choice")
    a("--weighting", default="uniform", choices=["uniform", "lognormal"], help="distribution of t")
    a("--freeze-vae", action="store_true", help="keep the VAE frozen: REPA (and vanilla SiT with --proj-coeff 0)")
    a("--stop-grad", action=on_off, default=True, help="--no-stop-grad: L_DIFF reaches the VAE (the naive ablation)")
    a("--vae-latents-name", help="train a frozen-VAE SiT on <data-dir>/<name>.npy from --cache-latents")
    a("--loss-cfg-path", help="accepted when it is the released configs/l1_lpips_kl_gan.yaml")
    a("--batch-size", type=at_least(1), default=256, help="images per micro-batch over all processes")
    a("--gradient-accumulation-steps", type=at_least(1), default=1, help="micro-batches per optimiser update")
    for flag, value in (("--learning-rate", 1e-4), ("--vae-learning-rate", 1e-4), ("--disc-learning-rate", 1e-4),
                        ("--adam-beta1", 0.9), ("--adam-beta2", 0.999), ("--adam-weight-decay", 0.0),
                        ("--adam-epsilon", 1e-8), ("--max-grad-norm", 1.0), ("--ema-decay", 0.9999)):
        a(flag, type=float, default=value)
    a("--max-train-steps", type=at_least(1), default=400_000)
    a("--epochs", type=at_least(1), default=1400, help="stop after this many passes over the data, if earlier")
    a("--checkpointing-steps", type=at_least(1), default=50_000)
    a("--log-every", type=at_least(1), default=100)
    a("--sample-every", "--sampling-steps", type=at_least(0), default=10_000, help="preview grids; 0: none")
    a("--output-dir", help="parent of the run folder; default: exps")
    a("--exp-name", help="run folder name; default derived from the configuration")
    a("--resume", help="'auto' (latest checkpoint of this run) or a checkpoint path")
    a("--resume-step", type=at_least(1), help="resume from checkpoints/<step>.pt of --continue-train-exp-dir")
    a("--continue-train-exp-dir", help="the run folder --resume-step reads; default: this run's")
    for flag in ("--report-to", "--logging-dir", "--wandb-history-path"):
        a(flag, help=f"{trackers}'s metrics.jsonl and log.txt")
    a("--mixed-precision", default="bf16", choices=list(AMP_DTYPES), help="autocast dtype on CUDA (CPU: fp32)")
    a("--allow-tf32", action=on_off, default=True)
    a("--deterministic", action="store_true", help="deterministic CUDA kernels: a resumed run is bitwise exact on GPUs")
    a("--seed", type=int, default=0)
    a("--num-workers", type=at_least(0), default=min(4, len(os.sched_getaffinity(0))))
    a("--random-weights", action="store_true", help="random weights for every pretrained piece whose file is not given")
    a("--compile", action=on_off, default=False, help="torch.compile the repeated blocks of every network")
    a("--vae-checkpointing", action="store_true", help="recompute VAE decoder activations in backward (saves memory)")
    a("--smoke", action="store_true", help="tiny random-weight models on procedural images (or --data-dir): a check")
    a("--export-vae", metavar="CKPT", help="write the tuned VAE of a REPA-E checkpoint to --output-dir")
    a("--cache-latents", action="store_true", help="store the posterior of every --data-dir image, then stop")
    a("--pproc-batch-size", type=at_least(1), help="images per process and batch of --cache-latents; default 128")
    a("--benchmark", type=at_least(0), default=0, metavar="N", help="time N steps on synthetic data, random weights")
    a("--peak-tflops", type=float, help="the GPU's dense bf16 peak for the MFU of --benchmark")
    if "--smoke" in argv:                                   # its defaults; flags given still win
        p.set_defaults(resolution=64, num_classes=None, batch_size=8, max_train_steps=40, checkpointing_steps=20,
                       log_every=10, sample_every=20, num_workers=0, encoder_depth=2, exp_name="smoke")
    args = p.parse_args(argv)
    return check_args(args, p) if check else args


def check_args(args, p):
    """Every combination that cannot work is refused here, before a model is built or a file written; the defaults
    that depend on other flags are filled in. Returns args."""
    args.random_weights = args.random_weights or args.smoke or bool(args.benchmark)
    if args.vae_ckpt is None and not args.random_weights:
        if args.vae != "f8d4":
            p.error(f"--vae {args.vae} needs its weights: pass --vae-ckpt (e.g. pretrained/vavae/vavae-f16d32.pt)")
        args.vae_ckpt = "pretrained/sdvae/sdvae-f8d4.pt"
    if args.vae_latents_name and not args.cache_latents and not args.freeze_vae:
        say("note", "--vae-latents-name trains on the cached latents of a frozen VAE: it stays frozen (--freeze-vae)")
        args.freeze_vae = True
    world, n_enc = int(os.environ.get("WORLD_SIZE", 1)), len(args.enc_type.split(","))   # WORLD_SIZE: torchrun
    refusals = [
        (args.freeze_vae and not args.stop_grad, "--no-stop-grad sends L_DIFF into the VAE, which --freeze-vae keeps "
                                                 "frozen; use one of them"),
        (args.proj_coeff == 0 and not args.freeze_vae, "--proj-coeff 0 leaves the projector untrained, so L_REPA "
                                                       "cannot guide the VAE; use it with --freeze-vae (vanilla SiT)"),
        (not args.fused_attn, "--no-fused-attn selects timm's unfused attention, which computes the same values; this "
                              "implementation always uses scaled_dot_product_attention, drop the flag"),
        (args.batch_size % world and not args.cache_latents, f"--batch-size {args.batch_size} is global and not "
                                                             f"divisible by the {world} processes"),
        (args.resolution % 32, f"--resolution {args.resolution} must be a multiple of 32 (VAE x SiT patch x DINOv2 "
                               f"grid)"),
        (args.enc_ckpt and len(args.enc_ckpt.split(",")) != n_enc, f"--enc-ckpt must name one file per --enc-type "
                                                                   f"encoder ({n_enc})"),
        (args.resume and args.resume_step, "--resume and --resume-step both name the checkpoint to continue from; "
                                           "give one"),
        (args.continue_train_exp_dir and not args.resume_step, "--continue-train-exp-dir names the run to continue; "
                                                               "say which checkpoint with --resume-step"),
        (args.cache_latents and (not args.vae_latents_name or not args.vae_ckpt or args.output_dir or args.max_images),
         "--cache-latents writes <data-dir>/<name>.npy next to the images, where training reads it: it needs "
         "--vae-latents-name and --vae-ckpt, and takes no --output-dir or --max-images"),
        (args.freeze_vae and (args.disc_pretrained_ckpt or args.vgg_ckpt or args.lpips_ckpt),
         "--disc-pretrained-ckpt, --vgg-ckpt and --lpips-ckpt are weights of L_REG, which a frozen VAE (--freeze-vae) "
         "never computes; drop them"),
        (args.pproc_batch_size and not args.cache_latents, "--pproc-batch-size is the batch of --cache-latents; "
                                                           "training uses --batch-size"),
        (args.vae_latents_name and not args.vae_ckpt, "--vae-latents-name names a cache of one VAE's latents; name "
                                                      "its weights with --vae-ckpt"),
        (sum(map(bool, (args.export_vae, args.cache_latents, args.benchmark, args.resume or args.resume_step))) > 1,
         "--export-vae, --cache-latents, --benchmark and training (--resume, --resume-step) are separate runs; "
         "give one")]
    for refused, why in refusals:
        if refused:
            p.error(why)
    for e in args.enc_type.split(","):
        dinov2_timm_name(e)
    if args.loss_cfg_path:
        check_loss_cfg(args.loss_cfg_path)
    if args.report_to or args.logging_dir or args.wandb_history_path:
        say("note", "--report-to, --logging-dir and --wandb-history-path are accepted, but this implementation has no "
                    "experiment trackers: metrics go to the run folder's metrics.jsonl and log.txt; the run continues")
    args.output_dir = args.output_dir or "exps"
    if args.cache_latents and args.pproc_batch_size is None:
        args.pproc_batch_size = 128                         # the released cache_latents.py's default
    if args.data_dir is None and (args.cache_latents or not args.smoke):
        args.data_dir = "data"                              # the released scripts' default
    if args.num_classes is None:                            # --smoke: the classes of --data-dir, else 10
        args.num_classes = sum(e.is_dir() for e in os.scandir(args.data_dir)) if args.data_dir and \
            os.path.isdir(args.data_dir) else 10
    if args.exp_name is None:
        mode = "vanilla" if args.freeze_vae and args.proj_coeff == 0 else "repa" if args.freeze_vae else \
            "repae" if args.stop_grad else "repae-nostopgrad"
        args.exp_name = f"{args.model.replace('/', '-')}-{args.vae}-{mode}-{args.resolution}"
    if args.resume_step:
        run = args.continue_train_exp_dir or os.path.join(args.output_dir, args.exp_name)
        args.resume = os.path.join(run, "checkpoints", f"{args.resume_step:07d}.pt")
    return args


if __name__ == "__main__":
    args = parse_args()
    export_vae(args) if args.export_vae else cache_latents(args) if args.cache_latents else \
        benchmark(args) if args.benchmark else main(args)
