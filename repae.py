"""
REPA-E: end-to-end tuning of a VAE together with a latent diffusion transformer (arXiv 2504.10483).

The whole recipe in one file, in the order of the paper's method section:
  VAE tokenizer -> L_REG (the VAE's own losses) -> SiT with BatchNorm latent normalisation
  -> DINOv2 alignment target -> L_DIFF and L_REPA -> the REPA-E step -> data -> training loop -> CLI.
The rule that makes end-to-end tuning work: L_REPA updates the VAE and the SiT, L_DIFF updates the
SiT only (stop-gradient on the latent), and L_REG keeps the VAE a good autoencoder.

  torchrun --nproc_per_node=8 repae.py --data-dir /imagenet/train --vae-ckpt pretrained/sdvae/sdvae-f8d4.pt
  python repae.py --smoke            # tiny random-weight run of the whole pipeline on a CPU
"""
import argparse
import copy
import functools
import json
import math
import os
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


def fail(msg):
    """Stop with one sentence that says what is wrong and what to do (no stack trace)."""
    raise SystemExit(f"error: {msg}")


def load_file(path, flag):
    """torch.load a weights file safely; the pickled argparse.Namespace of REPA-E checkpoints is allowed."""
    if not path or not os.path.isfile(path):
        fail(f"weights file '{path}' does not exist; pass the right path with {flag}")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and stop, never continue with it
        fail(f"could not read '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
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
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


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


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):                                   # asymmetric pad, as the LDM checkpoints expect
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def res_attn(level, i, h):
    """Block i of a resolution level, followed by its attention where the level has one."""
    h = level.block[i](h)
    return level.attn[i](h) if len(level.attn) else h


def mid_block(c):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, z_channels, attn_levels, num_res_blocks):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down, c = nn.ModuleList(), ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c, ch * mult))
                c = ch * mult
                if i in attn_levels:
                    level.attn.append(AttnBlock(c))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = mid_block(c)
        self.norm_out, self.conv_out = Normalize(c), nn.Conv2d(c, 2 * z_channels, 3, 1, 1)

    def forward(self, x):                                   # (B, 3, H, W) -> (B, 2z, H/f, W/f)
        h = self.conv_in(x)
        for level in self.down:
            for i in range(len(level.block)):
                h = res_attn(level, i, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, z_channels, attn_levels, num_res_blocks):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, 1, 1)
        self.mid = mid_block(c)
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
                if i in attn_levels:
                    level.attn.append(AttnBlock(c))
            if i != 0:
                level.upsample = Upsample(c)
            self.up.insert(0, level)                        # up[0] is the full-resolution level
        self.norm_out, self.conv_out = Normalize(c), nn.Conv2d(c, 3, 3, 1, 1)

    checkpointing = False                                   # --vae-checkpointing: recompute activations

    def forward(self, z):                                   # (B, z, h, w) -> (B, 3, h*f, w*f)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i in range(len(level.block)):
                if self.checkpointing and torch.is_grad_enabled():
                    h = torch.utils.checkpoint.checkpoint(res_attn, level, i, h, use_reentrant=False)
                else:
                    h = res_attn(level, i, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
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


def load_latent_stats(path):
    """Per-channel latent statistics saved next to a VAE checkpoint: the BatchNorm's starting point."""
    stats = load_file(path, "--latents-stats")
    if not {"latents_scale", "latents_bias"} <= set(stats):
        fail(f"'{path}' has no latents_scale/latents_bias; pass the VAE's -latents-stats.pt with --latents-stats")
    return stats["latents_scale"].flatten().float(), stats["latents_bias"].flatten().float()


#################################################################################
#          L_REG: the VAE regulariser (L1 + LPIPS + KL + GAN), PatchGAN          #
#################################################################################
# Keeps the VAE a good autoencoder while L_REPA reshapes its latents (paper Sec. 3.3):
# L_REG = L1 + LPIPS + 1e-6 KL + 0.1 GAN, the discriminator trained with the hinge loss.

LPIPS_HEADS_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"   # taming vgg.pth


class LPIPS(nn.Module):
    """Zhang et al. 2018 perceptual distance in the taming layout: VGG16 cut after relu1_2..relu5_3,
    unit-normalised features, squared difference, learned 1x1 heads (keys lin0.model.1.weight ...)."""
    def __init__(self):
        super().__init__()
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])   # vgg16().features
        self.slices = nn.ModuleList(features[a:b] for a, b in ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)))
        self.heads = nn.ModuleDict({
            f"lin{i}": nn.Sequential(OrderedDict(model=nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))))
            for i, c in enumerate((64, 128, 256, 512, 512))})
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):                             # frozen, always eval (dropout slots off)
        return super().train(False)

    def forward(self, x, y):                                # (B, 3, H, W) each -> (B,)
        # Faithful to the released code: it maps inputs with 2x-1 as if they were in [0, 1], but the
        # step passes images in [-1, 1], so LPIPS sees [-3, 1]. The published checkpoints come from this.
        x, y = (((2 * v - 1) - self.shift) / self.scale for v in (x, y))
        d = 0
        for block, head in zip(self.slices, self.heads.values()):
            x, y = block(x), block(y)
            nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + head((nx - ny) ** 2).mean(dim=(1, 2, 3))
        return d


def load_lpips(vgg_ckpt=None, heads_ckpt=None, random_weights=False):
    lpips = LPIPS()
    if random_weights:
        return lpips
    vgg = load_file(vgg_ckpt or fetch(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url,
                                      "vgg16-397923af.pth", "--vgg-ckpt"), "--vgg-ckpt")
    features = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
    for i, (a, b) in enumerate(((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))):
        load_state(lpips.slices[i], {f"{int(k.split('.')[0]) - a}.{k.split('.')[1]}": v for k, v in features.items()
                                     if a <= int(k.split(".")[0]) < b}, "the VGG16 weights", "--vgg-ckpt")
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
        layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
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
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):                                   # (N, T, D)
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)         # flash / memory-efficient kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
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
                 projector_dim=2048, bn_momentum=0.1):
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
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
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
        self.bn.running_var.copy_(latents_scale.pow(-2))

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

DINOV2 = {"s": "small", "b": "base", "l": "large", "g": "giant"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_timm_name(enc_type):
    """'dinov2-vit-b' -> vit_base_patch14_dinov2.lvd142m; 'dinov2-vit-b-reg' -> the reg4 variant."""
    parts = enc_type.split("-")
    if len(parts) not in (3, 4) or parts[:2] != ["dinov2", "vit"] or parts[2] not in DINOV2 or parts[3:] not in ([], ["reg"]):
        fail(f"--enc-type '{enc_type}' is not one of dinov2-vit-{{s,b,l,g}} or dinov2-vit-{{s,b,l,g}}-reg")
    return f"vit_{DINOV2[parts[2]]}_patch14{'_reg4' if parts[3:] else ''}_dinov2.lvd142m"


def load_encoder(enc_type, resolution, ckpt=None, random_weights=False, **overrides):
    """Frozen, eval-mode DINOv2 whose patch grid matches the SiT token grid (224 px for 256 px images)."""
    import timm
    name = dinov2_timm_name(enc_type)
    kw = dict(img_size=resolution * 224 // 256, num_classes=0, **overrides)
    if random_weights:
        enc = timm.create_model(name, pretrained=False, **kw)
    elif ckpt:
        if not os.path.isfile(ckpt):
            fail(f"DINOv2 weights '{ckpt}' do not exist; pass the timm model.safetensors of {name} with --enc-ckpt")
        enc = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt), **kw)
    else:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache(f"timm/{name}", "model.safetensors"), str)
        if not cached and (os.environ.get("HF_HUB_OFFLINE") or not reachable("huggingface.co")):
            fail(f"DINOv2 weights timm/{name} are not in the Hugging Face cache and huggingface.co cannot be "
                 f"reached; download model.safetensors once elsewhere and pass it with --enc-ckpt")
        enc = timm.create_model(name, pretrained=True, **kw)
    return enc.eval().requires_grad_(False)


def reachable(host, port=443, timeout=3.0):
    """Checked before a hub call because timm's hub client retries for about a minute when offline."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
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
    half_pi = math.pi / 2
    return torch.cos(half_pi * t), torch.sin(half_pi * t), -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t)


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


def optimizer_step(loss, params, opt, scaler, max_norm):
    """backward, clip the grad norm, step; returns the pre-clip norm as a tensor (no host sync)."""
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)
    opt.zero_grad(set_to_none=True)
    return norm


def repae_step(x, y, m, args):
    """x: uint8 images (B, 3, H, W), y: labels (B,). m holds the models, their DDP wrappers (m.*_ddp,
    the module itself when not distributed), the optimisers, the grad scaler and m.mark, a phase
    timer for --benchmark (a no-op otherwise). Returns detached
    tensors: every loss and grad norm. Switches: --freeze-vae (REPA; with --proj-coeff 0, vanilla SiT)
    and --no-stop-grad (the naive end-to-end ablation, L_DIFF also reaches the VAE)."""
    amp = functools.partial(torch.autocast, x.device.type, dtype=m.amp_dtype, enabled=m.amp_dtype is not None)
    with amp():
        zs = encoder_targets(m.encoders, x)                 # 1. alignment targets, no grad
    m.mark("dinov2")
    x_vae = x.float() / 127.5 - 1
    logs = {}
    if args.freeze_vae:
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
        logs["grad_norm_vae"] = optimizer_step(loss_vae, m.vae.parameters(), m.opt_vae, m.scaler, args.max_grad_norm)
        requires_grad(m.sit_params, True)
        requires_grad(m.disc.parameters(), True)
        m.sit.train()
        m.mark("vae")
        # 4. Discriminator update: hinge loss, real and fake passes separately (batch statistics each).
        with torch.autocast(x.device.type, enabled=False):
            logits_real, logits_fake = m.disc_ddp(x_vae), m.disc_ddp(recon.detach().float())
            loss_disc = hinge_d_loss(logits_real, logits_fake)
        logs["grad_norm_disc"] = optimizer_step(loss_disc, m.disc.parameters(), m.opt_disc, m.scaler,
                                                args.max_grad_norm)
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
    logs["grad_norm_sit"] = optimizer_step(loss_sit, m.sit_params, m.opt, m.scaler, args.max_grad_norm)
    m.scaler.update()
    update_ema(m.ema, m.sit, args.ema_decay)                # 6. EMA of parameters and BN buffers
    m.mark("sit")
    logs.update(loss_sit=loss_sit, l_diff=l_diff, l_repa=l_repa, **latent_diagnostics(z.detach()))
    return {k: v.detach().float() for k, v in logs.items()}


#################################################################################
#                  Building the models from the command line                     #
#################################################################################
# Pretrained pieces come from local paths or their hubs; --random-weights (implied by --smoke and
# --benchmark) builds every piece with random weights, which makes no network call at all.

# --smoke: tiny shapes, so that train, checkpoint, preview and resume run on a laptop CPU in minutes.
SMOKE = dict(vae=dict(ch=32, ch_mult=(1, 1, 2, 2), z_channels=4, num_res_blocks=1),
             sit=dict(depth=4, hidden_size=64, num_heads=2, patch_size=2, projector_dim=128),
             encoder=dict(depth=2, embed_dim=64, num_heads=2))


def build_vae(args):
    return AutoencoderKL(**SMOKE["vae"]) if getattr(args, "smoke", False) else vae_models[args.vae]()


def build_sit(args, z_dims, vae):
    kw = dict(input_size=args.resolution // vae.factor, in_channels=vae.z_channels, num_classes=args.num_classes,
              class_dropout_prob=args.cfg_prob, z_dims=z_dims, encoder_depth=args.encoder_depth,
              bn_momentum=args.bn_momentum)
    return SiT(**SMOKE["sit"], **kw) if getattr(args, "smoke", False) else SiT_models[args.model](**kw)


def build(args, device):
    """Every model, optimiser and the grad scaler of a run, on `device`, as a namespace for repae_step."""
    m = SimpleNamespace()
    m.vae = build_vae(args)
    if args.random_weights:
        scale, bias = torch.ones(m.vae.z_channels), torch.zeros(m.vae.z_channels)
    else:
        load_state(m.vae, load_file(args.vae_ckpt, "--vae-ckpt"), f"--vae-ckpt '{args.vae_ckpt}'", "--vae-ckpt/--vae")
        scale, bias = load_latent_stats(args.latents_stats or args.vae_ckpt.replace(".pt", "-latents-stats.pt"))
    m.vae.to(device)
    # vanilla SiT (frozen VAE, no alignment) needs no encoder and no projector
    enc_types = [] if args.freeze_vae and args.proj_coeff == 0 else args.enc_type.split(",")
    ckpts = args.enc_ckpt.split(",") if args.enc_ckpt else [None] * len(enc_types)
    if len(ckpts) != len(enc_types):
        fail(f"--enc-ckpt names {len(ckpts)} file(s) for {len(enc_types)} --enc-type encoder(s); give one per encoder")
    m.encoders = [load_encoder(e, args.resolution, c, args.random_weights, **(SMOKE["encoder"] if args.smoke else {}))
                  .to(device) for e, c in zip(enc_types, ckpts)]
    m.sit = build_sit(args, [e.embed_dim for e in m.encoders], m.vae)
    tokens = (args.resolution // m.vae.factor // m.sit.patch_size) ** 2
    for e, name in zip(m.encoders, enc_types):
        if e.patch_embed.num_patches != tokens:
            fail(f"{name} gives {e.patch_embed.num_patches} tokens but the SiT has {tokens}; pick a --model "
                 f"patch size that matches the VAE ({args.vae}: SiT-*/2 for f8d4, SiT-*/1 for f16d32)")
    m.sit.init_bn(scale.to(device), bias.to(device))
    m.sit.to(device)
    m.ema = copy.deepcopy(m.sit).requires_grad_(False).eval()
    m.sit_params = [p for p in m.sit.parameters() if p.requires_grad]      # pos_embed stays frozen
    adamw = functools.partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                              fused=device.type == "cuda")
    m.opt = adamw(m.sit.parameters(), lr=args.learning_rate)
    if args.freeze_vae:
        m.vae.eval().requires_grad_(False)
    else:
        m.lpips = load_lpips(args.vgg_ckpt, args.lpips_ckpt, args.random_weights).to(device)
        m.disc = NLayerDiscriminator()
        if args.disc_pretrained_ckpt:
            load_state(m.disc, load_file(args.disc_pretrained_ckpt, "--disc-pretrained-ckpt"),
                       "--disc-pretrained-ckpt", "--disc-pretrained-ckpt")
        m.disc.to(device)
        m.opt_vae = adamw(m.vae.parameters(), lr=args.vae_learning_rate)
        m.opt_disc = adamw(m.disc.parameters(), lr=args.disc_learning_rate)
    use_amp = device.type == "cuda" and args.mixed_precision != "no"
    m.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision] if use_amp else None
    m.scaler = torch.amp.GradScaler(device.type, enabled=m.amp_dtype == torch.float16)
    m.mark = lambda phase: None
    if args.compile:                                        # in place: state_dict keys stay official
        for module in [m.sit, m.vae.encoder, m.vae.decoder, *m.encoders] + ([] if args.freeze_vae else [m.lpips, m.disc]):
            module.compile()
    m.vae.decoder.checkpointing = args.vae_checkpointing
    return m


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
    return m


#################################################################################
#                Data: ImageFolder with the ADM centre crop, or smoke images     #
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


def load_image(path, size):
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as e:
        raise RuntimeError(f"cannot read image file '{path}' ({e}); remove or replace it") from e
    return torch.from_numpy(center_crop_arr(image, size)).permute(2, 0, 1)   # uint8 (3, size, size)


class SmokeImages(torch.utils.data.Dataset):
    """Procedural class-conditional images, no download: class k is a disc of hue k/num_classes on a
    dark vertical gradient, at a random position and radius. Random weights + these images: not a benchmark."""
    def __init__(self, n, size, num_classes):
        self.n, self.size, self.num_classes = n, size, num_classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        y = i % self.num_classes
        hue = torch.tensor(y / self.num_classes * 2 * math.pi)
        color = 0.5 + 0.5 * torch.stack([torch.cos(hue), torch.cos(hue - 2.094), torch.cos(hue + 2.094)])
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([0.5, 0.5, 0.2]) + torch.tensor([0.25, 0.25, 0.15])) * self.size
        yy, xx = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        disc = (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2).float()
        background = (yy.float() / self.size * 0.3)[None].expand(3, -1, -1)
        image = disc * color[:, None, None] + (1 - disc) * background
        return (image * 255).round().to(torch.uint8), y


def build_dataset(args):
    if args.smoke and not args.data_dir:
        return SmokeImages(args.max_images or 256, args.resolution, args.num_classes)
    if not args.data_dir or not os.path.isdir(args.data_dir):
        fail(f"--data-dir '{args.data_dir}' is not a folder; point it at an ImageFolder tree (one sub-folder per class)")
    if not any(e.is_dir() for e in os.scandir(args.data_dir)):
        fail(f"--data-dir '{args.data_dir}' has no class sub-folders; it must hold one folder of images per class")
    ds = torchvision.datasets.ImageFolder(args.data_dir, loader=functools.partial(load_image, size=args.resolution),
                                          allow_empty=True)
    if len(ds) == 0:
        fail(f"--data-dir '{args.data_dir}' holds no images (.jpg, .png, ...) in its class sub-folders")
    if len(ds.classes) > args.num_classes:
        fail(f"--data-dir has {len(ds.classes)} classes but --num-classes is {args.num_classes}")
    if args.max_images:                                     # a spread-out subset that keeps every class
        ds = torch.utils.data.Subset(ds, np.linspace(0, len(ds) - 1, min(args.max_images, len(ds))).astype(int).tolist())
    return ds


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (per-epoch reshuffle, drop_last) that can start mid-epoch for an exact resume."""
    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


#################################################################################
#        Distributed setup, checkpoints (atomic, exact resume), logging          #
#################################################################################
# torchrun sets RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU; `python repae.py` is a world of one.
# A small gloo group carries control messages (stop flags, RNG states) without device syncs.

def init_distributed():
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ctrl = None
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        ctrl = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return SimpleNamespace(rank=rank, world=world, device=device, ctrl=ctrl, is_main=rank == 0,
                           device_ids=[local_rank] if cuda else None)


def rng_state(device):
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def save_checkpoint(path, m, args, step, dist_env):
    """Official REPA-E keys plus what an exact resume needs; written to a temporary file, then renamed."""
    rngs = [rng_state(dist_env.device)]
    if dist_env.world > 1:
        rngs = [None] * dist_env.world
        dist.all_gather_object(rngs, rng_state(dist_env.device), group=dist_env.ctrl)
    if not dist_env.is_main:
        return
    ckpt = dict(model=m.sit.state_dict(), ema=m.ema.state_dict(), vae=m.vae.state_dict(), opt=m.opt.state_dict(),
                args=args, steps=step, rng=rngs, scaler=m.scaler.state_dict())
    if not args.freeze_vae:
        ckpt.update(discriminator=m.disc.state_dict(), opt_vae=m.opt_vae.state_dict(), opt_disc=m.opt_disc.state_dict())
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)                                   # a crash mid-write never leaves a truncated latest


def find_resume(args, ckpt_dir):
    if args.resume != "auto":
        return args.resume
    found = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".pt")) if os.path.isdir(ckpt_dir) else []
    return os.path.join(ckpt_dir, found[-1]) if found else None


def load_checkpoint(path, m, args, dist_env):
    ckpt = load_file(path, "--resume")
    missing = [k for k in ("model", "ema", "vae", "opt", "steps") + (() if args.freeze_vae else ("discriminator",))
               if k not in ckpt]
    if missing:
        fail(f"'{path}' lacks {missing}; it is not a training checkpoint of this configuration")
    load_state(m.sit, ckpt["model"], f"the SiT in '{path}'", "--resume/--model")
    load_state(m.ema, ckpt["ema"], f"the EMA SiT in '{path}'", "--resume/--model")
    m.opt.load_state_dict(ckpt["opt"])
    load_state(m.vae, ckpt["vae"], f"the VAE in '{path}'", "--resume/--vae")
    if not args.freeze_vae:
        load_state(m.disc, ckpt["discriminator"], f"the discriminator in '{path}'", "--resume")
        m.opt_vae.load_state_dict(ckpt["opt_vae"])
        m.opt_disc.load_state_dict(ckpt["opt_disc"])
    if "scaler" in ckpt:
        m.scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt.get("rng")
    if rngs and len(rngs) == dist_env.world:                # exact: every rank continues its own stream
        torch.set_rng_state(rngs[dist_env.rank]["cpu"])
        if rngs[dist_env.rank]["cuda"] is not None and dist_env.device.type == "cuda":
            torch.cuda.set_rng_state(rngs[dist_env.rank]["cuda"], dist_env.device)
        return ckpt["steps"], True
    torch.manual_seed(args.seed + dist_env.rank + ckpt["steps"])   # other world size: continue, not bitwise
    return ckpt["steps"], False


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20      # Linux reports KiB


def to_uint8_grid(images, nrow):
    """images in [-1, 1], (N, 3, H, W) -> uint8 HWC grid."""
    grid = torchvision.utils.make_grid(((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu(),
                                       nrow=nrow, padding=2)
    return grid.permute(1, 2, 0).numpy()


@torch.no_grad()
def write_previews(m, x, step, sample_dir, noise, labels):
    """EMA samples (Euler ODE, 50 steps, CFG 4.0 as the reference's previews) and VAE reconstructions."""
    from sample import euler_sampler                        # the samplers live in sample.py
    z_n = euler_sampler(m.ema, noise, labels, num_steps=50, cfg_scale=4.0)
    scale, bias = m.ema.latent_stats()
    images = m.vae.decode((z_n.float() / scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)))
    Image.fromarray(to_uint8_grid(images, nrow=int(math.sqrt(len(images))))).save(f"{sample_dir}/{step:07d}-samples.png")
    x_vae = x[:8].float() / 127.5 - 1
    recon = m.vae.decode(m.vae.encode(x_vae).mode())
    Image.fromarray(to_uint8_grid(torch.cat([x_vae, recon]), nrow=len(x_vae))).save(f"{sample_dir}/{step:07d}-recon.png")


#################################################################################
#                                 Training loop                                  #
#################################################################################
# DiT-style: one process per GPU, a run folder with args.json, log.txt, metrics.jsonl, checkpoints/
# and samples/. Values leave the device only at log steps; preemption signals end with a checkpoint.

def setup(args, dist_env, resume=None):
    """Models on every rank from the same seed (DDP then agrees from step 0, EMA and random-weight
    encoders included), then each rank reseeded for its own t, noise and label drops. Returns
    (models, step, exact): exact is False when a resume could not restore every rank's RNG."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32
    torch.manual_seed(args.seed)
    m = build(args, dist_env.device)
    torch.manual_seed(args.seed + dist_env.rank)
    step, exact = 0, True
    if resume:
        step, exact = load_checkpoint(resume, m, args, dist_env)
    else:
        update_ema(m.ema, m.sit, decay=0.0)
    return wrap_distributed(m, dist_env), step, exact


def main(args):
    dist_env = init_distributed()
    device = dist_env.device
    local_bs = args.batch_size // dist_env.world
    run_dir = os.path.join(args.output_dir, args.exp_name)
    ckpt_dir, sample_dir = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "samples")

    dataset = build_dataset(args)
    if len(dataset) < args.batch_size:
        fail(f"the data has {len(dataset)} images, fewer than one global batch (--batch-size {args.batch_size})")
    sampler = ResumableSampler(dataset, num_replicas=dist_env.world, rank=dist_env.rank, shuffle=True,
                               seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=local_bs, sampler=sampler, num_workers=args.num_workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
        generator=torch.Generator())                        # its own seed draws: the global RNG stays exact
    steps_per_epoch = len(sampler) // local_bs

    resume = find_resume(args, ckpt_dir) if args.resume else None
    m, step, exact = setup(args, dist_env, resume)

    log = print if dist_env.is_main else (lambda *a, **k: None)
    if dist_env.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        os.makedirs(sample_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        log_file = open(os.path.join(run_dir, "log.txt"), "a")
        log = lambda *a: [print(*a, flush=True), print(*a, file=log_file, flush=True)]
    if args.smoke:
        log("SMOKE RUN: random weights for every network and procedural images; the numbers are not a benchmark.")
    log(f"SiT parameters: {sum(p.numel() for p in m.sit.parameters()):,}; VAE: "
        f"{sum(p.numel() for p in m.vae.parameters()):,}; {len(dataset):,} images; {dist_env.world} processes on "
        f"{device.type}; precision {m.amp_dtype or torch.float32}")
    if resume:
        log(f"resumed from {resume} at step {step}" + ("" if exact else " (other world size: RNG reseeded, not bitwise)"))

    stop = []                                               # preemption: finish the step, checkpoint, exit 0
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.append(True))
    g = torch.Generator().manual_seed(args.seed)            # fixed preview noise and labels
    latent = args.resolution // m.vae.factor
    preview_noise = torch.randn(16, m.sit.in_channels, latent, latent, generator=g).to(device)
    preview_labels = torch.randint(0, args.num_classes, (16,), generator=g).to(device)
    bad_step, bad_vals, keys = torch.full((), -1, device=device), None, None
    t0, t_log, step_log = time.time(), time.time(), step
    epoch, start = divmod(step, steps_per_epoch)

    def check_finite():                                     # collective: every rank stops together
        first = bad_step.clone()
        if dist_env.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        if first.item() >= 0:
            names = [f"{k}={v}" for k, v in zip(keys, bad_vals.tolist()) if not math.isfinite(v)]
            fail(f"non-finite loss or gradient at step {int(first)}: {', '.join(names) or 'on another rank'}; "
                 f"the last good checkpoint is kept in {ckpt_dir}, lower the learning rate or resume from it")

    def checkpoint():
        check_finite()
        save_checkpoint(os.path.join(ckpt_dir, f"{step:07d}.pt"), m, args, step, dist_env)
        log(f"saved checkpoint {ckpt_dir}/{step:07d}.pt")

    while step < args.max_train_steps:
        sampler.set_epoch(epoch)
        sampler.start = start * local_bs
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logs = repae_step(x, y, m, args)
            step += 1
            vals = torch.stack(list(logs.values()))
            keys = list(logs)
            new_bad = (bad_step < 0) & ~vals.isfinite().all()
            bad_step = torch.where(new_bad, step, bad_step)
            bad_vals = torch.where(new_bad, vals, vals if bad_vals is None else bad_vals)
            if step % args.log_every == 0 or step == args.max_train_steps:
                check_finite()
                if dist_env.world > 1:
                    dist.all_reduce(vals)
                    vals /= dist_env.world
                now = time.time()
                rate = (step - step_log) / (now - t_log)
                rec = dict(step=step, **dict(zip(keys, vals.tolist())), bn_mean=m.ema.bn.running_mean.mean().item(),
                           bn_var=m.ema.bn.running_var.mean().item(), img_per_s=rate * args.batch_size,
                           steps_per_s=rate, peak_mem_gb=peak_memory_gb(device), elapsed_s=now - t0,
                           eta_s=(args.max_train_steps - step) / rate)
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
                if dist_env.is_main:
                    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                t_log, step_log = now, step
            if dist_env.is_main and args.sample_every and step % args.sample_every == 0:
                write_previews(m, x, step, sample_dir, preview_noise, preview_labels)
            stop_now = torch.tensor([float(bool(stop))])
            if dist_env.world > 1:
                dist.all_reduce(stop_now, op=dist.ReduceOp.MAX, group=dist_env.ctrl)
            if step % args.checkpointing_steps == 0 or step == args.max_train_steps or stop_now.item():
                checkpoint()
            if stop_now.item():
                log(f"stopped by signal at step {step}; resume with --resume auto")
                return dist.destroy_process_group() if dist_env.world > 1 else None
            if step >= args.max_train_steps:
                break
        epoch, start = epoch + 1, 0
    log(f"done: {step} steps in {time.time() - t0:.1f}s")
    if dist_env.world > 1:
        dist.destroy_process_group()


def export_vae(args):
    """--export-vae CKPT: the end-to-end-tuned VAE (E2E-VAE) in the official VAE layout, and its latent
    statistics from the EMA SiT's BN buffers, as <output-dir>/e2e-<vae>-<step>.pt and -latents-stats.pt."""
    ckpt = load_file(args.export_vae, "--export-vae")
    if "vae" not in ckpt or "ema" not in ckpt:
        fail(f"'{args.export_vae}' has no 'vae' and 'ema' entries; export needs an end-to-end (REPA-E) checkpoint")
    run = ckpt.get("args", args)                            # the run's VAE type; ours or a released checkpoint
    vae = build_vae(run)
    load_state(vae, ckpt["vae"], f"the VAE in '{args.export_vae}'", "--export-vae")
    var, mean = ckpt["ema"]["bn.running_var"], ckpt["ema"]["bn.running_mean"]
    path = os.path.join(args.output_dir, f"e2e-{run.vae}-{ckpt.get('steps', 0):07d}.pt")
    os.makedirs(args.output_dir, exist_ok=True)
    torch.save(vae.state_dict(), path)
    torch.save(dict(latents_scale=var.rsqrt().view(1, -1, 1, 1), latents_bias=mean.view(1, -1, 1, 1)),
               path.replace(".pt", "-latents-stats.pt"))
    print(f"wrote {path} and its -latents-stats.pt; train a new SiT on it with --freeze-vae --vae-ckpt {path}")


def benchmark(args):
    """--benchmark N: the configured models with random weights on synthetic batches; warm-up steps,
    then N timed REPA-E steps with a device sync at each phase boundary. Rank 0 prints the figures."""
    dist_env = init_distributed()
    device, local_bs, n = dist_env.device, args.batch_size // dist_env.world, args.benchmark
    m = setup(args, dist_env)[0]
    x = torch.randint(0, 256, (local_bs, 3, args.resolution, args.resolution), dtype=torch.uint8, device=device)
    y = torch.randint(0, args.num_classes, (local_bs,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, last = {}, [0.0]

    def mark(phase):
        sync()
        now = time.perf_counter()
        times.setdefault(phase, []).append(now - last[0])
        last[0] = now
    m.mark = mark
    warmup = 3 if args.compile else 2
    for i in range(warmup + n):
        if i == warmup:
            times.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        sync()
        last[0] = time.perf_counter()
        repae_step(x, y, m, args)
    steps = torch.tensor([sum(ts) for ts in zip(*times.values())]) * 1000
    if dist_env.is_main:
        print(f"benchmark: {args.model} + {args.vae}{' (smoke sizes)' if args.smoke else ''}, {args.resolution}px, "
              f"global batch {args.batch_size}, {dist_env.world} process(es) on {device.type}, precision "
              f"{m.amp_dtype or torch.float32}, compile {'on' if args.compile else 'off'}, {n} timed steps")
        print(f"step_time_ms: median {steps.median():.1f} min {steps.min():.1f} max {steps.max():.1f}")
        print(f"images_per_s: {args.batch_size / steps.median().item() * 1000:.2f}")
        print(f"peak_memory_gb: {peak_memory_gb(device):.2f} ({'CUDA max allocated' if device.type == 'cuda' else 'peak RSS'})")
        for phase, ts in times.items():
            print(f"time_{phase}_ms: median {1000 * torch.tensor(ts).median():.1f}")
    if dist_env.world > 1:
        dist.destroy_process_group()


#################################################################################
#                                Command line                                    #
#################################################################################
# Flag names follow the official train_repae.py, so its commands carry over. Defaults are the
# paper's headline run: SiT-XL/2 on SD-VAE (f8d4), DINOv2-B, depth 8, coefficients 0.5 and 1.5.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="REPA-E: end-to-end training of a VAE and a latent diffusion transformer")
    a = p.add_argument
    a("--data-dir", default=None, help="ImageFolder tree: one sub-folder of images per class")
    a("--max-images", type=int, default=None, help="train on a spread-out subset of this many images")
    a("--resolution", type=int, default=256)
    a("--num-classes", type=int, default=1000)
    a("--model", default="SiT-XL/2", choices=list(SiT_models))
    a("--vae", default="f8d4", choices=list(vae_models))
    a("--vae-ckpt", default="pretrained/sdvae/sdvae-f8d4.pt", help="VAE weights (official LDM layout)")
    a("--latents-stats", default=None, help="latent statistics; default: <vae-ckpt>-latents-stats.pt")
    a("--disc-pretrained-ckpt", "--disc-ckpt", default=None, help="discriminator weights; random init if absent")
    a("--vgg-ckpt", default=None, help="torchvision VGG16 weights for LPIPS; default: downloaded once")
    a("--lpips-ckpt", default=None, help="LPIPS heads (taming vgg.pth); default: downloaded once")
    a("--enc-type", default="dinov2-vit-b", help="alignment encoder(s), comma separated, e.g. dinov2-vit-b")
    a("--enc-ckpt", default=None, help="local timm model.safetensors for each --enc-type (offline clusters)")
    a("--encoder-depth", type=int, default=8, help="SiT block whose tokens are aligned (8 for L/XL)")
    a("--proj-coeff", type=float, default=0.5, help="weight of L_REPA in the SiT loss")
    a("--vae-align-proj-coeff", type=float, default=1.5, help="weight of L_REPA in the VAE loss")
    a("--bn-momentum", type=float, default=0.1)
    a("--cfg-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    a("--path-type", default="linear", choices=["linear", "cosine"])
    a("--weighting", default="uniform", choices=["uniform", "lognormal"], help="distribution of t")
    a("--freeze-vae", action="store_true", help="keep the VAE frozen: REPA (and vanilla SiT with --proj-coeff 0)")
    a("--stop-grad", action=argparse.BooleanOptionalAction, default=True,
      help="--no-stop-grad lets L_DIFF reach the VAE: the naive end-to-end ablation that collapses")
    a("--batch-size", type=int, default=256, help="global batch size over all processes")
    a("--learning-rate", type=float, default=1e-4)
    a("--vae-learning-rate", type=float, default=1e-4)
    a("--disc-learning-rate", type=float, default=1e-4)
    a("--max-grad-norm", type=float, default=1.0)
    a("--ema-decay", type=float, default=0.9999)
    a("--max-train-steps", type=int, default=400_000)
    a("--checkpointing-steps", type=int, default=50_000)
    a("--log-every", type=int, default=100)
    a("--sample-every", type=int, default=10_000, help="EMA sample and reconstruction grids; 0 turns them off")
    a("--output-dir", default="exps")
    a("--exp-name", default=None, help="run folder name; default derived from the configuration")
    a("--resume", default=None, help="'auto' (latest checkpoint of this run) or a checkpoint path")
    a("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"], help="autocast dtype on CUDA (CPU: fp32)")
    a("--allow-tf32", action=argparse.BooleanOptionalAction, default=True)
    a("--seed", type=int, default=0)
    a("--num-workers", type=int, default=4)
    a("--random-weights", action="store_true", help="random weights for every pretrained piece (no downloads)")
    a("--export-vae", default=None, metavar="CKPT", help="write the tuned VAE of a REPA-E checkpoint to --output-dir")
    a("--benchmark", type=int, default=0, metavar="N", help="time N REPA-E steps on synthetic data, random weights")
    a("--compile", action="store_true", help="torch.compile the SiT, VAE, encoder, LPIPS and discriminator")
    a("--vae-checkpointing", action="store_true", help="recompute VAE decoder activations in backward (saves memory)")
    a("--smoke", action="store_true", help="tiny random-weight models on procedural images (or on --data-dir): "
                                           "a quick check of the pipeline, not a benchmark")
    args = p.parse_args(argv)

    if args.smoke:                                          # defaults of the smoke run, unless given explicitly
        given = {s.split("=")[0] for s in (argv if argv is not None else sys.argv[1:]) if s.startswith("--")}
        for flag, value in dict(resolution=64, num_classes=10, batch_size=8, max_train_steps=40, checkpointing_steps=20,
                                log_every=10, sample_every=20, num_workers=0, encoder_depth=2, max_images=256,
                                exp_name="smoke").items():
            if "--" + flag.replace("_", "-") not in given:
                setattr(args, flag, value)
    if args.smoke or args.benchmark:
        args.random_weights = True
    if args.freeze_vae and not args.stop_grad:
        p.error("--no-stop-grad sends L_DIFF into the VAE, which --freeze-vae keeps frozen; use one of them")
    if args.proj_coeff == 0 and not args.freeze_vae:
        p.error("--proj-coeff 0 leaves the projector untrained, so L_REPA cannot guide the VAE; "
                "use it with --freeze-vae (the vanilla SiT baseline)")
    world = int(os.environ.get("WORLD_SIZE", 1))               # set by torchrun
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} is global and not divisible by the {world} processes")
    if args.resolution % 32:
        p.error(f"--resolution {args.resolution} must be a multiple of 32 (VAE factor x SiT patch x DINOv2 grid)")
    if args.exp_name is None:
        mode = "vanilla" if args.freeze_vae and args.proj_coeff == 0 else "repa" if args.freeze_vae else \
            "repae" if args.stop_grad else "repae-nostopgrad"
        args.exp_name = f"{args.model.replace('/', '-')}-{args.vae}-{mode}-{args.resolution}"
    return args


if __name__ == "__main__":
    args = parse_args()
    export_vae(args) if args.export_vae else benchmark(args) if args.benchmark else main(args)
