"""REPA-E: end-to-end tuning of a VAE and a latent diffusion transformer (arXiv 2504.10483).

Part 1 is the method, in the paper's order, importing torch, torchvision and timm only: copy any
piece. Part 2 runs it: flags, data, DDP, run folder and checkpoints, the loop in `main`, the tools.
End to end: L_REPA and L_REG update the VAE, L_DIFF and L_REPA the SiT (stop-gradient on z).

  torchrun --nproc_per_node=8 repae.py --data-dir /imagenet/train --vae-ckpt sdvae-f8d4.pt
  python repae.py --smoke            # tiny random-weight run of the whole pipeline on a CPU
"""
import dataclasses
import functools
import math
import re
from collections import OrderedDict

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

# ============================== PART 1: THE METHOD ================================================

# ---- VAE: the LDM AutoencoderKL (SD-VAE f8d4, IN/VA-VAE f16d32) ----------------------------------
# The tokenizer that REPA-E tunes; keys as in the LDM and released REPA-E checkpoints.

Normalize = functools.partial(nn.GroupNorm, 32, eps=1e-6)

class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = Normalize(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = Normalize(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):                                   # (B, c_in, H, W) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))

class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1-conv projections."""
    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):                                   # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).flatten(2).transpose(1, 2)[:, None] for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)         # (B, 1, HW, C)
        # contiguous: a channels-last input would give proj_out a channels-last weight gradient
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W).contiguous()
        return x + self.proj_out(h)

class Resample(nn.Module):
    """down: pad, stride-2 conv. up: nearest x2 as a broadcast (deterministic backward), conv."""
    def __init__(self, c, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, 1 if up else 2, 1 if up else 0)

    def forward(self, x):
        if not self.up:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        B, C, H, W = x.shape
        x = x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2)
        return self.conv(x.reshape(B, C, 2 * H, 2 * W))

def vae_level(c_in, c_out, blocks, attn):
    """One resolution level: res blocks, each followed by attention where the level has it."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(c_out if i else c_in, c_out) for i in range(blocks))
    level.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(blocks if attn else 0))
    return level

def run_level(level, h):
    for i, block in enumerate(level.block):
        h = block(h)
        h = level.attn[i](h) if len(level.attn) else h
    return h

def mid_block(c):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(c, c)
    mid.attn_1 = AttnBlock(c)
    mid.block_2 = ResnetBlock(c, c)
    return mid

class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, z_channels, attn_levels, num_res_blocks):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c = ch
        for i, mult in enumerate(ch_mult):
            self.down.append(vae_level(c, ch * mult, num_res_blocks, i in attn_levels))
            c = ch * mult
            if i != len(ch_mult) - 1:
                self.down[-1].downsample = Resample(c, up=False)
        self.mid = mid_block(c)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 2 * z_channels, 3, 1, 1)

    def forward(self, x):                                   # (B, 3, H, W) -> (B, 2z, H/f, W/f)
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
            h = level.downsample(h) if hasattr(level, "downsample") else h
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))

class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, z_channels, attn_levels, num_res_blocks):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, 1, 1)
        self.mid = mid_block(c)
        self.up = nn.ModuleList()                           # up[0]: the full resolution
        for i in reversed(range(len(ch_mult))):
            self.up.insert(0, vae_level(c, ch * ch_mult[i], num_res_blocks + 1, i in attn_levels))
            c = ch * ch_mult[i]
            if i != 0:
                self.up[0].upsample = Resample(c, up=True)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z):                                   # (B, z, h, w) -> (B, 3, h*f, w*f)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = run_level(level, h)
            h = level.upsample(h) if hasattr(level, "upsample") else h
        return self.conv_out(F.silu(self.norm_out(h)))

class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, std^2), in float32 whatever the autocast dtype."""
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
        self.z_channels = z_channels
        self.factor = 2 ** (len(ch_mult) - 1)

    def encode(self, x):                                    # x in [-1, 1]
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x):
        posterior = self.encode(x)
        z = posterior.sample()                              # REPA-E trains on sampled latents
        return posterior, z, self.decode(z)

# ---- L_REG: the VAE regulariser (L1 + LPIPS + KL + GAN), PatchGAN --------------------------------
# Keeps the VAE an autoencoder while L_REPA reshapes its latents: L1 + LPIPS + 1e-6 KL + 0.1 GAN.

VGG16_URL = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
LPIPS_HEADS_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"   # taming vgg.pth

class LPIPS(nn.Module):
    """Zhang et al. 2018 (taming layout): VGG16 features at relu1_2 ... relu5_3, 1x1 heads."""
    taps = (3, 8, 15, 22, 29)

    def __init__(self, narrow=1):                           # channels / narrow: a tiny test LPIPS
        super().__init__()
        cfg = [v if v == "M" else v // narrow for v in torchvision.models.vgg.cfgs["D"]]
        self.features = torchvision.models.vgg.make_layers(cfg)[:30]   # keys 0 ... 29
        self.heads = nn.ModuleDict()
        for i, c in enumerate((64, 128, 256, 512, 512)):
            head = nn.Conv2d(c // narrow, 1, 1, bias=False)
            head.weight.data.abs_()                         # >= 0 as published: a distance
            slot = nn.Sequential(nn.Dropout(), head)       # the dropout slot: keys lin{i}.model.1
            self.heads[f"lin{i}"] = nn.Sequential(OrderedDict(model=slot))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode=True):                             # frozen, always eval (dropout off)
        return super().train(False)

    def forward(self, x, y):                                # (B, 3, H, W) each -> (B,)
        # Faithful to the released code: it maps inputs with 2x-1 as if they were in [0, 1], but
        # the step passes images in [-1, 1], so LPIPS sees [-3, 1]. Its checkpoints come from this.
        x, y = (((2 * v - 1) - self.shift) / self.scale for v in (x, y))
        unit = lambda v: v / (v.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        d = 0
        heads = iter(self.heads.values())
        for i, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if i in self.taps:
                d = d + next(heads)((unit(x) - unit(y)) ** 2).mean(dim=(1, 2, 3))
        return d

def load_lpips(vgg=None, heads=None, narrow=1, download=True):
    """LPIPS from the state dicts of vgg16-397923af.pth and vgg.pth, else downloaded (or random)."""
    lpips = LPIPS(narrow)
    hub = functools.partial(torch.hub.load_state_dict_from_url, map_location="cpu")
    if vgg is not None or download:
        vgg = hub(VGG16_URL) if vgg is None else vgg
        lpips.features.load_state_dict({k[len("features."):]: v for k, v in vgg.items()
                                        if k.startswith("features.")})
    if heads is not None or download:
        heads = hub(LPIPS_HEADS_URL, file_name="vgg.pth") if heads is None else heads
        lpips.heads.load_state_dict(heads)
    return lpips

class NLayerDiscriminator(nn.Module):
    """PatchGAN (taming): 3 strided 4x4 convs, 64 base channels, BatchNorm, LeakyReLU 0.2."""
    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            conv = nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False)
            layers += [conv, nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*layers, nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):  # conv N(0, 0.02), BN N(1, 0.02)
                nn.init.normal_(m.weight, float(isinstance(m, nn.BatchNorm2d)), 0.02)
            if isinstance(m, nn.BatchNorm2d):
                nn.init.zeros_(m.bias)

    def forward(self, x):                                   # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.main(x)

def vae_regulariser(x, recon, posterior, lpips, disc):
    """L_REG on images in [-1, 1], in float32 as the reference computes it (autocast off)."""
    with torch.autocast(x.device.type, enabled=False):
        x, recon = x.float(), recon.float()
        l1 = (x - recon).abs().mean()                       # / exp(logvar), the fixed logvar = 0
        lp = lpips(x, recon).mean()
        kl = posterior.kl().mean()
        gan = -disc(recon).mean()                           # generator loss, active from step 0
    return l1 + lp + 1e-6 * kl + 0.1 * gan, dict(l1=l1, lpips=lp, kl=kl, gan=gan)

def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())

# ---- SiT with BatchNorm latent normalisation and REPA projector(s) -------------------------------
# DiT architecture (timm's attention, MLP and patch embedding), velocity prediction. Its input
# BatchNorm turns the VAE latent z into z_n.

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos positions (MAE): the first half encodes the column, the second the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    angles = [p.flatten()[:, None] * omega for p in (cols, rows)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1).float()

class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.freq_dim = freq_dim

    def forward(self, t):                                   # (N,) in [0, 1], as is (not x1000)
        half = self.freq_dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        args = t[:, None].float() * torch.exp(-math.log(10000) * k / half)[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

class LabelEmbedder(nn.Module):
    """Class embedding with one extra 'null' row (index num_classes) for CFG."""
    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y, train):
        if train and self.dropout_prob > 0:                 # teaches the unconditional model
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)

class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
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

def projector(dim, projector_dim, z_dim):                   # h_phi of L_REPA
    return nn.Sequential(nn.Linear(dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))

class SiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 z_dims=(768,), encoder_depth=8, projector_dim=2048, bn_momentum=0.1):
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth {encoder_depth} is not in [1, depth {depth}]")
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        pos = sincos_pos_embed(hidden_size, input_size // patch_size)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.projectors = nn.ModuleList(projector(hidden_size, projector_dim, z) for z in z_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        # No affine parameters on purpose: an affine BN could shrink the latent scale and so
        # "hack" the diffusion loss. Running stats start from the VAE's latent statistics.
        self.bn = nn.BatchNorm2d(in_channels, eps=1e-4, momentum=bn_momentum, affine=False)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight                     # like a linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        final = self.final_layer
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [final.adaLN_modulation[-1],
                                                                   final.linear]:
            nn.init.zeros_(m.weight)                        # adaLN-Zero: blocks start as identity
            nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_bn(self, latents_scale, latents_bias):
        """running_mean = bias, running_var = (1 / scale)^2: z_n = (z - bias) * scale at first."""
        self.bn.running_mean.copy_(latents_bias)
        self.bn.running_var.copy_((1 / latents_scale).pow(2))   # as released; not scale.pow(-2)

    def latent_stats(self):
        """(scale, bias) to decode: z = z_n / scale + bias; read them from the EMA model."""
        return self.bn.running_var.rsqrt(), self.bn.running_mean

    def unpatchify(self, x):                                # (N, T, p*p*C) -> (N, C, H, W)
        N, T, _ = x.shape
        p, c, h = self.patch_size, self.out_channels, int(T ** 0.5)
        x = x.reshape(N, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(N, c, h * p, h * p)

    def forward(self, x, t, y, mode="train"):
        """x_t (N, C, H, W), t (N,) in [0, 1], y (N,) -> "train": (v, zs_tilde); "align": (None,
        zs_tilde), stopping after block encoder_depth; "sample": (v, None)."""
        x = self.x_embedder(x) + self.pos_embed             # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        zs_tilde = None
        for i, block in enumerate(self.blocks, 1):
            x = block(x, c)
            if i == self.encoder_depth and mode != "sample":
                zs_tilde = [proj(x) for proj in self.projectors]     # (N, T, z_dim) each
                if mode == "align":
                    return None, zs_tilde
        return self.unpatchify(self.final_layer(x, c)), zs_tilde

# ---- Alignment target: frozen DINOv2 patch tokens via timm ---------------------------------------
# DINOv2-B is the paper's default; timm at img_size=224 gives the tokens of the torch.hub route.

DINOV2 = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def dinov2_timm_name(enc_type):
    """'dinov2-vit-b' -> vit_base_patch14_dinov2.lvd142m; 'dinov2-vit-b-reg': its reg4 twin."""
    match = re.fullmatch(r"dinov2-vit-([sblg])(-reg)?", enc_type)
    if not match:
        raise ValueError(f"'{enc_type}' is not one of dinov2-vit-{{s,b,l,g}}[-reg]")
    return f"vit_{DINOV2[match[1]][0]}_patch14{'_reg4' if match[2] else ''}_dinov2.lvd142m"

def load_encoder(enc_type, resolution, ckpt=None, pretrained=True, **overrides):
    """Frozen eval-mode DINOv2 with the SiT's token grid (224 px for 256 px images), from ckpt
    (timm's model.safetensors), else the Hugging Face hub, else random (pretrained=False)."""
    kw = dict(img_size=resolution * 224 // 256, num_classes=0, **overrides)
    if ckpt:
        kw["pretrained_cfg_overlay"] = dict(file=ckpt)
    enc = timm.create_model(dinov2_timm_name(enc_type), pretrained=pretrained or bool(ckpt), **kw)
    return enc.eval().requires_grad_(False)

@torch.no_grad()
def encoder_targets(encoders, x):
    """uint8 (B, 3, H, W) -> [(B, T, z_dim)]: patch tokens after the final norm."""
    x = torchvision.transforms.functional.normalize(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    x = F.interpolate(x, size=x.shape[-1] * 224 // 256, mode="bicubic")
    return [enc.forward_features(x)[:, enc.num_prefix_tokens:] for enc in encoders]

# ---- Losses: L_DIFF (velocity) and L_REPA (alignment) --------------------------------------------
# The linear path from data (t = 0) to noise (t = 1), t ~ U(0, 1) per sample:
# x_t = (1 - t) z_n + t eps, and the SiT predicts its velocity dx_t/dt = eps - z_n.

def noisy_input(z_n, t, eps):
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * z_n + t * eps, eps - z_n                   # x_t, v

def diffusion_loss(v_pred, v):                              # mean over C,H,W then batch, fp32
    return (v_pred.float() - v.float()).pow(2).mean()

def repa_loss(zs_tilde, zs):
    """Negative cosine similarity, normalised in float32 (fp16 normalize is a NaN source)."""
    cos = [(F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1).mean()
           for a, b in zip(zs_tilde, zs)]
    return -torch.stack(cos).mean()

# ---- The REPA-E step: VAE update, discriminator, SiT update, EMA ---------------------------------
# Three updates in this order (paper Sec. 3.3): the VAE learns from L_REG + 1.5 L_REPA through a
# frozen eval-mode SiT; the SiT from L_DIFF + 0.5 L_REPA on the detached latent; then the EMA.

def autocast(device, hp):
    return torch.autocast(device.type, dtype=hp.amp_dtype, enabled=hp.amp_dtype is not None)

@torch.no_grad()
def latent_diagnostics(z):
    """Table 1's latent-collapse probes: spatial variance and total variation, per image."""
    z = z.float()
    tv = (z[:, :, 1:] - z[:, :, :-1]).abs().sum((1, 2, 3))
    tv = tv + (z[..., 1:] - z[..., :-1]).abs().sum((1, 2, 3))
    return dict(latent_var=z.var(dim=(2, 3)).mean(), latent_tv=tv.mean())

def optimizer_step(loss, params, opt, m, hp, sync):
    """Backward of loss / K; at the last micro-batch (sync) clip, step, return the norm."""
    m.scaler.scale(loss / hp.accumulation).backward()
    if not sync:
        return None
    m.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
    m.scaler.step(opt)
    opt.zero_grad(set_to_none=True)
    return norm

def vae_update(m, hp, x_vae, y, zs, posterior, z, recon, t, eps, sync):
    """3. L_REG + 1.5 L_REPA into the VAE, through the SiT frozen in eval mode (no label drop,
    BN running stats used and kept) and run only up to the alignment depth."""
    m.sit.eval()
    m.sit.requires_grad_(False)
    m.disc.requires_grad_(False)
    with autocast(z.device, hp):
        x_t, v = noisy_input(m.sit.bn(z), t, eps)
        v_pred, zs_tilde = m.sit(x_t, t, y, mode="align" if hp.stop_grad else "train")
    l_reg, logs = vae_regulariser(x_vae, recon, posterior, m.lpips, m.disc)
    l_repa = repa_loss(zs_tilde, zs)
    loss = l_reg + hp.vae_align_proj_coeff * l_repa
    if not hp.stop_grad:
        loss = loss + diffusion_loss(v_pred, v)
    norm = optimizer_step(loss, m.vae.parameters(), m.opt_vae, m, hp, sync)
    m.sit.requires_grad_(True)                              # pos_embed too, as released
    m.disc.requires_grad_(True)
    m.sit.train()
    return dict(grad_norm_vae=norm, loss_vae=loss, vae_l_repa=l_repa, **logs)

def disc_update(m, hp, x_vae, recon, sync):
    """4. The hinge loss; real and fake in separate passes, each with its batch statistics."""
    with torch.autocast(x_vae.device.type, enabled=False):
        logits_real = m.disc_ddp(x_vae)
        logits_fake = m.disc_ddp(recon.detach().float())
        loss = hinge_d_loss(logits_real, logits_fake)
    norm = optimizer_step(loss, m.disc.parameters(), m.opt_disc, m, hp, sync)
    return dict(grad_norm_disc=norm, loss_disc=loss, logits_real=logits_real.mean(),
                logits_fake=logits_fake.mean())

def sit_update(m, hp, z, y, zs, t, eps, sync):
    """5. L_DIFF + 0.5 L_REPA into the SiT; z arrives detached."""
    with autocast(z.device, hp):
        x_t, v = noisy_input(m.sit.bn(z), t, eps)
        v_pred, zs_tilde = m.sit_ddp(x_t, t, y)
        l_diff = diffusion_loss(v_pred, v)
        l_repa = repa_loss(zs_tilde, zs) if zs else torch.zeros((), device=z.device)
        loss = l_diff + hp.proj_coeff * l_repa
    norm = optimizer_step(loss, m.sit.parameters(), m.opt_sit, m, hp, sync)
    logs = dict(grad_norm_sit=norm, loss_sit=loss, l_diff=l_diff, l_repa=l_repa)
    return logs | latent_diagnostics(z)

@torch.no_grad()
def update_ema(ema, model, decay):
    """6. EMA of parameters and float buffers (the BN running stats set the latent scale)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.lerp_(b, 1 - decay) if b.is_floating_point() else e.copy_(b)

def end_step(m, hp, logs, sync):
    if sync:
        m.scaler.update()                                   # fp16: one loss-scale update a step
        update_ema(m.ema, m.sit, hp.ema_decay)
    return {k: v.detach().float() for k, v in logs.items() if v is not None}

def repae_step(x, y, m, hp, sync=True):
    """One REPA-E step on uint8 images x (B, 3, H, W) and labels y (B,); sync=False: a
    micro-batch that only accumulates gradients. Returns the losses and grad norms, detached."""
    x_vae = x.float() / 127.5 - 1
    with autocast(x.device, hp):
        zs = encoder_targets(m.encoders, x)                 # 1. alignment targets, no grad
        posterior, z, recon = m.vae_ddp(x_vae)              # 2. VAE forward, sampled latent z
    t = torch.rand(z.shape[0], device=z.device)             # t and eps serve 3. and 5.
    eps = torch.randn_like(z)
    logs = vae_update(m, hp, x_vae, y, zs, posterior, z, recon, t, eps, sync)
    logs |= disc_update(m, hp, x_vae, recon, sync)
    # **The stop-gradient: L_DIFF must not reach the VAE** (it would collapse the latents)
    logs |= sit_update(m, hp, z.detach(), y, zs, t, eps, sync)
    return end_step(m, hp, logs, sync)

def frozen_vae_step(x, y, m, hp, sync=True):
    """The SiT update alone on a frozen VAE: REPA, vanilla SiT (proj_coeff 0), or the second
    stage on a tuned VAE (train_ldm_only.py, which samples the same posterior from a cache)."""
    with torch.no_grad(), autocast(x.device, hp):
        zs = encoder_targets(m.encoders, x)
        z = m.vae.encode(x.float() / 127.5 - 1).sample()
    t = torch.rand(z.shape[0], device=z.device)
    eps = torch.randn_like(z)
    m.sit.bn.eval()                                         # the fixed latent statistics
    return end_step(m, hp, sit_update(m, hp, z, y, zs, t, eps, sync), sync)

# ---- What a run is built from: the named models, the hyper-parameters and the trained modules --

vae_models = {"f8d4": functools.partial(AutoencoderKL, ch_mult=(1, 2, 4, 4), z_channels=4),
              "f16d32": functools.partial(AutoencoderKL, ch_mult=(1, 1, 2, 2, 4), z_channels=32,
                                          attn_levels=(4,))}          # SD-VAE; IN-VAE and VA-VAE

SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SiT_models = {f"SiT-{n}/{p}": functools.partial(SiT, depth=d, hidden_size=h, num_heads=k,
                                                patch_size=p)
              for n, (d, h, k) in SIT_SIZES.items() for p in (1, 2, 4, 8)}

@dataclasses.dataclass
class HParams:
    proj_coeff: float = 0.5                 # weight of L_REPA in the SiT loss
    vae_align_proj_coeff: float = 1.5       # weight of L_REPA in the VAE loss
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    stop_grad: bool = True                  # False: the naive ablation, L_DIFF reaches the VAE
    accumulation: int = 1                   # K micro-batches per update: each loss / K
    amp_dtype: torch.dtype = None           # autocast (bf16, fp16) or None: float32

@dataclasses.dataclass
class Models:
    """What a step trains; *_ddp compute the gradients (DDP wrappers, or the modules)."""
    vae: nn.Module
    sit: nn.Module
    ema: nn.Module
    encoders: list
    opt_sit: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lpips: nn.Module = None                 # L_REG's pieces: none with a frozen VAE
    disc: nn.Module = None
    opt_vae: torch.optim.Optimizer = None
    opt_disc: torch.optim.Optimizer = None
    vae_ddp: nn.Module = None
    sit_ddp: nn.Module = None
    disc_ddp: nn.Module = None

    def __post_init__(self):
        self.vae_ddp = self.vae_ddp or self.vae
        self.sit_ddp = self.sit_ddp or self.sit
        self.disc_ddp = self.disc_ddp or self.disc

# ---- Sampling: the flow ODE from t = 1 (noise) to t = 0 (data) -----------------------------------
# Integrating dx/dt = v backwards in t turns noise into a latent; sample.py adds the SDE and the .npz.

def guided(model, x, t, y, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
           fn=lambda v, x, t: v, t_cfg=None):
    """fn(v, x, t) of the SiT's velocity, with classifier-free guidance uncond + s (cond - uncond)
    where t_cfg (default t) is in [guidance_low, guidance_high]; the null label is num_classes."""
    t_cfg = t if t_cfg is None else t_cfg
    use_cfg = cfg_scale > 1.0 and guidance_low <= t_cfg <= guidance_high
    x_in = torch.cat([x, x]) if use_cfg else x
    y_in = torch.cat([y, torch.full_like(y, model.num_classes)]) if use_cfg else y
    t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device)
    v = model(x_in.to(torch.float32), t_in.to(torch.float32), y_in, mode="sample")[0]
    d = fn(v.to(torch.float64), x_in, t_in.view(-1, 1, 1, 1))
    if use_cfg:
        d_cond, d_uncond = d.chunk(2)
        d = d_uncond + cfg_scale * (d_cond - d_uncond)
    return d

@torch.no_grad()
def euler_sampler(model, noise, y, num_steps=50, cfg_scale=1.0, guidance_low=0.0,
                  guidance_high=1.0, heun=False):
    """Euler on linspace(1, 0, N+1) in float64, optionally with a Heun correction on all but
    the last step (guided iff the predictor's t is in the interval)."""
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = noise.to(torch.float64)
    cfg = dict(cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d = guided(model, x, t_cur, y, **cfg)
        x_next = x + (t_next - t_cur) * d
        if heun and i < num_steps - 1:
            d_next = guided(model, x_next, t_next, y, **cfg, t_cfg=t_cur)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x

def decode_latent(vae, z_n, scale, bias):
    """Images in [-1, 1]: z = z_n / scale + bias undoes the SiT's BatchNorm."""
    return vae.decode(z_n.float() / scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))

# ============================== PART 2: RUNNING IT ================================================
# Flags become models, ImageNet batches and torchrun processes (DDP); main runs the loop; errors are one sentence.
import argparse, atexit, contextlib, copy, gc, json, os, resource, signal, sys, time, warnings

import numpy as np
import safetensors.torch
import torch.distributed as dist
from PIL import Image

def say(kind, msg, own=False):
    """`<program>: <kind>: <msg>` on stderr; under torchrun rank 0 speaks, or a rank of its own error."""
    if own or os.environ.get("RANK", "0") == "0":
        print(f"{os.path.basename(sys.argv[0])}: {kind}: {msg}", file=sys.stderr, flush=True)

def fail(msg, code=2, own=False):
    say("error", msg, own)
    raise SystemExit(code)

def need_file(path, flag):
    if not path or not os.path.isfile(path):
        what = "is a folder, not a file" if path and os.path.isdir(path) else "does not exist"
        fail(f"weights file '{path}' {what}; pass the right path with {flag}")

def load_file(path, flag, mmap=False):
    """Tensors only (a downloaded file cannot run code), from torch.save or safetensors files."""
    need_file(path, flag)
    torch.serialization.add_safe_globals([argparse.Namespace])   # released checkpoints pickle their args
    try:
        with warnings.catch_warnings():                     # torch warns about some garbage before it raises
            warnings.simplefilter("ignore")
            if path.endswith(".safetensors"):
                return safetensors.torch.load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # every unpickler error means one thing: these bytes are not weights
        fail(f"'{path}' is unreadable: it is corrupt or not a weights file; replace it or pass another with {flag}")

def load_state(module, state, what, flag):
    """load_state_dict(strict=True), but a mismatch names the keys and shapes that differ."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        fail(f"{what} does not match the model ({len(missing)} missing keys {missing[:3]}, {len(unexpected)} "
             f"unexpected keys {unexpected[:3]}, shape mismatches {shapes[:3]}); check {flag} and the model flags")
    module.load_state_dict(state)

# ---- Models from flags: local files, else their hubs, else random (--random-weights) -------------

SMOKE = dict(sit=dict(hidden_size=64, num_heads=2, projector_dim=128), vae=dict(ch=32, num_res_blocks=1),
             encoder=dict(depth=2, embed_dim=64, num_heads=2))          # --smoke: tiny models, minutes on a CPU
AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # autocast on CUDA only

def build_vae(args):
    if not getattr(args, "smoke", False):
        return vae_models[args.vae]()
    levels = len(vae_models[args.vae].keywords["ch_mult"])   # same depth and latent, narrow
    return vae_models[args.vae](**SMOKE["vae"], ch_mult=(1,) * (levels - 2) + (2, 2))

# LDM (released) -> diffusers key names, in order; diffusers numbers the decoder's levels from the bottom
DIFFUSERS_NAMES = [(r"down\.(\d+)\.", r"down_blocks.\1."), (r"\.block\.", ".resnets."), (r"\.attn\.", ".attentions."),
                   (r"(down|up)sample\.", r"\1samplers.0."), (r"mid\.block_1", "mid_block.resnets.0"),
                   (r"mid\.block_2", "mid_block.resnets.1"), (r"mid\.attn_1", "mid_block.attentions.0"),
                   (r"\.norm\.", ".group_norm."), (r"\.([qkv])\.", r".to_\1."), (r"proj_out", "to_out.0"),
                   (r"norm_out", "conv_norm_out"), (r"nin_shortcut", "conv_shortcut")]
DIFFUSERS_OLD = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}   # diffusers < 0.14

def diffusers_key(key, levels):
    key = re.sub(r"up\.(\d+)\.", lambda m: f"up_blocks.{levels - 1 - int(m[1])}.", key)
    for old, new in DIFFUSERS_NAMES:
        key = re.sub(old, new, key)
    return key

def diffusers_config(vae):
    """The config.json fields of diffusers' AutoencoderKL that describe this VAE (its defaults where optional)."""
    attn = ["Attn" * bool(len(level.attn)) for level in vae.encoder.down]
    return dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=vae.z_channels,
                block_out_channels=[level.block[0].conv1.out_channels for level in vae.encoder.down],
                layers_per_block=len(vae.encoder.down[0].block), act_fn="silu", norm_num_groups=32,
                down_block_types=[f"{a}DownEncoderBlock2D" for a in attn],
                up_block_types=[f"{a}UpDecoderBlock2D" for a in reversed(attn)], use_quant_conv=True,
                use_post_quant_conv=True, mid_block_add_attention=True)

def read_vae(path, vae, flag):
    """(LDM-layout state dict, diffusers config or None) of a released .pt or a diffusers folder (or .safetensors)."""
    if not (os.path.isdir(path) or path.endswith(".safetensors")):
        state = load_file(path, flag)
        if "vae" in state and "ema" in state:
            fail(f"{flag} '{path}' is a REPA-E training checkpoint; write its VAE with sample.py --export-vae {path} "
                 f"and pass the written e2e-*.pt with {flag}")
        return state, None
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    need_file(os.path.join(folder, "config.json"), flag)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    for k, v in diffusers_config(vae).items():
        if cfg.get(k, v if k.startswith(("use_", "mid_")) else None) != v:
            fail(f"{flag} '{path}' is a diffusers VAE with {k} {cfg.get(k)}, but the --vae it is loaded as has {v}; "
                 f"pass its own --vae (f8d4: SD-VAE, f16d32: IN/VA-VAE), or another {flag}")
    own, state = vae.state_dict(), {}
    names = {diffusers_key(k, len(vae.decoder.up)): k for k in own}
    weights = path if path.endswith(".safetensors") else os.path.join(folder, "diffusion_pytorch_model.safetensors")
    for k, v in load_file(weights, flag).items():
        k = names.get(re.sub(r"\.(query|key|value|proj_attn)\.", lambda m: f".{DIFFUSERS_OLD[m[1]]}.", k), k)
        state[k] = v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v   # linear: 1x1 conv
    return state, cfg

def load_vae(args):
    """build_vae with the --vae-ckpt weights, and the latents' (scale, bias) for the SiT's BatchNorm to start at."""
    vae, cfg = build_vae(args), None
    c = vae.z_channels
    if args.vae_ckpt:
        state, cfg = read_vae(args.vae_ckpt, vae, "--vae-ckpt")
        load_state(vae, state, f"--vae-ckpt '{args.vae_ckpt}'",
                   "--vae-ckpt/--vae" + ", --smoke (it builds a tiny VAE)" * args.smoke)
    if args.latents_stats or (args.vae_ckpt and cfg is None):
        return vae, load_latent_stats(args.latents_stats or beside(args.vae_ckpt, "-latents-stats.pt"), c)
    if cfg is None:                                         # no --vae-ckpt: a random VAE
        return vae, (torch.ones(c), torch.zeros(c))
    if cfg.get("latents_mean") and cfg.get("latents_std"):
        return vae, (1 / torch.tensor(cfg["latents_std"]), torch.tensor(cfg["latents_mean"]))
    say("note", f"--vae-ckpt '{args.vae_ckpt}' has no latents_mean/latents_std: the BatchNorm starts from its "
                f"scaling_factor, which end-to-end training refines and a frozen VAE keeps (or pass --latents-stats)")
    scale = cfg.get("scaling_factor", 0.18215)              # diffusers' own default, SD-VAE's
    return vae, (torch.full((c,), scale), torch.full((c,), cfg.get("shift_factor") or 0.0))

def beside(vae_ckpt, suffix):
    """The released names of a VAE's companion files: sdvae-f8d4.pt -> sdvae-f8d4-latents-stats.pt, ..."""
    return os.path.splitext(vae_ckpt)[0] + suffix

def load_latent_stats(path, channels):
    stats = load_file(path, "--latents-stats")
    if not {"latents_scale", "latents_bias"} <= set(stats):
        fail(f"'{path}' has no latents_scale/latents_bias; pass the VAE's -latents-stats.pt with --latents-stats")
    scale, bias = stats["latents_scale"].flatten().float(), stats["latents_bias"].flatten().float()
    if len(scale) != channels or len(bias) != channels:
        fail(f"'{path}' holds the scale and bias of {len(scale)} and {len(bias)} latent channels, but the VAE has "
             f"{channels}; pass this VAE's -latents-stats.pt with --latents-stats")
    return scale, bias

def build_sit(args, z_dims, vae):
    smoke = dict(SMOKE["sit"], depth=max(4, args.encoder_depth)) if getattr(args, "smoke", False) else {}
    return SiT_models[args.model](input_size=args.resolution // vae.factor, in_channels=vae.z_channels,
                                  num_classes=args.num_classes, class_dropout_prob=args.cfg_prob, z_dims=z_dims,
                                  encoder_depth=args.encoder_depth, bn_momentum=args.bn_momentum, **smoke)

def encoder_types(args):
    """The alignment encoders; vanilla SiT (frozen VAE, no alignment) needs none, and no projector."""
    return [] if args.freeze_vae and args.proj_coeff == 0 else args.enc_type.split(",")

def load_encoders(args):
    names, encoders = encoder_types(args), []
    for enc_type, ckpt in zip(names, args.enc_ckpt.split(",") if args.enc_ckpt else [None] * len(names)):
        try:
            encoders.append(load_encoder(enc_type, args.resolution, ckpt, not args.random_weights,
                                         **(SMOKE["encoder"] if args.smoke else {})))
        except Exception as e:                              # a file of another model, or the hub's own failure
            name, smoke = dinov2_timm_name(enc_type), " (--smoke builds tiny encoders: drop it)" * args.smoke
            if ckpt:
                fail(f"could not load '{ckpt}' as {name} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                     f"--enc-ckpt names one model.safetensors per --enc-type, in the same order{smoke}")
            if not isinstance(e, OSError):
                raise
            fail(f"DINOv2 weights timm/{name} are not in the Hugging Face cache and could not be downloaded "
                 f"({type(e).__name__}); download model.safetensors once elsewhere and pass it with --enc-ckpt")
    return encoders

def lpips_from_flags(args):
    vgg = load_file(args.vgg_ckpt, "--vgg-ckpt") if args.vgg_ckpt else None
    heads = load_file(args.lpips_ckpt, "--lpips-ckpt") if args.lpips_ckpt else None
    try:
        return load_lpips(vgg, heads, 4 if args.smoke else 1, download=not args.random_weights)
    except RuntimeError as e:                               # a strict load_state_dict's key or shape mismatch
        fail(f"the LPIPS weights do not match the model ({str(e).splitlines()[1].strip()[:200]}); check "
             f"--vgg-ckpt (torchvision's vgg16-397923af.pth) and --lpips-ckpt (taming's vgg.pth)")
    except OSError as e:                                    # a failed download
        fail(f"could not download the LPIPS weights ({e}); download {VGG16_URL} and {LPIPS_HEADS_URL} (vgg.pth) "
             f"once elsewhere and pass them with --vgg-ckpt and --lpips-ckpt")

def hparams(args, device):
    same = ("proj_coeff", "vae_align_proj_coeff", "max_grad_norm", "ema_decay", "stop_grad")
    amp = AMP_DTYPES[args.mixed_precision] if device.type == "cuda" else None
    return HParams(**{k: getattr(args, k) for k in same}, accumulation=args.gradient_accumulation_steps, amp_dtype=amp)

def build(args, device):
    """Every model and optimiser of a run, and the grad scaler, on `device`."""
    vae, (scale, bias) = load_vae(args)
    encoders = [e.to(device) for e in load_encoders(args)]
    sit = build_sit(args, [e.embed_dim for e in encoders], vae)
    sit.init_bn(scale, bias)
    ema = copy.deepcopy(sit.to(device)).requires_grad_(False).eval()
    # The released requires_grad(model, True) before each SiT update trains the sin-cos pos_embed too; on before DDP
    # wraps the SiT, so that DDP averages its gradient (released: one per GPU). train_ldm_only.py never unfreezes it.
    sit.pos_embed.requires_grad_(not args.freeze_vae)
    adamw = functools.partial(torch.optim.AdamW, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                              weight_decay=args.adam_weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=hparams(args, device).amp_dtype == torch.float16)
    m = Models(vae.to(device), sit, ema, encoders, adamw(sit.parameters(), lr=args.learning_rate), scaler)
    if args.freeze_vae:
        vae.eval().requires_grad_(False)
        return m
    m.lpips = lpips_from_flags(args).to(device)
    m.disc = m.disc_ddp = NLayerDiscriminator().to(device)
    if args.disc_pretrained_ckpt:
        load_state(m.disc, load_file(args.disc_pretrained_ckpt, "--disc-pretrained-ckpt"),
                   f"--disc-pretrained-ckpt '{args.disc_pretrained_ckpt}'", "--disc-pretrained-ckpt")
    m.opt_vae = adamw(vae.parameters(), lr=args.vae_learning_rate)
    m.opt_disc = adamw(m.disc.parameters(), lr=args.disc_learning_rate)
    return m

def compile_blocks(m):
    """--compile per repeated block, in place: compile time of a few blocks, and the state_dict keys stay official."""
    torch._dynamo.config.cache_size_limit = 64              # one static graph per block shape and grad mode
    blocks = [b for b in m.vae.modules() if isinstance(b, (ResnetBlock, AttnBlock))]
    blocks += [*m.sit.blocks, *(b for e in m.encoders for b in e.blocks), *([m.lpips, m.disc] if m.disc else [])]
    for module in blocks:
        module.compile(dynamic=False)                       # the VAE's levels differ in shape

def wrap_distributed(m, dist_env):
    """DDP for the trained models; passes that need no parameter gradient call the bare modules."""
    if dist_env.world > 1:
        if dist_env.device.type == "cuda":
            m.sit.bn = nn.SyncBatchNorm.convert_sync_batchnorm(m.sit.bn)     # statistics of the global batch
        ddp = functools.partial(nn.parallel.DistributedDataParallel, device_ids=dist_env.device_ids)
        m.sit_ddp = ddp(m.sit)
        if m.disc is not None:
            m.vae_ddp, m.disc_ddp = ddp(m.vae), ddp(m.disc)
    return m

def train_step(batches, m, hp, frozen, device):
    """One optimiser update from K micro-batches, as accelerate's accumulate: DDP all-reduces on the last only."""
    wrapped = [w for w in (m.sit_ddp, m.vae_ddp, m.disc_ddp) if hasattr(w, "no_sync")]     # the DDP wrappers
    for i, b in enumerate(batches):
        sync = i == len(batches) - 1
        with contextlib.ExitStack() as stack:
            for w in [] if sync else wrapped:
                stack.enter_context(w.no_sync())
            x, y = b["x"].to(device, non_blocking=True), b["y"].to(device, non_blocking=True)
            logs = (frozen_vae_step if frozen else repae_step)(x, y, m, hp, sync)
    if len(batches) > 1 and dist.is_initialized() and not isinstance(m.sit.bn, nn.SyncBatchNorm):
        # gloo has no SyncBatchNorm, and DDP broadcasts buffers only in a forward after a synced one: the last
        # micro-batch's BN update stayed on its rank. Rank 0's, as with one micro-batch, keeps replicas equal.
        for buffer in [*m.sit.buffers(), *m.ema.buffers()]:
            dist.broadcast(buffer, 0)
    return logs

# ---- Data: ImageFolder with the ADM centre crop, smoke images ------------------------------------

def center_crop_arr(image, size):
    """ADM: halve with BOX while the short side >= 2 * size, BICUBIC-resize the short side, centre crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]

UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)     # PIL: unidentified, truncated, corrupt, huge

def load_image(path, size):
    with Image.open(path) as image:
        image = image.convert("RGB")
    return torch.from_numpy(center_crop_arr(image, size)).permute(2, 0, 1)   # uint8 (3, size, size)

class ImageFolder(torchvision.datasets.ImageFolder):
    """--data-dir's images; items {x, y}: an unreadable image is named in a warning and replaced by the next one."""
    def __init__(self, root, size):
        if not os.path.isdir(root) or not any(e.is_dir() for e in os.scandir(root)):
            fail(f"--data-dir '{root}' is not a folder with one sub-folder of images per class (an ImageFolder tree)")
        super().__init__(root, allow_empty=True)
        self.size = size

    def __getitem__(self, i):
        for j in (k % len(self) for k in range(i, i + len(self))):
            try:
                return dict(x=load_image(self.samples[j][0], self.size), y=self.targets[j])
            except UNREADABLE as e:
                say("warning", f"skipped unreadable image '{self.samples[j][0]}' ({e})", own=True)

class SmokeImages(torch.utils.data.Dataset):
    """Procedural images: class k is a disc of hue k/num_classes, at a seeded place and size, on a dark gradient."""
    def __init__(self, n, size, num_classes):
        self.n, self.size, self.num_classes = n, size, num_classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        y, g, s = i % self.num_classes, torch.Generator().manual_seed(i), self.size
        color = 0.5 + 0.5 * torch.cos(y / self.num_classes * 2 * math.pi - torch.tensor([0, 2.094, -2.094]))
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([0.5, 0.5, 0.2]) + torch.tensor([.25, .25, .15])) * s
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        disc = (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2).float()
        image = disc * color[:, None, None] + (1 - disc) * (yy.float() / s * 0.3)
        return dict(x=(image * 255).round().to(torch.uint8), y=y)

def build_dataset(args):
    """The training images, checked as far as that is cheap on ImageNet: the layout, the classes, the first image."""
    if args.smoke and not args.data_dir:
        return SmokeImages(args.max_images or 256, args.resolution, args.num_classes)
    ds = ImageFolder(args.data_dir, args.resolution)
    if len(ds) == 0 or len(ds.classes) > args.num_classes:
        fail(f"--data-dir '{args.data_dir}' holds {len(ds)} images (.jpg, .png, ...) in {len(ds.classes)} class "
             f"sub-folders for --num-classes {args.num_classes}; it needs images, and no more classes than that")
    try:
        load_image(ds.samples[0][0], args.resolution)
    except UNREADABLE as e:
        fail(f"cannot read the first image '{ds.samples[0][0]}' ({e}); check that --data-dir holds image files")
    if args.max_images:                                     # a spread-out subset that keeps every class
        ds = torch.utils.data.Subset(ds, np.linspace(0, len(ds) - 1, min(args.max_images, len(ds))).astype(int))
    if len(ds) < args.batch_size * args.gradient_accumulation_steps:
        fail(f"the data has {len(ds)} images, fewer than one update (--batch-size {args.batch_size} x "
             f"--gradient-accumulation-steps {args.gradient_accumulation_steps})")
    return ds

class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (order: a function of seed and epoch) that can start mid-epoch for an exact resume."""
    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

# ---- Processes (NCCL on CUDA, gloo on CPU), the run folder, checkpoints (exact resume) -----------

def init_distributed(deterministic=False, allow_tf32=True):
    env = lambda name, default: int(os.environ.get(name, default))     # set by torchrun
    world, rank, local_rank = env("WORLD_SIZE", 1), env("RANK", 0), env("LOCAL_RANK", 0)
    cuda, procs, gpus = torch.cuda.is_available(), env("LOCAL_WORLD_SIZE", 1), torch.cuda.device_count()
    if cuda and procs > gpus:
        fail(f"{procs} processes on this machine but {gpus} visible GPU(s): start one process per GPU "
             f"(torchrun --nproc_per_node={gpus}) or make more GPUs visible with CUDA_VISIBLE_DEVICES")
    if deterministic:                                       # set before any cuBLAS handle exists
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        for backend in ("flash", "mem_efficient", "cudnn"):   # their backward passes accumulate with atomics
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ctrl = None
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        atexit.register(leave_process_group)
        ctrl = dist.new_group(backend="gloo") if cuda else dist.group.WORLD   # control messages, no device sync
    return argparse.Namespace(rank=rank, world=world, device=device, ctrl=ctrl, is_main=rank == 0,
                              device_ids=[local_rank] if cuda else None)

def leave_process_group():
    """Join gloo's threads before teardown (else SIGABRT); a traceback kept in sys.last_* would hold the group."""
    sys.last_exc = sys.last_type = sys.last_value = sys.last_traceback = None
    gc.collect()
    dist.destroy_process_group()

def prepare_run(args):
    """(run folder, checkpoint to resume from or None), checked before anything is written: no run is overwritten."""
    run_dir = os.path.join(args.output_dir, args.exp_name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    found = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".pt")) if os.path.isdir(ckpt_dir) else []
    if not args.resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        fail(f"'{run_dir}' already holds a run{f' with checkpoints up to {found[-1]}' if found else ''}; continue it "
             f"with --resume auto, or start another with a new --exp-name")
    resume = (os.path.join(ckpt_dir, found[-1]) if found else None) if args.resume == "auto" else args.resume
    if resume and not os.path.isfile(resume):
        fail(f"checkpoint '{resume}' does not exist; name an existing one with --resume")
    if found and os.path.abspath(resume) != os.path.abspath(os.path.join(ckpt_dir, found[-1])):
        fail(f"'{run_dir}' holds a run with checkpoints up to {found[-1]}; continuing it from '{resume}' would mix two "
             f"histories: continue it with --resume auto, or start from '{resume}' with a new --exp-name")
    parent = run_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent) or "."
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        fail(f"'{parent}' is a file or read-only, so the run folder cannot be made there; pass another --output-dir")
    return run_dir, resume

def write_atomic(path, write):
    """write(f) into path.tmp, then rename: a full disk leaves no truncated file. Returns its error, or None."""
    try:
        with open(f"{path}.tmp", "wb") as f:
            write(f)
        os.replace(f"{path}.tmp", path)
    except (OSError, RuntimeError) as e:
        if os.path.lexists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")
        return e

def fail_together(error, dist_env):
    """Rank 0's error sentence (or None) stops every rank: alone, it would leave the others in a collective."""
    error = [error]
    if dist_env.world > 1:
        dist.broadcast_object_list(error, src=0, group=dist_env.ctrl)
    if error[0]:
        fail(error[0], code=1)

def checkpoint_parts(m):
    """The released checkpoint's keys (a frozen VAE has no discriminator and no VAE optimiser)."""
    parts = dict(model=m.sit, ema=m.ema, vae=m.vae, opt=m.opt_sit, discriminator=m.disc, opt_vae=m.opt_vae,
                 opt_disc=m.opt_disc)
    return {k: v for k, v in parts.items() if v is not None}

def save_checkpoint(path, m, args, step, dist_env):
    """The released keys plus what an exact resume needs (every rank's RNG, the grad scaler)."""
    cuda = dist_env.device.type == "cuda"
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(dist_env.device) if cuda else None)
    rngs = [rng] + [None] * (dist_env.world - 1)
    if dist_env.world > 1:
        dist.all_gather_object(rngs, rng, group=dist_env.ctrl)
    e = None
    if dist_env.is_main:                                    # the other ranks hold the same weights
        ckpt = {k: v.state_dict() for k, v in checkpoint_parts(m).items()}
        ckpt.update(args=args, steps=step, rng=rngs, scaler=m.scaler.state_dict())
        e = write_atomic(path, lambda f: torch.save(ckpt, f))
    fail_together(e and f"could not write checkpoint '{path}' ({e}); the earlier checkpoints are intact: free some "
                         f"space, then continue with --resume auto", dist_env)

def load_checkpoint(path, m, args, dist_env):
    """This project's or a released checkpoint. Returns (step, exact): bitwise exact when each rank's RNG is back."""
    ckpt, parts = load_file(path, "--resume"), checkpoint_parts(m)
    missing = [k for k in [*parts, "steps"] if k not in ckpt]
    if missing:
        fail(f"'{path}' lacks {missing}; it is not a training checkpoint of this configuration")
    for key, part in parts.items():
        if isinstance(part, nn.Module):
            load_state(part, ckpt[key], f"the {key} weights in '{path}'", "--resume")
        else:
            part.load_state_dict(ckpt[key])
    if "scaler" in ckpt:                                    # released checkpoints have no scaler and no RNG states
        m.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng") and len(ckpt["rng"]) == dist_env.world and ckpt["rng"][dist_env.rank]
    if not rng:                                             # another world size: continue, not bitwise
        torch.manual_seed(args.seed + dist_env.rank + ckpt["steps"])
        return ckpt["steps"], False
    torch.set_rng_state(rng["cpu"])                         # exact: every rank continues its own stream
    if rng["cuda"] is not None and dist_env.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], dist_env.device)
    return ckpt["steps"], True

def setup(args, dist_env, resume=None):
    """Models from one seed on every rank (random encoders included), then a seed per rank for its own draws."""
    for flag in ("vae_ckpt", "latents_stats", "disc_pretrained_ckpt", "vgg_ckpt", "lpips_ckpt", "enc_ckpt"):
        for path in (getattr(args, flag) or "").split(","):     # every weights file, before any model is built
            if path and not (flag == "vae_ckpt" and os.path.isdir(path)):     # a diffusers folder: read_vae
                need_file(path, f"--{flag.replace('_', '-')}")
    torch.manual_seed(args.seed)
    m = build(args, dist_env.device)
    torch.manual_seed(args.seed + dist_env.rank)
    step, exact = load_checkpoint(resume, m, args, dist_env) if resume else (0, True)
    return wrap_distributed(m, dist_env), step, exact

# ---- The training loop, DiT-style (one process per GPU, a run folder), and the benchmark ---------

def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20      # Linux reports KiB

class RunLog:
    """log.txt, metrics.jsonl, the checkpoints and the non-finite stop; values leave the device at those steps only."""
    def __init__(self, args, dist_env, run_dir, step):
        self.args, self.d, self.step0, self.logged = args, dist_env, step, step
        self.ckpt_dir, self.metrics = f"{run_dir}/checkpoints", f"{run_dir}/metrics.jsonl"
        self.log_txt, error = f"{run_dir}/log.txt", None
        if dist_env.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            if not os.path.exists(f"{run_dir}/args.json"):
                with open(f"{run_dir}/args.json", "w") as f:
                    json.dump(vars(args), f, indent=2)
            if os.path.exists(self.metrics):                # a resume keeps one row per step
                with open(self.metrics) as f:
                    rows = [r for r in f if r.endswith("\n") and json.loads(r)["step"] <= step]
                error = write_atomic(self.metrics, lambda f: f.writelines(r.encode() for r in rows))
        fail_together(error and f"could not rewrite '{self.metrics}' ({error}); free some space, then continue "
                                f"with --resume auto", dist_env)
        self.t0 = self.t_log = time.time()

    def log(self, msg):
        if self.d.is_main:
            print(msg, flush=True)
            with open(self.log_txt, "a") as f:
                print(msg, file=f)

    def values(self, step, logs, fp16):
        """The mean over ranks; a non-finite value stops all before a checkpoint (fp16: the scaler skips inf norms)."""
        vals = torch.stack(list(logs.values()))
        if self.d.world > 1:
            dist.all_reduce(vals)
            vals /= self.d.world
        vals = dict(zip(logs, vals.tolist()))
        bad = [f"{k}={v}" for k, v in vals.items() if not (math.isfinite(v) or (fp16 and k.startswith("grad_norm")))]
        if bad:
            kept = f"the last good checkpoint is kept in {self.ckpt_dir}, resume from it with --resume auto" \
                if os.listdir(self.ckpt_dir) else "no checkpoint was written before it"
            fail(f"non-finite loss or gradient at step {step}: {', '.join(bad)}; {kept}; lower the learning rate", 1)
        return vals

    def write_metrics(self, step, logs, m, last):
        now, images = time.time(), self.args.batch_size * self.args.gradient_accumulation_steps
        rate, bn = (step - self.logged) / (now - self.t_log), m.ema.bn
        rec = dict(step=step, **self.values(step, logs, m.scaler.is_enabled()), bn_mean=bn.running_mean.mean().item(),
                   bn_var=bn.running_var.mean().item(), img_per_s=rate * images, steps_per_s=rate,
                   peak_mem_gb=peak_memory_gb(self.d.device), elapsed_s=now - self.t0, eta_s=(last - step) / rate)
        self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        if self.d.is_main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.t_log, self.logged = now, step

    def checkpoint(self, step, logs, m):
        if self.logged != step:                             # write_metrics has checked this step's values
            self.values(step, logs, m.scaler.is_enabled())
        path = os.path.join(self.ckpt_dir, f"{step:07d}.pt")
        save_checkpoint(path, m, self.args, step, self.d)
        self.log(f"saved checkpoint {path}")

def any_rank(flag, dist_env):
    """True on every rank when it is True on one (over the control group: no device sync)."""
    flag = torch.tensor([float(flag)])
    if dist_env.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=dist_env.ctrl)
    return bool(flag.item())

def main(args):
    dist_env = init_distributed(args.deterministic, args.allow_tf32)
    device, K = dist_env.device, args.gradient_accumulation_steps
    dataset = build_dataset(args)
    run_dir, resume = prepare_run(args)
    m, step, exact = setup(args, dist_env, resume)
    hp = hparams(args, device)
    sampler = ResumableSampler(dataset, dist_env.world, dist_env.rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size // dist_env.world, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0,
                                         generator=torch.Generator())   # own seed draws: the global RNG stays exact
    last = min(args.max_train_steps, args.epochs * (len(loader) // K))   # whichever limit comes first
    if step >= last:
        return say("note", f"'{resume}' is at step {step}, the last of --max-train-steps {args.max_train_steps} and "
                           f"--epochs {args.epochs}: nothing to do")
    if args.compile:
        compile_blocks(m)
    out = RunLog(args, dist_env, run_dir, step)
    out.log(start_line(args, m, hp, dataset, dist_env))
    if resume:
        out.log(f"resumed from {resume} at step {step}" + ("" if exact else " (other world size: not bitwise)"))
    stop = []                                               # SIGTERM/SIGINT: end the step, checkpoint, exit 0
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.append(True))
    epoch, start = divmod(step, len(loader) // K)
    done = False
    while not done:
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = start * K * loader.batch_size
        for micro in zip(*[iter(loader)] * K):              # K micro-batches per update; a last partial group dropped
            logs = train_step(micro, m, hp, args.freeze_vae, device)
            step += 1
            stopped = any_rank(bool(stop), dist_env)
            done = stopped or step >= last
            if step % args.log_every == 0 or done:
                out.write_metrics(step, logs, m, last)
            if step % args.checkpointing_steps == 0 or done:
                out.checkpoint(step, logs, m)
            if done:
                break
        epoch, start = epoch + 1, 0
    out.log(f"stopped by signal at step {step}; continue with --resume auto" if stopped else
            f"done: steps {out.step0} to {step} in {time.time() - out.t0:.1f}s")

def start_line(args, m, hp, dataset, dist_env):
    count = lambda module: f"{sum(p.numel() for p in module.parameters()):,}"
    disc = f"from {args.disc_pretrained_ckpt}" if args.disc_pretrained_ckpt else \
        f"random: no {beside(args.vae_ckpt, '-discriminator-ckpt.pt')} beside --vae-ckpt" if args.vae_ckpt else "random"
    K = args.gradient_accumulation_steps
    return (f"SiT parameters: {count(m.sit)} ({'smoke-size ' * args.smoke}{args.model}); VAE: {count(m.vae)}; "
            f"discriminator: {'none (frozen VAE)' if m.disc is None else disc}; {len(dataset):,} "
            f"{'procedural smoke' if isinstance(dataset, SmokeImages) else 'training'} images; {dist_env.world} "
            f"processes on {dist_env.device.type}; precision {hp.amp_dtype or torch.float32}; update batch "
            f"{args.batch_size * K} ({K} x {args.batch_size})" + " (random weights)" * args.random_weights)

def count_flops(fn, *args):
    """The matmul and convolution FLOPs of fn(*args), with the math attention kernel, which it counts anywhere."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        fn(*args)
    return counter.get_total_flops()

PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312, "B200": 2250}   # bf16 dense

def benchmark(args):
    """--benchmark N: synthetic batches; the FLOPs of an eager step, warm-up, then N steps timed between syncs."""
    dist_env = init_distributed(args.deterministic, args.allow_tf32)
    device, local_bs, cuda = dist_env.device, args.batch_size // dist_env.world, dist_env.device.type == "cuda"
    m, hp = setup(args, dist_env)[0], hparams(args, device)
    step = functools.partial(frozen_vae_step if args.freeze_vae else repae_step, m=m, hp=hp)
    x = torch.randint(0, 256, (local_bs, 3, args.resolution, args.resolution), dtype=torch.uint8, device=device)
    y = torch.randint(0, args.num_classes, (local_bs,), device=device)
    flops, t_warmup = count_flops(step, x, y), time.perf_counter()
    if args.compile:
        compile_blocks(m)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    graphs, warmup, times = torch._dynamo.utils.counters["stats"], 3 if args.compile else 2, []
    for i in range(warmup + args.benchmark):
        if i == warmup:
            t_warmup, compiled = time.perf_counter() - t_warmup, graphs["unique_graphs"]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        step(x, y)
        sync()
        times.append(time.perf_counter() - t0)
    ms = torch.tensor(times[warmup:]) * 1000
    step_s = ms.median().item() / 1000
    name = torch.cuda.get_device_name(device) if cuda else ""
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows = dict(benchmark=f"{'smoke-size ' * args.smoke}{args.model} + {args.vae}, {args.resolution}px, global batch "
                          f"{args.batch_size} on {dist_env.world} {device.type} process(es), precision "
                          f"{hp.amp_dtype or torch.float32}, compile {args.compile}, {args.benchmark} timed steps",
                step_time_ms=f"median {ms.median():.1f} min {ms.min():.1f} max {ms.max():.1f}",
                images_per_s=f"{args.batch_size / step_s:.2f}",
                peak_memory_gb=f"{peak_memory_gb(device):.2f} ({'CUDA max allocated' if cuda else 'peak RSS'})",
                flops_per_step=f"{flops / 1e12:.4f} TFLOP per process; achieved {flops / step_s / 1e12:.2f} TFLOP/s",
                mfu=f"{100 * flops / step_s / (peak * 1e12):.1f}% of {peak} TFLOP/s dense bf16" if peak else "n/a: "
                    "no known peak for this device; pass --peak-tflops",
                warmup_s=f"{t_warmup:.1f} ({warmup} steps{', compile included' * args.compile}); graphs compiled: "
                         f"{compiled}, then in the timed steps (recompiles): {graphs['unique_graphs'] - compiled}")
    if dist_env.is_main:
        print("\n".join(f"{k}: {v}" for k, v in rows.items()))

# ---- Command line: the released flag names; defaults are the paper's headline run ----------------

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (see fail), exact flag names only and every default in --help."""
    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")

def at_least(n):
    def number(text):                                       # argparse names it in "invalid number value"
        if int(text) < n:
            raise argparse.ArgumentTypeError(f"must be at least {n}, got {text}")
        return int(text)
    return number

def parse_args(argv=None, check=True):
    """The flags of a run; check=False: as given, with neither refusals nor derived defaults (sample.py's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = Parser(description="REPA-E: end-to-end training of a VAE and a latent diffusion transformer",
               epilog="Errors are one line. Exit status 2: bad input, found before anything is written; 1: a run that "
                      "went wrong later; 0: done, or stopped by SIGTERM/SIGINT after a checkpoint.")
    on_off = argparse.BooleanOptionalAction
    a = p.add_argument_group("data").add_argument
    a("--data-dir", default="data", help="ImageFolder tree, one sub-folder per class (--smoke: procedural images)")
    a("--max-images", type=at_least(1), help="train on a spread-out subset of this many images")
    a("--resolution", type=at_least(32), default=256, help="image side in pixels")
    a("--num-classes", type=at_least(1), default=1000, help="class labels (--smoke: 10)")
    a = p.add_argument_group("models and their weights").add_argument
    a("--model", default="SiT-XL/2", choices=list(SiT_models), help="the SiT")
    a("--vae", "--vae-arch", default="f8d4", choices=list(vae_models), help="the VAE: SD-VAE or IN/VA-VAE layout")
    a("--vae-ckpt", "--vae-ckpt-path", help="released .pt or diffusers folder; f8d4: pretrained/sdvae/sdvae-f8d4.pt")
    a("--latents-stats", help="latent statistics; default: <vae-ckpt stem>-latents-stats.pt, or the folder's config")
    a("--disc-pretrained-ckpt", "--disc-ckpt", help="default: <vae-ckpt stem>-discriminator-ckpt.pt, if any")
    a("--vgg-ckpt", help="torchvision vgg16-397923af.pth for LPIPS; default: downloaded once")
    a("--lpips-ckpt", help="LPIPS heads (taming vgg.pth); default: downloaded once")
    a("--enc-type", default="dinov2-vit-b", help="alignment encoder(s), comma separated: dinov2-vit-{s,b,l,g}[-reg]")
    a("--enc-ckpt", help="local timm model.safetensors for each --enc-type (offline clusters)")
    a("--random-weights", action="store_true", help="random weights where no file is given (no download)")
    a("--bn-momentum", type=float, default=0.1, help="momentum of the latent BatchNorm's running statistics")
    a = p.add_argument_group("losses").add_argument
    a("--encoder-depth", type=at_least(1), default=8, help="SiT block whose tokens are aligned (8 for L/XL)")
    a("--proj-coeff", type=float, default=0.5, help="weight of L_REPA in the SiT loss")
    a("--vae-align-proj-coeff", type=float, default=1.5, help="weight of L_REPA in the VAE loss")
    a("--cfg-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    a("--freeze-vae", action="store_true", help="keep the VAE frozen: REPA (and vanilla SiT with --proj-coeff 0)")
    a("--stop-grad", action=on_off, default=True, help="--no-stop-grad: L_DIFF reaches the VAE (the naive ablation)")
    a = p.add_argument_group("optimisation").add_argument
    a("--batch-size", type=at_least(1), default=256, help="images per micro-batch over all processes")
    a("--gradient-accumulation-steps", type=at_least(1), default=1, help="micro-batches per optimiser update")
    for flag, value, what in (("--learning-rate", 1e-4, "SiT"), ("--vae-learning-rate", 1e-4, "VAE"),
                              ("--disc-learning-rate", 1e-4, "discriminator"), ("--adam-beta1", 0.9, "AdamW"),
                              ("--adam-beta2", 0.999, "AdamW"), ("--adam-weight-decay", 0.0, "AdamW"),
                              ("--adam-epsilon", 1e-8, "AdamW"), ("--max-grad-norm", 1.0, "each model's clip"),
                              ("--ema-decay", 0.9999, "the EMA SiT")):
        a(flag, type=float, default=value, help=what)
    a("--max-train-steps", type=at_least(1), default=400_000, help="optimiser updates")
    a("--epochs", type=at_least(1), default=1400, help="stop after this many passes over the data, if earlier")
    a("--seed", type=int, default=0, help="models, data order and each rank's draws")
    a = p.add_argument_group("run folder").add_argument
    a("--output-dir", default="exps", help="parent of the run folder")
    a("--exp-name", help="run folder name; default derived from the configuration")
    a("--resume", help="'auto' (latest checkpoint of this run) or a checkpoint path")
    a("--checkpointing-steps", type=at_least(1), default=50_000, help="a checkpoint every this many steps")
    a("--log-every", type=at_least(1), default=100, help="a metrics row every this many steps")
    a = p.add_argument_group("speed and distributed").add_argument
    a("--mixed-precision", default="bf16", choices=list(AMP_DTYPES), help="autocast dtype on CUDA (CPU: fp32)")
    a("--allow-tf32", action=on_off, default=True, help="TF32 matmuls and convolutions on CUDA")
    a("--deterministic", action="store_true", help="deterministic CUDA kernels: a resumed run is bitwise exact")
    a("--num-workers", type=at_least(0), default=min(4, len(os.sched_getaffinity(0))), help="loader processes")
    a("--compile", action=on_off, default=False, help="torch.compile the repeated blocks of every network")
    a = p.add_argument_group("tools").add_argument
    a("--smoke", action="store_true", help="tiny random-weight models on procedural images (or --data-dir)")
    a("--benchmark", type=at_least(0), default=0, metavar="N", help="time N steps on synthetic data, random weights")
    a("--peak-tflops", type=float, help="the GPU's dense bf16 peak for the MFU of --benchmark")
    if "--smoke" in argv:                                   # its defaults; flags given still win
        p.set_defaults(data_dir=None, resolution=64, num_classes=10, batch_size=8, max_train_steps=40,
                       checkpointing_steps=20, log_every=10, num_workers=0, encoder_depth=2, exp_name="smoke")
    args = p.parse_args(argv)
    return check_args(args, p) if check else args

def check_args(args, p):
    """Refuses every combination that cannot work, before anything is built; fills in derived defaults."""
    args.random_weights = args.random_weights or args.smoke or bool(args.benchmark)
    if args.vae_ckpt is None and not args.random_weights:
        if args.vae != "f8d4":
            p.error(f"--vae {args.vae} needs its weights: pass --vae-ckpt (e.g. pretrained/vavae/vavae-f16d32.pt)")
        args.vae_ckpt = "pretrained/sdvae/sdvae-f8d4.pt"
    world, n_enc = int(os.environ.get("WORLD_SIZE", 1)), len(args.enc_type.split(","))   # WORLD_SIZE: torchrun
    if args.freeze_vae and not args.stop_grad:
        p.error("--no-stop-grad sends L_DIFF into the VAE, which --freeze-vae keeps frozen; use one of them")
    if args.proj_coeff == 0 and not args.freeze_vae:
        p.error("--proj-coeff 0 leaves the projector untrained, so L_REPA cannot guide the VAE; add --freeze-vae")
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} is global and not divisible by the {world} processes")
    if args.resolution % 32:
        p.error(f"--resolution {args.resolution} must be a multiple of 32 (VAE x SiT patch x DINOv2 grid)")
    if args.encoder_depth > SiT_models[args.model].keywords["depth"] and not args.smoke:
        p.error(f"--encoder-depth {args.encoder_depth} is deeper than --model {args.model}; pass a smaller one")
    factor = 2 ** (len(vae_models[args.vae].keywords["ch_mult"]) - 1)
    if factor * SiT_models[args.model].keywords["patch_size"] != 16 and encoder_types(args):   # DINOv2: 16 px
        p.error(f"the tokens of --model {args.model} on --vae {args.vae} are not DINOv2's (16 px each); pick a --model "
                f"patch size that matches the VAE (f8d4: SiT-*/2, f16d32: SiT-*/1)")
    if args.enc_ckpt and len(args.enc_ckpt.split(",")) != n_enc:
        p.error(f"--enc-ckpt must name one file per --enc-type encoder ({n_enc})")
    if args.freeze_vae and (args.disc_pretrained_ckpt or args.vgg_ckpt or args.lpips_ckpt):
        p.error("--disc-pretrained-ckpt, --vgg-ckpt and --lpips-ckpt are weights of L_REG, which a frozen VAE "
                "(--freeze-vae) never computes; drop them")
    if args.benchmark and args.resume:
        p.error("--benchmark times random weights; drop --resume")
    for e in args.enc_type.split(","):
        try:
            dinov2_timm_name(e)
        except ValueError as error:
            p.error(f"--enc-type {error}")
    if args.disc_pretrained_ckpt is None and args.vae_ckpt and not args.freeze_vae and \
            os.path.isfile(beside(args.vae_ckpt, "-discriminator-ckpt.pt")):
        args.disc_pretrained_ckpt = beside(args.vae_ckpt, "-discriminator-ckpt.pt")   # the released naming
    if args.exp_name is None:
        mode = "vanilla" if args.freeze_vae and args.proj_coeff == 0 else "repa" if args.freeze_vae else \
            "repae" if args.stop_grad else "repae-nostopgrad"
        args.exp_name = f"{args.model.replace('/', '-')}-{args.vae}-{mode}-{args.resolution}"
    return args

if __name__ == "__main__":
    args = parse_args()
    (benchmark if args.benchmark else main)(args)
