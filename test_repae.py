"""Tests of the REPA-E reference implementation: CPU only, tiny shapes, random weights, no network."""
import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.models.inception import Inception3

import fid
import repae
import sample

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"), device_ids=None, ctrl=None, is_main=True)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; its CPU stand-in runs here")


@pytest.fixture(autouse=True)
def cpu_unless_cuda_test(request, monkeypatch):
    """Tests of CPU and gloo semantics run on the CPU even on a GPU machine (subprocesses too); the tests named
    *_cuda_* see the GPUs."""
    if "_cuda" not in request.node.name:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def error(capsys, fn, *a, code=2):
    """What fn(*a) printed on stderr when it stopped with one sentence (SystemExit with status `code`)."""
    with pytest.raises(SystemExit) as e:
        fn(*a)
    assert e.value.code == code
    return capsys.readouterr().err


def smoke_args(*extra):
    return repae.parse_args(["--smoke", *extra])


def tiny_run(*extra, seed=0):
    """The smoke models, optimisers and a batch, ready for repae_step."""
    torch.manual_seed(seed)
    args = smoke_args(*extra)
    m = repae.wrap_distributed(repae.build(args, CPU.device), CPU)
    repae.update_ema(m.ema, m.sit, 0.0)
    ds = repae.SmokeImages(8, args.resolution, args.num_classes)
    x = torch.stack([ds[i]["x"] for i in range(4)])
    y = torch.tensor([ds[i]["y"] for i in range(4)])
    return args, m, x, y


def step(x, y, m, args, *rest):
    """repae.py's step for the flags of `args`: the REPA-E step, or the frozen-VAE one."""
    hp = repae.hparams(args, CPU.device)
    return (repae.frozen_vae_step if args.freeze_vae else repae.repae_step)(x, y, m, hp, *rest)


def run_cli(*argv, env=None, cwd=HERE):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


#################################################################################
#                       Models: layout, counts, closed forms                     #
#################################################################################

def test_parameter_counts_of_full_size_models():
    with torch.device("meta"):
        vaes = {n: repae.vae_models[n]() for n in ("f8d4", "f16d32")}
        sits = {n: repae.SiT_models[n]() for n in ("SiT-B/2", "SiT-XL/2")}
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(vaes["f8d4"]) == 83_653_863                 # SD-VAE ft-MSE
    no_proj = {n: count(s) - count(s.projectors) for n, s in sits.items()}
    # DiT-XL/2 has 675,129,632 with learn_sigma (8 output channels); SiT predicts 4: 1152*2*2*4+16 fewer
    assert no_proj["SiT-XL/2"] == 675_129_632 - 1152 * 16 - 16
    assert no_proj["SiT-B/2"] == 130_500_112
    assert count(sits["SiT-XL/2"].projectors) == 1152 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 768 + 768


def test_official_key_layout():
    with torch.device("meta"):
        vae = repae.vae_models["f8d4"]().state_dict()
        vae32 = repae.vae_models["f16d32"]().state_dict()
        sit = repae.SiT_models["SiT-XL/2"]().state_dict()
    for k in ["encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.mid.attn_1.q.weight", "encoder.norm_out.weight", "decoder.up.3.upsample.conv.weight",
              "decoder.up.0.block.2.conv2.weight", "quant_conv.weight", "post_quant_conv.weight"]:
        assert k in vae, k
    assert "encoder.down.3.downsample.conv.weight" not in vae and "decoder.up.0.upsample.conv.weight" not in vae
    assert vae["encoder.conv_out.weight"].shape == (8, 512, 3, 3) and vae32["quant_conv.weight"].shape == (64, 64, 1, 1)
    assert "encoder.down.4.attn.1.q.weight" in vae32 and "decoder.up.4.attn.2.proj_out.weight" in vae32
    assert not any(".attn." in k for k in vae if ".down." in k or ".up." in k)
    shapes = {"x_embedder.proj.weight": (1152, 4, 2, 2), "pos_embed": (1, 256, 1152),
              "t_embedder.mlp.0.weight": (1152, 256), "y_embedder.embedding_table.weight": (1001, 1152),
              "blocks.0.attn.qkv.weight": (3456, 1152), "blocks.0.attn.proj.weight": (1152, 1152),
              "blocks.27.mlp.fc1.weight": (4608, 1152), "blocks.0.adaLN_modulation.1.weight": (6912, 1152),
              "projectors.0.0.weight": (2048, 1152), "projectors.0.2.weight": (2048, 2048),
              "projectors.0.4.weight": (768, 2048), "final_layer.linear.weight": (16, 1152),
              "final_layer.adaLN_modulation.1.weight": (2304, 1152), "bn.running_mean": (4,), "bn.running_var": (4,),
              "bn.num_batches_tracked": ()}
    for k, shape in shapes.items():
        assert tuple(sit[k].shape) == shape, k
    assert not any("weight" in k and k.startswith("bn.") for k in sit)   # affine-free BN
    disc = repae.NLayerDiscriminator().state_dict()
    assert [k for k in disc if k.endswith("weight") and disc[k].dim() == 4] == \
        ["main.0.weight", "main.2.weight", "main.5.weight", "main.8.weight", "main.11.weight"]
    assert list(repae.LPIPS().heads.state_dict()) == [f"lin{i}.model.1.weight" for i in range(5)]


def test_defaults_are_the_papers_headline_run():
    """Spec Sec. 7 and 8: a run or a sampling command without flags is the paper's."""
    a = repae.parse_args([])
    assert (a.model, a.vae, a.enc_type, a.encoder_depth, a.proj_coeff, a.vae_align_proj_coeff, a.bn_momentum) == \
        ("SiT-XL/2", "f8d4", "dinov2-vit-b", 8, 0.5, 1.5, 0.1)
    assert (a.learning_rate, a.vae_learning_rate, a.disc_learning_rate, a.adam_beta1, a.adam_beta2, a.adam_epsilon,
            a.adam_weight_decay, a.max_grad_norm, a.ema_decay, a.cfg_prob) == \
        (1e-4, 1e-4, 1e-4, 0.9, 0.999, 1e-8, 0.0, 1.0, 0.9999, 0.1)
    assert (a.batch_size, a.max_train_steps, a.resolution, a.num_classes, a.stop_grad) == \
        (256, 400_000, 256, 1000, True)
    s = sample.parse_args(["--ckpt", "c.pt"])
    assert (s.mode, s.num_steps, s.cfg_scale, s.guidance_low, s.guidance_high, s.num_fid_samples) == \
        ("sde", 250, 1.0, 0.0, 1.0, 50_000)


def test_sit_pieces_closed_forms():
    """Spec Sec. 5: t embedded as it is (cosine half first), tanh-GELU MLP, SiLU projector, adaLN-Zero blocks
    that start as the identity, the DiT patch order of unpatchify, and the label dropout to the null row."""
    torch.manual_seed(0)
    emb, seen = repae.TimestepEmbedder(8, freq_dim=8), []
    emb.mlp[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    t = torch.tensor([0.0, 0.5, 1.0])
    emb(t)
    args = t[:, None] * torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(seen[0], torch.cat([args.cos(), args.sin()], 1))
    x = torch.randn(2, 5, 8)
    mlp = repae.SiTBlock(8, num_heads=2).mlp
    h = mlp.fc1(x)
    gelu_tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(mlp(x), mlp.fc2(gelu_tanh))
    proj = repae.projector(8, 16, 4)
    torch.testing.assert_close(proj(x), proj[4](F.silu(proj[2](F.silu(proj[0](x))))))
    sit = repae.SiT(input_size=4, patch_size=2, in_channels=3, hidden_size=8, depth=2, num_heads=2, z_dims=(4,),
                    encoder_depth=1, num_classes=10)
    c = torch.randn(2, 8)
    assert all(torch.equal(block(x, c), x) for block in sit.blocks)           # adaLN-Zero: identity at init
    assert torch.equal(sit.final_layer(x, c), torch.zeros(2, 5, 12))
    # unpatchify: token (r, q) of a 2 x 2 grid, entry (i, j, ch) of its p*p*C vector -> pixel (ch, r*p+i, q*p+j)
    tokens = torch.arange(4 * 12.0).view(1, 4, 12)
    image = sit.unpatchify(tokens)
    for r, q, i, j, ch in np.ndindex(2, 2, 2, 2, 3):
        assert image[0, ch, r * 2 + i, q * 2 + j] == tokens[0, r * 2 + q, (i * 2 + j) * 3 + ch]
    labels, dropped = repae.LabelEmbedder(10, 4, 0.1), []
    labels.embedding_table.register_forward_pre_hook(lambda mod, inp: dropped.append(inp[0]))
    labels(torch.zeros(20_000, dtype=torch.long), train=True)
    labels(torch.zeros(10, dtype=torch.long), train=False)
    assert set(dropped[0].tolist()) == {0, 10} and abs((dropped[0] == 10).float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped[1], torch.zeros(10, dtype=torch.long))         # no dropout outside training
    # DiT's layouts, which the released weights assume: adaLN rows (shift, scale, gate) x (attention, MLP), final
    # layer (shift, scale); timm's qkv rows (q, k, v) x heads, each head a contiguous slice of the width
    block, final = repae.SiTBlock(8, num_heads=2), repae.FinalLayer(8, 2, 3)
    for lin in (block.adaLN_modulation[1], final.adaLN_modulation[1]):
        nn.init.normal_(lin.weight, std=0.5)
    ln = lambda u: F.layer_norm(u, (8,), eps=1e-6)
    mod = block.adaLN_modulation(c)[:, None]
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[..., 8 * i:8 * i + 8] for i in range(6))
    q, k, v = (block.attn.qkv(x)[..., 8 * i:8 * i + 8].view(2, 5, 2, 4).transpose(1, 2) for i in range(3))
    heads = torch.softmax(q @ k.transpose(-1, -2) / 2, dim=-1) @ v                      # (N, heads, T, 4)
    torch.testing.assert_close(block.attn(x), block.attn.proj(heads.transpose(1, 2).reshape(2, 5, 8)))
    x1 = x + gate1 * block.attn(ln(x) * (1 + scale1) + shift1)
    torch.testing.assert_close(block(x, c), x1 + gate2 * block.mlp(ln(x1) * (1 + scale2) + shift2))
    shift, scale = (final.adaLN_modulation(c)[:, None, 8 * i:8 * i + 8] for i in range(2))
    torch.testing.assert_close(final(x, c), final.linear(ln(x) * (1 + scale) + shift))
    # MAE's 2-D sin-cos positions: token (r, q) of a 4 x 4 grid, width 16: sin, cos of q * omega, then of r * omega
    omega = 1 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    pos = repae.SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=1, num_heads=2, z_dims=(4,),
                    encoder_depth=1).pos_embed[0].double()
    for r, q in np.ndindex(4, 4):
        want = torch.cat([(q * omega).sin(), (q * omega).cos(), (r * omega).sin(), (r * omega).cos()])
        torch.testing.assert_close(pos[r * 4 + q], want, rtol=0, atol=1e-6)


def test_sit_aligns_the_tokens_of_block_encoder_depth():
    torch.manual_seed(0)
    sit = repae.SiT(input_size=8, hidden_size=64, depth=4, num_heads=2, z_dims=(16,), encoder_depth=3,
                    num_classes=10).eval()
    for p in sit.parameters():                              # leave adaLN-Zero so that blocks do something
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    h, c = sit.x_embedder(x) + sit.pos_embed, sit.t_embedder(t) + sit.y_embedder(y, False)
    for block in sit.blocks[:3]:
        h = block(h, c)
    torch.testing.assert_close(sit(x, t, y)[1][0], sit.projectors[0](h))


def test_vae_and_discriminator_pieces_closed_forms():
    """Spec Sec. 5 and 3: GroupNorm(32, eps 1e-6); downsample = pad (0, 1, 0, 1) + stride-2 conv; upsample =
    nearest x2 + conv; REPA-E trains on the sampled latent mean + std * eps; PatchGAN LeakyReLU 0.2, BN ~ N(1, .02)."""
    torch.manual_seed(0)
    vae = repae.AutoencoderKL(ch=32, ch_mult=(1, 2), z_channels=4, num_res_blocks=1)
    norms = [m for m in vae.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)
    x = torch.randn(2, 32, 8, 8)
    down, up = repae.Resample(32, up=False), repae.Resample(32, up=True)
    torch.testing.assert_close(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2))
    torch.testing.assert_close(up(x), up.conv(F.interpolate(x, scale_factor=2, mode="nearest")))
    attn, h = repae.AttnBlock(32), torch.randn(2, 32, 4, 4)    # LDM: softmax(q k^T / sqrt(C)) v over the 16 pixels
    q, k, v = (f(attn.norm(h)).flatten(2) for f in (attn.q, attn.k, attn.v))           # (B, C, HW)
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)                  # (B, HW, HW)
    torch.testing.assert_close(attn(h), h + attn.proj_out((v @ w.transpose(1, 2)).view(2, 32, 4, 4)))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    posterior, z, _ = vae(images)
    torch.manual_seed(1)
    q = vae.encode(images)
    assert torch.equal(z, q.mean + q.std * torch.randn_like(q.mean)) and not torch.equal(z, q.mean)
    disc = repae.NLayerDiscriminator()
    assert {m.negative_slope for m in disc.modules() if isinstance(m, nn.LeakyReLU)} == {0.2}
    bn = torch.cat([m.weight for m in disc.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn.mean().item() - 1) < 0.01 and abs(bn.std().item() - 0.02) < 0.005


def test_latent_collapse_probes_closed_forms():
    # paper Table 1's probes on z[b, c, h, w] = 60 b + 20 c + 5 h + w: each (h, w) slice is 0..19 plus an offset
    # (unbiased variance 35), and an image's total variation is 5 x 45 vertical + 1 x 48 horizontal steps
    probes = repae.latent_diagnostics(torch.arange(2 * 3 * 4 * 5.0).view(2, 3, 4, 5))
    assert (probes["latent_var"].item(), probes["latent_tv"].item()) == (35.0, 273.0)


def test_kl_and_l1_closed_forms():
    mean, logvar = torch.full((2, 4, 3, 3), 1.0), torch.full((2, 4, 3, 3), math.log(4.0))
    q = repae.DiagonalGaussian(torch.cat([mean, logvar], 1))
    assert torch.allclose(q.kl(), torch.full((2,), 0.5 * (1 + 4 - 1 - math.log(4)) * 36))
    assert torch.allclose(q.std, torch.full_like(q.std, 2.0)) and torch.equal(q.mode(), mean)
    big = repae.DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 100.0)], 1))
    assert big.logvar.max() == 20.0                          # clamped to [-30, 20]
    x, recon = torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.25)
    lpips, disc = repae.LPIPS(), repae.NLayerDiscriminator()
    _, parts = repae.vae_regulariser(x, recon, q, lpips, disc)
    assert parts["l1"].item() == pytest.approx(0.25) and parts["kl"].item() == pytest.approx(q.kl().mean().item())
    assert repae.LPIPS()(x, x).abs().max() == 0


def test_repa_loss_and_hinge_values():
    a = torch.randn(2, 16, 8)
    assert repae.repa_loss([a], [a * 3.0]).item() == pytest.approx(-1.0)
    e1, e2 = torch.zeros(2, 16, 8), torch.zeros(2, 16, 8)
    e1[..., 0], e2[..., 1] = 1.0, 1.0
    assert repae.repa_loss([e1], [e2]).item() == pytest.approx(0.0)
    assert repae.repa_loss([a.half()], [a.half()]).dtype == torch.float32
    h = lambda r, f: repae.hinge_d_loss(torch.tensor([r]), torch.tensor([f])).item()
    assert h(2.0, -2.0) == 0.0 and h(0.0, 0.0) == 1.0 and h(-1.0, 1.0) == 2.0 and h(0.5, 0.0) == 0.75


def test_latent_stats_round_trip_and_bn_normalises():
    sit = repae.SiT(input_size=8, hidden_size=64, depth=2, num_heads=2, z_dims=(16,), encoder_depth=1, num_classes=10)
    scale, bias = torch.tensor([0.18215, 0.2, 1.3, 1.0]), torch.tensor([0.1, -0.2, 0.3, 0.0])   # 0.2, 1.3: 1 ulp apart
    sit.init_bn(scale, bias)
    s, b = sit.latent_stats()
    assert torch.allclose(s, scale) and torch.equal(b, bias)
    assert torch.equal(sit.bn.running_var, (1 / scale).pow(2))   # the released models/sit.py, bit for bit
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 4
    var = (1 / scale).pow(2).view(1, -1, 1, 1)
    assert torch.allclose(sit.eval().bn(z), (z - bias.view(1, -1, 1, 1)) / torch.sqrt(var + 1e-4), atol=1e-5)
    identity = SimpleNamespace(decode=lambda latent: latent)   # decode_latent's z = z_n / scale + bias, before the VAE
    want = (z - bias.view(1, -1, 1, 1)) * torch.sqrt(var / (var + 1e-4)) + bias.view(1, -1, 1, 1)   # z, up to BN's eps
    torch.testing.assert_close(repae.decode_latent(identity, sit.bn(z), s, b), want)


def test_interpolant_and_velocity_target():
    z_n, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.0, 0.3, 1.0])
    x_t, v = repae.noisy_input(z_n, t, eps)
    assert torch.equal(v, eps - z_n) and torch.equal(x_t[0], z_n[0]) and torch.equal(x_t[2], eps[2])
    assert torch.allclose(x_t[1], 0.7 * z_n[1] + 0.3 * eps[1])
    dt = 1e-3                                               # v is the path's time derivative
    assert torch.allclose((repae.noisy_input(z_n, t + dt, eps)[0] - x_t) / dt, v, atol=1e-3)


def test_sit_forward_modes_share_the_trunk():
    torch.manual_seed(0)
    sit = repae.SiT(input_size=8, hidden_size=64, depth=4, num_heads=2, z_dims=(16, 8), encoder_depth=2,
                    num_classes=10).eval()
    for p in sit.parameters():                              # leave adaLN-Zero so that blocks do something
        p.data.add_(torch.randn_like(p) * 0.02)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    v, zs = sit(x, t, y)
    none, zs_align = sit(x, t, y, mode="align")
    v_sample, no_zs = sit(x, t, y, mode="sample")
    assert none is None and no_zs is None and torch.equal(v, v_sample)
    assert [z.shape for z in zs] == [(2, 16, 16), (2, 16, 8)] and all(torch.equal(a, b) for a, b in zip(zs, zs_align))


#################################################################################
#                 The REPA-E step: stop-gradient, BN, t and noise, EMA           #
#################################################################################

def test_vae_update_gets_grads_sit_none_and_bn_untouched():
    args, m, x, y = tiny_run()
    bn_before = m.sit.bn.running_mean.clone(), m.sit.bn.running_var.clone()
    seen = {}

    def at_vae_step(opt, *_):
        seen["sit_grads"] = [p.grad for p in m.sit.parameters() if p.grad is not None]
        seen["vae_grads"] = sum(p.grad is not None for p in m.vae.parameters())
        seen["bn"] = m.sit.bn.running_mean.clone(), m.sit.bn.running_var.clone()
        seen["sit_training"] = m.sit.training
    m.opt_vae.register_step_pre_hook(at_vae_step)
    logs = step(x, y, m, args)
    assert seen["sit_grads"] == [] and seen["vae_grads"] == len(list(m.vae.parameters()))
    assert not seen["sit_training"]
    assert all(torch.equal(a, b) for a, b in zip(seen["bn"], bn_before))          # VAE pass: running stats kept
    assert not torch.equal(m.sit.bn.running_mean, bn_before[0])                     # SiT pass: updated
    assert all(p.requires_grad for p in list(m.sit.parameters())) and m.sit.pos_embed.requires_grad
    assert {"loss_vae", "vae_l_repa", "l1", "lpips", "kl", "gan", "loss_disc", "loss_sit", "l_diff", "l_repa",
            "grad_norm_vae", "grad_norm_disc", "grad_norm_sit", "latent_var", "latent_tv"} <= set(logs)
    assert all(torch.isfinite(v) for v in logs.values())


def _vae_grads(stop_grad, perturb):
    """VAE gradients of one step; `perturb` changes only the SiT's final layer (what only L_DIFF uses)."""
    args, m, x, y = tiny_run(*([] if stop_grad else ["--no-stop-grad"]))
    with torch.no_grad():
        m.sit.final_layer.linear.weight.normal_(generator=torch.Generator().manual_seed(perturb))
    grads = {}
    m.opt_vae.register_step_pre_hook(lambda *_: grads.update(g=[p.grad.clone() for p in m.vae.parameters()]))
    torch.manual_seed(1)
    step(x, y, m, args)
    return grads["g"]


def test_stop_gradient_keeps_l_diff_out_of_the_vae():
    same = [torch.equal(a, b) for a, b in zip(_vae_grads(True, 1), _vae_grads(True, 2))]
    assert all(same)                                        # VAE gradient does not depend on L_DIFF
    differ = [torch.equal(a, b) for a, b in zip(_vae_grads(False, 1), _vae_grads(False, 2))]
    assert not all(differ)                                  # --no-stop-grad: L_DIFF reaches the VAE


def test_t_and_noise_are_reused(monkeypatch):
    calls, original = [], repae.noisy_input
    monkeypatch.setattr(repae, "noisy_input", lambda z_n, t, eps: calls.append((t, eps)) or original(z_n, t, eps))
    args, m, x, y = tiny_run()
    step(x, y, m, args)
    (t1, e1), (t2, e2) = calls
    assert torch.equal(t1, t2) and torch.equal(e1, e2)


def test_ema_of_parameters_and_buffers():
    args, m, x, y = tiny_run("--ema-decay", "0.9")
    ema0 = {k: v.clone() for k, v in m.ema.state_dict().items()}
    step(x, y, m, args)
    model, ema = m.sit.state_dict(), m.ema.state_dict()
    for k in ("bn.running_mean", "bn.running_var", "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.bias"):
        assert not torch.allclose(model[k], ema0[k], atol=1e-6), k          # it moved, so the weights are seen
        assert torch.allclose(ema[k], 0.9 * ema0[k] + 0.1 * model[k], atol=1e-7), k
    assert ema["bn.num_batches_tracked"] == model["bn.num_batches_tracked"] == 1


def test_frozen_vae_baselines_build_nothing_they_do_not_need():
    args, m, x, y = tiny_run("--freeze-vae")
    vae0 = copy.deepcopy(m.vae.state_dict())
    logs = step(x, y, m, args)
    assert m.disc is None and m.lpips is None and "loss_vae" not in logs
    assert all(torch.equal(v, vae0[k]) for k, v in m.vae.state_dict().items())
    assert torch.equal(m.sit.bn.running_var, torch.ones(4)) and m.sit.bn.num_batches_tracked == 0   # fixed stats
    args, m, x, y = tiny_run("--freeze-vae", "--proj-coeff", "0")              # vanilla SiT
    assert m.encoders == [] and len(m.sit.projectors) == 0
    assert step(x, y, m, args)["l_repa"] == 0


def test_gradient_accumulation_equals_a_reference_loop():
    """--gradient-accumulation-steps 2 against a loop written out here, as accelerate's accumulate runs the
    released step: every micro-batch's three losses / K with the weights of before the update, gradients summed,
    one clip and one AdamW step per model, one EMA update; DDP skips its all-reduce on all but the last."""
    args, m, x, y = tiny_run("--gradient-accumulation-steps", "2", "--ema-decay", "0.5")
    _, ref, _, _ = tiny_run("--ema-decay", "0.5")              # the same weights (same seed)
    batches = [dict(x=x[:2], y=y[:2]), dict(x=x[2:], y=y[2:])]
    entered = []

    class FakeDDP(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            return self.module(*a, **k)

        @contextlib.contextmanager
        def no_sync(self):
            entered.append(1)
            yield
    m.sit_ddp = FakeDDP(m.sit)
    torch.manual_seed(1)
    logs = repae.train_step(batches, m, repae.hparams(args, CPU.device), False, CPU.device)
    assert entered == [1] and {"grad_norm_vae", "grad_norm_disc", "grad_norm_sit"} <= set(logs)
    torch.manual_seed(1)
    for b in batches:                                       # the same draws, in the step's order
        zs = repae.encoder_targets(ref.encoders, b["x"])
        x_vae = b["x"].float() / 127.5 - 1
        posterior, z, recon = ref.vae(x_vae)
        t, eps = torch.rand(len(z)), torch.randn_like(z)
        ref.sit.eval().requires_grad_(False)
        ref.disc.requires_grad_(False)
        z_n = ref.sit.bn(z)
        _, zs_tilde = ref.sit((1 - t.view(-1, 1, 1, 1)) * z_n + t.view(-1, 1, 1, 1) * eps, t, b["y"], mode="align")
        loss_vae = (x_vae - recon).abs().mean() + ref.lpips(x_vae, recon).mean() + 1e-6 * posterior.kl().mean() \
            - 0.1 * ref.disc(recon).mean() + 1.5 * repae.repa_loss(zs_tilde, zs)
        (loss_vae / 2).backward()
        ref.sit.train().requires_grad_(True)
        ref.disc.requires_grad_(True)
        (repae.hinge_d_loss(ref.disc(x_vae), ref.disc(recon.detach())) / 2).backward()
        z_n = ref.sit.bn(z.detach())
        v_pred, zs_tilde = ref.sit((1 - t.view(-1, 1, 1, 1)) * z_n + t.view(-1, 1, 1, 1) * eps, t, b["y"])
        loss_sit = (v_pred - (eps - z_n)).pow(2).mean() + 0.5 * repae.repa_loss(zs_tilde, zs)
        (loss_sit / 2).backward()
    norms = []
    for model, opt in ((ref.vae, ref.opt_vae), (ref.disc, ref.opt_disc), (ref.sit, ref.opt_sit)):
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
    # AdamW and the clip barely see a scaled loss: the pre-clip norms show whether each loss was divided by K
    torch.testing.assert_close(torch.stack([logs[f"grad_norm_{k}"] for k in ("vae", "disc", "sit")]),
                               torch.stack(norms), rtol=1e-5, atol=0)
    repae.update_ema(ref.ema, ref.sit, 0.5)
    for name in ("vae", "disc", "sit", "ema"):
        for (k, a), b in zip(getattr(m, name).state_dict().items(), getattr(ref, name).state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")



#################################################################################
#                       Weights and bad input: one clear sentence                #
#################################################################################

def test_missing_and_mismatched_weights(tmp_path, capsys, monkeypatch):
    args = repae.parse_args(["--vae-ckpt", str(tmp_path / "nope.pt"), "--model", "SiT-S/2"])
    assert "nope.pt' does not exist; pass the right path with --vae-ckpt" in error(capsys, repae.build, args, CPU.device)
    (tmp_path / "b.safetensors").write_bytes(b"")
    with monkeypatch.context() as patch:                    # every named file is checked before any model is built
        patch.setattr(repae, "build", lambda *a: pytest.fail("a model was built"))
        msg = error(capsys, repae.main, smoke_args("--lpips-ckpt", str(tmp_path / "nope.pth"), "--output-dir",
                                                   str(tmp_path / "o")))
        assert "nope.pth' does not exist; pass the right path with --lpips-ckpt" in msg
        msg = error(capsys, repae.main, smoke_args("--enc-type", "dinov2-vit-b,dinov2-vit-l", "--enc-ckpt",
                                                   f"{tmp_path / 'b.safetensors'},{tmp_path / 'l.safetensors'}",
                                                   "--output-dir", str(tmp_path / "o")))
        assert f"weights file '{tmp_path / 'l.safetensors'}' does not exist; pass the right path with --enc-ckpt" in msg
    assert not (tmp_path / "o").exists()
    torch.save(repae.AutoencoderKL(ch=32, ch_mult=(1, 2), z_channels=4, num_res_blocks=1).state_dict(), tmp_path / "v.pt")
    msg = error(capsys, repae.load_state, repae.vae_models["f8d4"](), torch.load(tmp_path / "v.pt"), "--vae-ckpt",
                "--vae-ckpt/--vae")
    assert re.search(r"does not match the model .*missing keys.*shape mismatches.*--vae", msg)
    vae = repae.build_vae(smoke_args())
    for edit, what in ((lambda s: s.pop("quant_conv.bias"), "1 missing keys ['quant_conv.bias'], 0 unexpected keys [], "
                                                             "shape mismatches []"),
                       (lambda s: s.update({"quant_conv.bias": torch.zeros(9)}), "0 missing keys [], 0 unexpected keys "
                        "[], shape mismatches ['quant_conv.bias: file (9,) vs model (8,)']")):
        state = vae.state_dict()
        edit(state)
        assert f"does not match the model ({what}); check --vae-ckpt" in \
            error(capsys, repae.load_state, vae, state, "--vae-ckpt", "--vae-ckpt")
    torch.save(dict(vae=SimpleNamespace(a=1)), tmp_path / "pickled.pt")       # pickled code is never run
    assert "is unreadable" in error(capsys, repae.load_file, str(tmp_path / "pickled.pt"), "--vae-ckpt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in error(capsys, repae.load_file, str(tmp_path / "bad.pt"), "--resume")
    assert f"'{tmp_path}' is a folder, not a file; pass" in error(capsys, repae.need_file, str(tmp_path), "--vae-ckpt")
    torch.save(dict(model={}, ema={}, vae={}, steps=1), tmp_path / "run.pt")     # a training checkpoint as the VAE
    assert "is a REPA-E training checkpoint; write its VAE with sample.py --export-vae" in \
        error(capsys, repae.load_vae, smoke_args("--vae-ckpt", str(tmp_path / "run.pt")))
    torch.save(dict(latents_scale=torch.ones(1, 32, 1, 1), latents_bias=torch.zeros(1, 32, 1, 1)), tmp_path / "s.pt")
    assert "scale and bias of 32 and 32 latent channels, but the VAE has 4" in \
        error(capsys, repae.load_latent_stats, str(tmp_path / "s.pt"), 4)
    torch.save(dict(latents_scale=torch.ones(4), latents_bias=torch.zeros(32)), tmp_path / "s.pt")
    assert "scale and bias of 4 and 32 latent channels" in \
        error(capsys, repae.load_latent_stats, str(tmp_path / "s.pt"), 4)
    torch.save(dict(latents_scale=torch.ones(4)), tmp_path / "s.pt")
    assert "s.pt' has no latents_scale/latents_bias; pass the VAE's -latents-stats.pt with --latents-stats" in \
        error(capsys, repae.load_latent_stats, str(tmp_path / "s.pt"), 4)


def test_write_atomic_leaves_no_partial_file(tmp_path):
    """torch.save on a disk that fills mid-file raises RuntimeError ("unexpected pos"), not OSError: caught the same."""
    def fills_up(f):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 30579648 vs 30579540")
    e = repae.write_atomic(str(tmp_path / "a.pt"), fills_up)
    assert isinstance(e, RuntimeError) and os.listdir(tmp_path) == []
    assert repae.write_atomic(str(tmp_path / "a.pt"), lambda f: f.write(b"ok")) is None
    assert (tmp_path / "a.pt").read_bytes() == b"ok" and os.listdir(tmp_path) == ["a.pt"]


def test_dinov2_offline_is_one_sentence_naming_the_flag(tmp_path, monkeypatch, capsys):
    """The method raises the hub's own error; the program says it in one sentence that names --enc-ckpt."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")               # the hub client fails at once (else after its retries)
    with pytest.raises(OSError):
        repae.load_encoder("dinov2-vit-b", 256)
    args = smoke_args()
    args.random_weights = False
    msg = error(capsys, repae.load_encoders, args)
    assert "DINOv2 weights timm/vit_base_patch14_dinov2.lvd142m are not in the Hugging Face cache" in msg
    assert msg.count("\n") == 1 and "--enc-ckpt" in msg
    args.enc_ckpt = str(tmp_path / "missing.safetensors")      # main and --benchmark both check it in setup
    assert "missing.safetensors' does not exist; pass the right path with --enc-ckpt" in \
        error(capsys, repae.setup, args, CPU)
    with pytest.raises(ValueError, match="dinov2-vit"):
        repae.dinov2_timm_name("mocov3-vit-b")
    assert "--enc-type 'mocov3-vit-b' is not one of" in error(capsys, smoke_args, "--enc-type", "mocov3-vit-b")
    assert repae.dinov2_timm_name("dinov2-vit-l-reg") == "vit_large_patch14_reg4_dinov2.lvd142m"


class _TamingNetLinLayer(nn.Module):
    """taming-transformers' NetLinLayer, the module whose state_dict is vgg.pth: a dropout slot, a 1x1 conv."""
    def __init__(self, c):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Weight files in their publishers' layouts, made by the libraries that define them, with random weights:
    torchvision's vgg16-397923af.pth, taming's vgg.pth, timm's DINOv2 model.safetensors at its published 518 px,
    the REPA-E SD-VAE with its -latents-stats.pt and discriminator, and pytorch-fid's Inception."""
    import safetensors.torch
    import timm
    d = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16().state_dict(), d / "vgg16-397923af.pth")
    heads = nn.Module()
    for i, c in enumerate((64, 128, 256, 512, 512)):
        setattr(heads, f"lin{i}", _TamingNetLinLayer(c))
        nn.init.uniform_(heads.get_submodule(f"lin{i}.model.1").weight, 0, 0.1)   # learned heads are >= 0
    torch.save(heads.state_dict(), d / "vgg.pth")
    dinov2 = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False)
    assert dinov2.pos_embed.shape == (1, 37 * 37 + 1, 384)                   # the 518 px grid of the release
    safetensors.torch.save_file(dinov2.state_dict(), d / "model.safetensors")
    torch.save(repae.vae_models["f8d4"]().state_dict(), d / "sdvae-f8d4.pt")
    torch.save(dict(latents_scale=torch.tensor([0.18, 0.2, 0.25, 0.3]).view(1, 4, 1, 1),
                    latents_bias=torch.tensor([0.1, -0.1, 0.2, 0.0]).view(1, 4, 1, 1)), d / "sdvae-f8d4-latents-stats.pt")
    torch.save(repae.NLayerDiscriminator().state_dict(), d / "sdvae-f8d4-discriminator-ckpt.pt")
    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict(), d / "pt_inception.pth")
    return d


def test_lpips_from_torchvision_vgg16_and_taming_heads_equals_a_direct_computation(published, tmp_path, monkeypatch,
                                                                                   capsys):
    """Named by flag or, without flags, from the torch hub cache, where a missing file is downloaded once."""
    args = smoke_args("--vgg-ckpt", str(published / "vgg16-397923af.pth"), "--lpips-ckpt", str(published / "vgg.pth"))
    args.smoke = False                                      # the published sizes
    lpips = repae.lpips_from_flags(args)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    os.symlink(published / "vgg16-397923af.pth", tmp_path / "checkpoints/vgg16-397923af.pth")
    os.symlink(published / "vgg.pth", tmp_path / "checkpoints/vgg.pth")
    urls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, path, *a, **k: urls.append(url) or
                        (_ for _ in ()).throw(OSError("network is unreachable")))
    cached = repae.load_lpips()
    assert urls == [] and all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(),
                                                                lpips.state_dict().values()))
    os.remove(tmp_path / "checkpoints/vgg.pth")
    args.vgg_ckpt = args.lpips_ckpt = None
    args.random_weights = False
    msg = error(capsys, repae.lpips_from_flags, args)
    assert "could not download the LPIPS weights (network is unreachable)" in msg and urls == [repae.LPIPS_HEADS_URL]
    assert msg.count("\n") == 1 and "--vgg-ckpt and --lpips-ckpt" in msg
    vgg = torchvision.models.vgg16()
    vgg.load_state_dict(torch.load(published / "vgg16-397923af.pth", weights_only=True))
    heads = torch.load(published / "vgg.pth", weights_only=True)
    x, y = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (1, 2))
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    a, b, want, k = ((2 * x - 1) - shift) / scale, ((2 * y - 1) - shift) / scale, 0, 0   # the released [-3, 1] quirk
    with torch.no_grad():
        for i, layer in enumerate(vgg.eval().features):
            a, b = layer(a), layer(b)
            if i in (3, 8, 15, 22, 29):                     # relu1_2 ... relu5_3
                diff = (a / (a.norm(dim=1, keepdim=True) + 1e-10) - b / (b.norm(dim=1, keepdim=True) + 1e-10)) ** 2
                want, k = want + F.conv2d(diff, heads[f"lin{k}.model.1.weight"]).mean((1, 2, 3)), k + 1
        got = lpips(x, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (got > 0).all() and torch.equal(lpips(x, x), torch.zeros(2))
    lpips.train()                                           # frozen: the heads' dropout slots never switch on
    assert not lpips.training and torch.equal(lpips(x, y), got)


def test_dinov2_from_timm_518px_safetensors_resamples_its_positions(published, capsys):
    import timm
    enc = repae.load_encoder("dinov2-vit-s", 64, ckpt=str(published / "model.safetensors"))   # 56 px: a 4 x 4 grid
    # independently: the file's 37 x 37 positions resampled to 4 x 4 by hand, as the released torch.hub route does
    import safetensors.torch
    state = safetensors.torch.load_file(published / "model.safetensors")
    state["pos_embed"] = timm.layers.resample_abs_pos_embed(state["pos_embed"], (4, 4), num_prefix_tokens=1)
    ref = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, img_size=56, num_classes=0).eval()
    ref.load_state_dict(state)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    (tokens,) = repae.encoder_targets([enc], x)
    images = F.interpolate(torchvision.transforms.functional.normalize(x.float() / 255, repae.IMAGENET_MEAN,
                                                                       repae.IMAGENET_STD), size=56, mode="bicubic")
    with torch.no_grad():
        want = ref.forward_features(images)[:, 1:]
    assert tokens.shape == (2, 16, 384) and torch.equal(tokens, want)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    # the published file of another size (s for b), or not a weights file: one sentence naming the flag's order
    def encoders(enc_type, ckpt, smoke=False):
        args = smoke_args("--enc-type", enc_type, "--enc-ckpt", ckpt)
        args.smoke = smoke
        return repae.load_encoders(args)
    msg = error(capsys, encoders, "dinov2-vit-b", str(published / "model.safetensors"))
    assert "as vit_base_patch14_dinov2.lvd142m (RuntimeError: Error(s) in loading state_dict" in msg and \
        "one model.safetensors per --enc-type, in the same order" in msg
    assert "could not load" in error(capsys, encoders, "dinov2-vit-s", str(published / "vgg.pth"))
    # real-size files under --smoke: the message says that --smoke is what shrank the model
    msg = error(capsys, encoders, "dinov2-vit-s", str(published / "model.safetensors"), True)
    assert "(--smoke builds tiny encoders: drop it)" in msg
    msg = error(capsys, repae.load_vae, smoke_args("--vae-ckpt", str(published / "sdvae-f8d4.pt")))
    assert "does not match the model" in msg and "check --vae-ckpt/--vae, --smoke (it builds a tiny VAE)" in msg


def test_dinov2_reg4_targets_drop_the_class_and_the_four_register_tokens():
    enc = repae.load_encoder("dinov2-vit-s-reg", 64, pretrained=False, **repae.SMOKE["encoder"])
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (tokens,) = repae.encoder_targets([enc], x)
    images = F.interpolate(torchvision.transforms.functional.normalize(x.float() / 255, repae.IMAGENET_MEAN,
                                                                       repae.IMAGENET_STD), size=56, mode="bicubic")
    with torch.no_grad():
        everything = enc.forward_features(images)
    assert everything.shape[1] == 1 + 4 + 16 and torch.equal(tokens, everything[:, 5:])


def test_vae_latent_stats_and_discriminator_load_in_the_released_layout(published, capsys, tmp_path):
    args = repae.parse_args(["--model", "SiT-S/2", "--resolution", "64", "--random-weights", "--freeze-vae",
                             "--proj-coeff", "0", "--vae-ckpt", str(published / "sdvae-f8d4.pt")])
    m = repae.build(args, CPU.device)
    vae = torch.load(published / "sdvae-f8d4.pt", weights_only=True)
    assert all(torch.equal(v, vae[k]) for k, v in m.vae.state_dict().items())
    scale, bias = m.sit.latent_stats()                      # BN initialised from the -latents-stats.pt next to it
    assert torch.allclose(scale, torch.tensor([0.18, 0.2, 0.25, 0.3])) and torch.equal(bias, torch.tensor([0.1, -0.1, 0.2, 0.0]))
    disc = repae.NLayerDiscriminator()
    repae.load_state(disc, repae.load_file(str(published / "sdvae-f8d4-discriminator-ckpt.pt"), "--disc-ckpt"), "d", "f")
    assert all(torch.equal(a, b) for a, b in zip(disc.state_dict().values(),
                                                torch.load(published / "sdvae-f8d4-discriminator-ckpt.pt").values()))
    os.rename(published / "sdvae-f8d4-latents-stats.pt", published / "moved.pt")
    try:
        assert "sdvae-f8d4-latents-stats.pt' does not exist; pass the right path with --latents-stats" in \
            error(capsys, repae.build, args, CPU.device)
    finally:
        os.rename(published / "moved.pt", published / "sdvae-f8d4-latents-stats.pt")
    folder = tmp_path / "weights.pt"                       # a '.pt' in a folder name is not the file's extension
    folder.mkdir()
    for name in ("sdvae-f8d4.pt", "sdvae-f8d4-latents-stats.pt"):
        os.symlink(published / name, folder / name)
    args.vae_ckpt = str(folder / "sdvae-f8d4.pt")
    assert torch.equal(repae.build(args, CPU.device).sit.latent_stats()[1], bias)


def test_contradictory_flags_are_refused(monkeypatch, capsys):
    for argv, msg in [(["--freeze-vae", "--no-stop-grad"], "--no-stop-grad"), (["--proj-coeff", "0"], "projector"),
                      (["--resolution", "100"], "multiple of 32"), (["--resolution", "48"], "multiple of 32"),
                      (["--vae", "f16d32"], "--vae f16d32 needs its weights: pass --vae-ckpt"),
                      (["--enc-type", "dinov2-vit-b,dinov2-vit-l", "--enc-ckpt", "b.safetensors"],
                       "--enc-ckpt must name one file per --enc-type encoder (2)"),
                      (["--enc-type", "mocov3-vit-b"], "--enc-type 'mocov3-vit-b' is not one of dinov2-vit")]:
        with pytest.raises(SystemExit):
            repae.parse_args(argv)
        assert msg in capsys.readouterr().err
    # the derived defaults: --benchmark builds random weights, the run folder names the method
    bench = repae.parse_args(["--benchmark", "2"])
    assert bench.random_weights and bench.vae_ckpt is None
    assert [repae.parse_args(f).exp_name for f in ([], ["--no-stop-grad"], ["--freeze-vae"],
                                                    ["--freeze-vae", "--proj-coeff", "0"])] == \
        [f"SiT-XL-2-f8d4-{m}-256" for m in ("repae", "repae-nostopgrad", "repa", "vanilla")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        repae.parse_args(["--batch-size", "3"])
    assert "not divisible" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")                        # a patch size whose token grid is not DINOv2's
    assert "the tokens of --model SiT-XL/4 on --vae f8d4 are not DINOv2's (16 px each); pick a --model patch size " \
           "that matches the VAE (f8d4: SiT-*/2" in error(capsys, smoke_args, "--model", "SiT-XL/4")
    assert smoke_args("--model", "SiT-XL/4", "--freeze-vae", "--proj-coeff", "0").model == "SiT-XL/4"   # no DINOv2


#################################################################################
#            Training run: DDP, exact resume, preemption, data errors            #
#################################################################################

def train(tmp_path, *extra):
    """An in-process smoke training run; returns its run folder."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    repae.main(smoke_args("--output-dir", str(tmp_path), "--log-every", "2", *extra))
    signal.signal(signal.SIGTERM, handlers[0])
    signal.signal(signal.SIGINT, handlers[1])
    return tmp_path / "smoke"


def load_ckpt(path):
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, weights_only=True)


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_resume_is_bitwise_exact(tmp_path):
    # 24 images in micro-batches of 4, K = 2 per update: 3 updates an epoch. The resume at step 4 starts inside
    # epoch 1, after its first update's K micro-batches, and the resumed run crosses into epoch 2.
    flags = ("--max-images", "24", "--batch-size", "4", "--gradient-accumulation-steps", "2")
    one = train(tmp_path / "one", "--max-train-steps", "7", "--checkpointing-steps", "7", *flags)
    two = train(tmp_path / "two", "--max-train-steps", "4", "--checkpointing-steps", "4", *flags)
    with open(two / "metrics.jsonl", "a") as f:             # a row cut short (by a full disk) after the checkpoint
        f.write('{"step": 5, "l_di')
    two = train(tmp_path / "two", "--max-train-steps", "7", "--checkpointing-steps", "7", *flags, "--resume", "auto")
    a, b = load_ckpt(one / "checkpoints/0000007.pt"), load_ckpt(two / "checkpoints/0000007.pt")
    for k in ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "rng", "steps"):
        assert_same(a[k], b[k], k)
    assert not torch.equal(a["ema"]["final_layer.linear.weight"], a["model"]["final_layer.linear.weight"])
    log = (two / "log.txt").read_text()                     # appended to: the first part's lines are kept
    assert "done: steps 0 to 4" in log and "at step 4\n" in log and "not bitwise" not in log
    assert json.loads((two / "args.json").read_text())["max_train_steps"] == 4      # the run's first command, kept
    timing = {"img_per_s", "steps_per_s", "peak_mem_gb", "elapsed_s", "eta_s"}
    metrics = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (one, two)}
    assert [r["step"] for r in metrics[one]] == [2, 4, 6, 7]
    assert {"l_diff", "latent_tv", "bn_var"} | timing <= set(metrics[one][0])
    last = metrics[one][-1]                                 # the EMA SiT's BN (what sampling decodes with), K = 2
    assert (last["bn_mean"], last["bn_var"]) == pytest.approx((a["ema"]["bn.running_mean"].mean().item(),
                                                              a["ema"]["bn.running_var"].mean().item()), rel=1e-6)
    assert last["img_per_s"] == pytest.approx(last["steps_per_s"] * 4 * 2)
    # the resumed run's log is the uninterrupted one's: its row at the resume step kept once, the same losses after it
    assert [{k: v for k, v in r.items() if k not in timing} for r in metrics[one]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in metrics[two]]


def test_ranks_build_the_same_models_then_draw_their_own_randomness():
    # DDP needs identical replicas at step 0; t, eps and label drops must differ across ranks (the released code
    # seeds each process with its own index), or every GPU would draw the same noise for its images
    args, draws = smoke_args(), []
    for rank in (0, 1):
        m = repae.setup(args, SimpleNamespace(**{**vars(CPU), "rank": rank}))[0]
        draws.append((m.sit.state_dict(), m.vae.state_dict(), m.disc.state_dict(), torch.rand(8)))
    for k in range(3):
        assert_same(draws[0][k], draws[1][k])
    assert not torch.equal(draws[0][3], draws[1][3])


def test_sigterm_checkpoints_and_exits(tmp_path, monkeypatch):
    calls, step = [], repae.repae_step

    def step_then_signal(*a):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)           # as a cluster preemption would, mid-step
        return step(*a)
    monkeypatch.setattr(repae, "repae_step", step_then_signal)
    run = train(tmp_path, "--max-train-steps", "100", "--checkpointing-steps", "50")
    assert len(calls) == 3 and sorted(os.listdir(run / "checkpoints")) == ["0000003.pt"]
    args = smoke_args("--output-dir", str(tmp_path), "--resume", "auto")
    m = repae.build(args, CPU.device)
    assert repae.load_checkpoint(str(run / "checkpoints/0000003.pt"), m, args, CPU) == (3, True)
    assert "stopped by signal at step 3" in (run / "log.txt").read_text()


def test_corrupt_checkpoint_is_detected_on_resume(tmp_path, capsys):
    run = train(tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "2")
    path, args = run / "checkpoints/0000002.pt", smoke_args()
    ckpt, m = load_ckpt(path), repae.build(args, CPU.device)
    torch.save({k: v for k, v in ckpt.items() if k != "opt_disc"}, tmp_path / "part.pt")
    assert "part.pt' lacks ['opt_disc']; it is not a training checkpoint of this configuration" in \
        error(capsys, repae.load_checkpoint, str(tmp_path / "part.pt"), m, args, CPU)
    # saved by 2 processes, continued by 3: not bitwise, so each rank reseeds with (seed + rank + step)
    torch.save({**ckpt, "rng": ckpt["rng"] * 2}, tmp_path / "two.pt")
    rank1 = SimpleNamespace(**{**vars(CPU), "world": 3, "rank": 1})
    assert repae.load_checkpoint(str(tmp_path / "two.pt"), m, args, rank1) == (2, False)
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(args.seed + 1 + 2)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert re.search("0000002.pt.*corrupt", error(capsys, train, tmp_path, "--max-train-steps", "4", "--resume", "auto"))


def test_non_finite_loss_stops_without_overwriting_checkpoints(tmp_path, monkeypatch, capsys):
    """A step that leaves NaN weights: the next log or checkpoint step sees the non-finite losses and stops, keeping
    the earlier checkpoints; a NaN loss of one step alone is caught only if that step is logged or checkpointed."""
    step = repae.repae_step
    calls = []

    def nan_weights_at_step_3(x, y, m, hp, sync=True):
        logs = step(x, y, m, hp, sync)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                m.sit.final_layer.linear.bias.fill_(float("nan"))
        return logs
    monkeypatch.setattr(repae, "repae_step", nan_weights_at_step_3)
    msg = error(capsys, train, tmp_path, "--max-train-steps", "6", "--checkpointing-steps", "2", "--log-every", "5",
                code=1)
    assert "non-finite loss or gradient at step 4: " in msg and "l_diff=nan" in msg
    assert "the last good checkpoint is kept in" in msg and "resume from it with --resume auto" in msg
    assert sorted(os.listdir(tmp_path / "smoke/checkpoints")) == ["0000002.pt"]
    calls.clear()                                           # before any checkpoint: says so, not a folder
    msg = error(capsys, train, tmp_path / "b", "--max-train-steps", "6", "--checkpointing-steps", "4", code=1)
    assert "no checkpoint was written before it" in msg and os.listdir(tmp_path / "b/smoke/checkpoints") == []


# A torchrun test's driver counts, last thing at exit, gloo's threads (named gloo_tcp_loop, pt_gloo_runloop): they
# must be joined by then (repae.leave_process_group at exit), or one freeing a tensor during interpreter teardown
# aborts the process (SIGABRT). Other threads may still be ending, as the DataLoader's queue feeders, closed unjoined.
DRIVER_START = """import atexit, os, sys, signal, time, torch, repae
def gloo_threads():
    names = []
    for task in os.listdir('/proc/self/task'):
        try:
            names.append(open(f'/proc/self/task/{task}/comm').read())
        except FileNotFoundError:                           # a thread that ended meanwhile
            pass
    return sum(name.startswith(('gloo', 'pt_gloo')) for name in names)
def threads_left():                                         # a joined thread may take a moment to leave /proc
    deadline = time.monotonic() + 5
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return gloo_threads()
atexit.register(lambda: print(f"threads left: {threads_left()}"))
"""
DRIVER_END = "repae.main(repae.parse_args(sys.argv[1:]))\n"


def torchrun_smoke(tmp_path, patch, *flags):
    """A smoke training run under `torchrun --nproc_per_node=2`, each process running `patch` (Python source that
    wraps repae's functions) before repae.main."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER_START + patch + DRIVER_END)
    return run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", str(driver), "--smoke", "--output-dir",
                   str(tmp_path), *flags, env={"PYTHONPATH": HERE})


def test_a_non_finite_loss_or_a_write_error_on_one_rank_stops_every_rank(tmp_path):
    r = torchrun_smoke(tmp_path, "step, calls = repae.train_step, []\n"
                                 "def nan_on_rank_1(*a):\n"
                                 "    logs = step(*a)\n"
                                 "    calls.append(1)\n"
                                 "    bad = len(calls) == 2 and os.environ['RANK'] == '1'\n"
                                 "    return {**logs, 'l_diff': logs['l_diff'] * float('nan')} if bad else logs\n"
                                 "repae.train_step = nan_on_rank_1\n",
                       "--max-train-steps", "4", "--checkpointing-steps", "4", "--log-every", "2")
    assert r.returncode != 0 and "non-finite loss or gradient at step 2: l_diff=nan" in r.stderr   # the ranks' mean
    assert r.stdout.count("threads left: 0") == 2           # an error exit, too, joins gloo's threads
    assert os.listdir(tmp_path / "smoke/checkpoints") == [] and "done:" not in (tmp_path / "smoke/log.txt").read_text()
    # a checkpoint that rank 0 cannot write (a full disk) stops rank 1 too, with the same exit status
    (tmp_path / "disk").mkdir()
    patch = ("save, main = torch.save, repae.main\n"
             "def full_disk(obj, f, **kw):\n"
             "    if getattr(f, 'name', '').endswith('.pt.tmp'):\n"
             "        raise OSError(28, 'No space left on device')\n"
             "    save(obj, f, **kw)\n"
             "torch.save = full_disk\n"
             "def main_exit(args):\n"
             "    try:\n"
             "        main(args)\n"
             "    except SystemExit as e:\n"
             "        rank = os.environ['RANK']\n"
             "        open(f'{args.output_dir}/exit.rank{rank}', 'w').write(str(e.code))\n"
             "        raise\n"
             "repae.main = main_exit\n")
    r = torchrun_smoke(tmp_path / "disk", patch, "--max-train-steps", "2", "--checkpointing-steps", "2")
    assert r.returncode != 0 and "could not write checkpoint" in r.stderr and "No space left on device" in r.stderr
    assert [(tmp_path / f"disk/exit.rank{i}").read_text() for i in (0, 1)] == ["1", "1"]
    assert r.stdout.count("threads left: 0") == 2
    (tmp_path / "crash").mkdir()                             # a crash: its traceback, and gloo's threads joined
    r = torchrun_smoke(tmp_path / "crash", "def crash(*a):\n"
                                           "    raise RuntimeError('out of memory')\n"
                                           "repae.train_step = crash\n", "--max-train-steps", "2")
    assert r.returncode != 0 and "RuntimeError: out of memory" in r.stderr and r.stdout.count("threads left: 0") == 2


def test_fp16_gradient_overflow_is_skipped_by_the_grad_scaler_not_a_stop(tmp_path, monkeypatch, capsys):
    """--mixed-precision fp16, by its CPU stand-in: the loss scale a long run reaches by doubling (here from the start)
    overflows the gradients; GradScaler skips those updates and halves its scale, and the run goes on. A non-finite
    loss still stops it."""
    build, hparams = repae.build, repae.hparams

    def fp16(args, device):
        m = build(args, device)
        m.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
        return m
    monkeypatch.setattr(repae, "build", fp16)
    monkeypatch.setattr(repae, "hparams", lambda *a: dataclasses.replace(hparams(*a), amp_dtype=torch.float16))
    small = ("--resolution", "32")                          # fp16 on a CPU is slow; the scaler does not care
    run = train(tmp_path, *small, "--max-train-steps", "2", "--checkpointing-steps", "2", "--log-every", "1")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not math.isfinite(rows[0]["grad_norm_sit"]) and all(math.isfinite(r["l_diff"]) for r in rows)
    scale = load_ckpt(run / "checkpoints/0000002.pt")["scaler"]["scale"]
    assert scale < 2.0 ** 100
    run = train(tmp_path, *small, "--max-train-steps", "3", "--checkpointing-steps", "3", "--resume", "auto")
    assert load_ckpt(run / "checkpoints/0000003.pt")["scaler"]["scale"] <= scale    # resumed, not a new 2 ** 100
    step = repae.repae_step
    monkeypatch.setattr(repae, "repae_step", lambda *a: {**step(*a), "l_diff": torch.tensor(float("nan"))})
    assert "non-finite loss or gradient at step 2: l_diff=nan" in error(capsys, train, tmp_path / "b", *small, code=1)


def make_images(folder, classes=2, per_class=4, size=(80, 70)):
    for c in range(classes):
        os.makedirs(folder / f"class{c}", exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * c, 10 * i, 90)).save(folder / f"class{c}" / f"{i}.png")


def test_data_errors_are_found_before_anything_is_written(tmp_path, capsys):
    def first_image_broken(d):
        make_images(d, 2, 4)
        (d / "class0" / "0.png").write_bytes(b"no png")
    for setup, msg in [(lambda d: None, "is not a folder with one sub-folder"),
                       (lambda d: d.mkdir(), "is not a folder with one sub-folder of images per class"),
                       (lambda d: (d / "a").mkdir(parents=True), "holds 0 images"),
                       (lambda d: make_images(d, 1, 3), "fewer than one update"),
                       (first_image_broken, "cannot read the first image")]:
        d = tmp_path / f"data{len(msg)}"
        setup(d)
        out = tmp_path / f"out{len(msg)}"
        assert msg in error(capsys, repae.main, smoke_args("--data-dir", str(d), "--output-dir", str(out)))
        assert not out.exists()                             # a refused run leaves no folder behind
    make_images(tmp_path / "three", 3, 4)
    for flags, msg in [(["--num-classes", "2"], "holds 12 images (.jpg, .png, ...) in 3 class sub-folders for "
                                                "--num-classes 2; it needs images, and no more classes than that"),
                       (["--batch-size", "4", "--gradient-accumulation-steps", "4"],
                        "has 12 images, fewer than one update (--batch-size 4 x --gradient-accumulation-steps 4)")]:
        assert msg in error(capsys, repae.main, smoke_args("--data-dir", str(tmp_path / "three"), *flags))


def test_a_broken_image_mid_run_is_skipped_and_named(tmp_path, capsys, monkeypatch):
    d = tmp_path / "data"
    make_images(d, 2, 4)
    (d / "class1" / "bad.png").write_bytes(b"no png")       # sorted after 0.png ... 3.png: not the first image
    Image.new("RGB", (200, 200)).save(d / "class1" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 pixels: PIL's DecompressionBombError
    run = train(tmp_path, "--data-dir", str(d), "--max-train-steps", "4", "--log-every", "4", "--batch-size", "4")
    err = capsys.readouterr().err
    assert "warning: skipped unreadable image" in err and "huge.png' (Image size (40000 pixels) exceeds" in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4
    ds = repae.ImageFolder(str(d), 64)                      # bad.png (item 8), huge.png (9): the next readable, 0
    item = ds[8]
    assert ds.targets[8] == 1 and item["y"] == 0 and torch.equal(item["x"], ds[0]["x"])
    assert load_ckpt(run / "checkpoints/0000004.pt")["steps"] == 4


def test_image_folder_adm_crop(tmp_path):
    make_images(tmp_path / "d", 2, 4, size=(300, 200))
    ds = repae.build_dataset(smoke_args("--data-dir", str(tmp_path / "d"), "--max-images", "4", "--batch-size", "4"))
    x, y = ds[3]["x"], ds[3]["y"]
    assert len(ds) == 4 and x.dtype == torch.uint8 and x.shape == (3, 64, 64) and y == 1
    assert repae.center_crop_arr(Image.new("RGB", (1000, 600)), 64).shape == (64, 64, 3)
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))     # short side 2x: BOX-halved
    assert np.array_equal(repae.center_crop_arr(square, 64), np.asarray(square.resize((64, 64), Image.BOX)))
    wide = Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))       # under 2x: one BICUBIC resize
    assert np.array_equal(repae.center_crop_arr(wide, 64), np.asarray(wide.resize((96, 64), Image.BICUBIC))[:, 16:80])
    odd = Image.fromarray(rng.integers(0, 256, (100, 159, 3), dtype=np.uint8))        # 159 x 0.64 = 101.76: 102
    assert np.array_equal(repae.center_crop_arr(odd, 64), np.asarray(odd.resize((102, 64), Image.BICUBIC))[:, 19:83])


def test_two_process_gloo_run_keeps_replicas_identical_and_skips_a_broken_image(tmp_path):
    make_images(tmp_path / "data", 2, 8)
    (tmp_path / "data/class1/bad.png").write_bytes(b"no png")     # 17 images: each rank draws 8 of them an epoch
    r = torchrun_smoke(
        tmp_path,
        "save = repae.save_checkpoint\n"
        "def per_rank(path, m, args, step, d):\n"
        "    torch.save(dict(sit=m.sit.state_dict(), vae=list(m.vae.parameters()), disc=list(m.disc.parameters()),\n"
        "                    ema=m.ema.state_dict(), rng=torch.get_rng_state()), f'{path}.rank{d.rank}')\n"
        "    save(path, m, args, step, d)\n"
        "repae.save_checkpoint = per_rank\n"
        "step = repae.train_step\n"
        "def logged(micro, *a):\n"
        "    logs, out = step(micro, *a), sys.argv[sys.argv.index('--output-dir') + 1]\n"
        "    rank = repae.dist.get_rank()\n"
        "    torch.save({k: v.item() for k, v in logs.items()}, f'{out}/logs.rank{rank}')\n"
        "    return logs\n"
        "repae.train_step = logged\n",
        "--max-train-steps", "3", "--checkpointing-steps", "3", "--data-dir", str(tmp_path / "data"),
        "--gradient-accumulation-steps", "2")
    assert r.returncode == 0 and r.stdout.count("threads left: 0") == 2, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"smoke/checkpoints/0000003.pt.rank{i}", weights_only=True) for i in (0, 1))
    rngs = [r["cpu"] for r in load_ckpt(tmp_path / "smoke/checkpoints/0000003.pt")["rng"]]   # each rank's own stream
    assert torch.equal(rngs[0], a.pop("rng")) and torch.equal(rngs[1], b.pop("rng")) and not torch.equal(*rngs)
    assert_same(a, b)
    assert "2 processes on cpu" in (tmp_path / "smoke/log.txt").read_text()
    rows = [json.loads(line) for line in (tmp_path / "smoke/metrics.jsonl").read_text().splitlines()]
    assert "warning: skipped unreadable image" in r.stderr  # the rank that drew it names it
    # the logged losses and norms of step 3 are the mean of the two ranks' own values
    ranks = [torch.load(tmp_path / f"logs.rank{i}") for i in (0, 1)]
    assert ranks[0]["l_diff"] != ranks[1]["l_diff"]
    assert {k: rows[-1][k] for k in ranks[0]} == pytest.approx({k: (ranks[0][k] + ranks[1][k]) / 2 for k in ranks[0]},
                                                                rel=1e-5)


def test_smoke_cli_end_to_end(tmp_path):
    r = run_cli("repae.py", "--smoke", "--output-dir", str(tmp_path), "--max-train-steps", "4",
                "--checkpointing-steps", "4", "--log-every", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "smoke"
    assert "random weights" in r.stdout and "done: steps 0 to 4" in r.stdout and "smoke-size SiT-XL/2" in r.stdout
    assert r.stdout.count("saved checkpoint") == 1          # the last step's checkpoint is not written twice
    assert json.loads((run / "args.json").read_text())["smoke"] is True
    assert load_ckpt(run / "checkpoints/0000004.pt")["steps"] == 4


#################################################################################
#        Real weights, GPUs and the released step (files in their layouts)       #
#################################################################################

def test_real_weights_path_end_to_end(tmp_path, published):
    """No --smoke, no --random-weights: every pretrained piece from its file, 2 steps on an ImageFolder, then
    sample.py on the checkpoint and fid.py on the samples, as a user with downloaded weights runs them."""
    w, env = published, {"HF_HUB_OFFLINE": "1"}
    make_images(tmp_path / "data", 2, 2)
    r = run_cli("repae.py", "--data-dir", str(tmp_path / "data"), "--model", "SiT-S/2", "--resolution", "64",
                "--num-classes", "2", "--enc-type", "dinov2-vit-s", "--encoder-depth", "4", "--batch-size", "2",
                "--max-train-steps", "2", "--checkpointing-steps", "2", "--log-every", "1",
                "--num-workers", "0", "--output-dir", str(tmp_path / "exps"), "--exp-name", "real",
                "--vae-ckpt", str(w / "sdvae-f8d4.pt"), "--disc-pretrained-ckpt", str(w / "sdvae-f8d4-discriminator-ckpt.pt"),
                "--vgg-ckpt", str(w / "vgg16-397923af.pth"), "--lpips-ckpt", str(w / "vgg.pth"),
                "--enc-ckpt", str(w / "model.safetensors"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "random weights" not in r.stdout and "done: steps 0 to 2" in r.stdout
    ckpt = load_ckpt(tmp_path / "exps/real/checkpoints/0000002.pt")
    assert ckpt["model"]["pos_embed"].shape == (1, 16, 384) and ckpt["args"].vae_ckpt == str(w / "sdvae-f8d4.pt")
    r = run_cli("sample.py", "--ckpt", str(tmp_path / "exps/real/checkpoints/0000002.pt"), "--sample-dir",
                str(tmp_path / "s"), "--num-fid-samples", "4", "--pproc-batch-size", "4", "--num-steps", "2",
                "--mode", "ode", "--cfg-scale", "2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (npz,) = [tmp_path / "s" / f for f in os.listdir(tmp_path / "s") if f.endswith(".npz")]
    assert np.load(npz)["arr_0"].shape == (4, 64, 64, 3)
    np.savez(tmp_path / "ref.npz", arr_0=np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64)))
                                                    for p in sorted((tmp_path / "data").rglob("*.png"))]))
    r = run_cli("fid.py", str(npz), str(tmp_path / "ref.npz"), "--inception-ckpt", str(w / "pt_inception.pth"),
                "--metrics", "is,pr", "--device", "cpu", "--batch-size", "4", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"IS", "Precision", "Recall"} <= {line.split(":")[0] for line in r.stdout.splitlines()}


def test_resume_path_and_epochs_keep_their_released_meaning(tmp_path):
    run = train(tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "2", "--max-images", "16")
    other = train(tmp_path / "b", "--resume", str(run / "checkpoints/0000002.pt"), "--max-train-steps", "3",
                  "--max-images", "16")                       # continues checkpoints/0000002.pt in a new run folder
    assert f"resumed from {run}/checkpoints/0000002.pt at step 2" in (other / "log.txt").read_text()
    assert sorted(os.listdir(other / "checkpoints")) == ["0000003.pt"]
    one_epoch = train(tmp_path / "c", "--epochs", "1", "--max-train-steps", "10", "--max-images", "16", "--batch-size",
                      "4", "--gradient-accumulation-steps", "2")
    assert sorted(os.listdir(one_epoch / "checkpoints")) == ["0000002.pt"]     # 16 images, 2 x 4 an update: 2 steps
    assert json.loads((one_epoch / "metrics.jsonl").read_text().splitlines()[-1])["eta_s"] == 0    # the end is step 2


def test_released_training_checkpoint_resumes_and_samples(tmp_path, capsys):
    """A checkpoint in the released train_repae.py layout (no RNG states, its own args Namespace) continues
    training here (not bitwise: the RNG streams are new) and samples."""
    run = train(tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "2")
    ours = load_ckpt(run / "checkpoints/0000002.pt")
    released_args = argparse.Namespace(**{**vars(ours["args"]), "report_to": "wandb", "resume_step": 0,
                                          "loss_cfg_path": "configs/l1_lpips_kl_gan.yaml"})   # smoke sizes stand in
    torch.save(dict({k: ours[k] for k in ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc")},
                    args=released_args, steps=2), tmp_path / "0000002.pt")
    out = train(tmp_path / "cont", "--max-train-steps", "3", "--resume", str(tmp_path / "0000002.pt"))
    assert "resumed from" in (out / "log.txt").read_text() and "not bitwise" in (out / "log.txt").read_text()
    assert load_ckpt(out / "checkpoints/0000003.pt")["steps"] == 3
    assert _sample_run(str(tmp_path / "0000002.pt"), tmp_path / "s").shape == (6, 64, 64, 3)


def test_each_optimiser_is_adamw_over_its_model_with_the_flags_values():
    args = smoke_args("--learning-rate", "2e-4", "--vae-learning-rate", "3e-4", "--disc-learning-rate", "5e-4",
                      "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-epsilon", "1e-6", "--adam-weight-decay",
                      "0.05")
    m = repae.build(args, CPU.device)
    for opt, lr, model in ((m.opt_sit, 2e-4, m.sit), (m.opt_vae, 3e-4, m.vae), (m.opt_disc, 5e-4, m.disc)):
        (group,) = opt.param_groups
        assert type(opt) is torch.optim.AdamW
        assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (lr, (0.8, 0.95), 1e-6, 0.05)


def test_pos_embed_is_trained_in_repae_and_frozen_with_a_frozen_vae():
    """As the released train_repae.py: pos_embed gets the SiT's gradient, counts in its clip norm, is updated by
    its AdamW and EMA'd; train_ldm_only.py (--freeze-vae) never unfreezes it."""
    args, m, x, y = tiny_run()
    p0, e0, seen = m.sit.pos_embed.detach().clone(), m.ema.pos_embed.clone(), {}
    m.opt_sit.register_step_pre_hook(lambda *_: seen.update(
        pos=m.sit.pos_embed.grad.clone(), total=torch.stack([p.grad.norm() for p in m.sit.parameters()
                                                             if p.grad is not None]).norm()))
    logs = step(x, y, m, args)
    assert seen["pos"].abs().sum() > 0 and any(p is m.sit.pos_embed for p in list(m.sit.parameters()))
    # the clip saw pos_embed: the clipped gradients, pos_embed's included, have norm min(pre-clip norm, 1)
    assert seen["total"].item() == pytest.approx(min(logs["grad_norm_sit"].item(), 1.0), rel=1e-4)
    assert not torch.equal(m.sit.pos_embed, p0) and not torch.equal(m.ema.pos_embed, e0)
    args, m, x, y = tiny_run("--freeze-vae")
    p0 = m.sit.pos_embed.detach().clone()
    step(x, y, m, args)
    assert torch.equal(m.sit.pos_embed, p0) and m.sit.pos_embed.grad is None


def test_more_processes_than_gpus_is_refused_before_any_model(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # a one-GPU machine, torchrun with 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(repae, "build", lambda *a: pytest.fail("a model was built"))
    monkeypatch.setattr(repae, "build_dataset", lambda *a: pytest.fail("the data was read"))
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    msg = error(capsys, repae.main, smoke_args())
    assert "2 processes on this machine but 1 visible GPU(s)" in msg and "--nproc_per_node=1" in msg
    assert "CUDA_VISIBLE_DEVICES" in msg and len(msg.splitlines()) == 1


@pytest.fixture
def restore_determinism(monkeypatch):
    """--deterministic and --allow-tf32 change process-wide switches; the tests that set them put them back."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             [getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in ("flash", "mem_efficient", "cudnn")],
             (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic = saved[1]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3]
    for name, on in zip(("flash", "mem_efficient", "cudnn"), saved[2]):
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)


def test_deterministic_sets_every_switch_before_cuda_work(restore_determinism):
    """The CPU stand-in of the CUDA resume test below: --deterministic turns on deterministic algorithms, cuBLAS's
    fixed workspace, deterministic cuDNN, and the math attention backward (flash's accumulates with atomics);
    --allow-tf32 sets both TF32 switches."""
    repae.init_distributed(deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                or torch.backends.cuda.cudnn_sdp_enabled())
    for tf32 in (False, True):                              # --no-allow-tf32: full float32 matmuls and convolutions
        repae.init_distributed(allow_tf32=tf32)
        assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == tf32


@cuda_only
def test_resume_is_bitwise_exact_on_cuda_with_deterministic(tmp_path, restore_determinism):
    flags = ("--deterministic", "--max-images", "16", "--mixed-precision", "bf16")
    one = train(tmp_path / "one", "--max-train-steps", "4", "--checkpointing-steps", "4", *flags)
    two = train(tmp_path / "two", "--max-train-steps", "2", "--checkpointing-steps", "2", *flags)
    two = train(tmp_path / "two", "--max-train-steps", "4", "--checkpointing-steps", "2", "--resume", "auto", *flags)
    a, b = load_ckpt(one / "checkpoints/0000004.pt"), load_ckpt(two / "checkpoints/0000004.pt")
    assert "on cuda" in (one / "log.txt").read_text()
    for k in ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "steps"):
        assert_same(a[k], b[k], k)


@cuda_only
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_real_weights_path_on_cuda_trains_and_resumes(tmp_path, published, precision):
    """On a GPU, under autocast: every pretrained piece from its publisher's file, 2 steps, then a resume to 3."""
    w = published
    make_images(tmp_path / "data", 2, 2)
    flags = ["--data-dir", str(tmp_path / "data"), "--model", "SiT-S/2", "--resolution", "64", "--num-classes", "2",
             "--enc-type", "dinov2-vit-s", "--encoder-depth", "4", "--batch-size", "2", "--checkpointing-steps", "1",
             "--log-every", "1", "--num-workers", "0", "--output-dir", str(tmp_path / "exps"), "--exp-name", "real",
             "--vae-ckpt", str(w / "sdvae-f8d4.pt"), "--vgg-ckpt", str(w / "vgg16-397923af.pth"), "--lpips-ckpt",
             str(w / "vgg.pth"), "--enc-ckpt", str(w / "model.safetensors"), "--mixed-precision", precision]
    for steps, resume in (("2", []), ("3", ["--resume", "auto"])):
        r = run_cli("repae.py", *flags, "--max-train-steps", steps, *resume, env={"HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "exps/real/log.txt").read_text()
    dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[precision]
    assert "processes on cuda" in log and f"precision {dtype}" in log and "discriminator: from" in log
    assert "resumed from" in log and "done: steps 2 to 3" in log
    rows = [json.loads(r) for r in (tmp_path / "exps/real/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["l_diff"]) for r in rows)
    ckpt = load_ckpt(tmp_path / "exps/real/checkpoints/0000003.pt")
    assert (ckpt["scaler"]["scale"] > 0) if precision == "fp16" else not ckpt["scaler"], ckpt["scaler"]


#################################################################################
#          Nothing is lost, and every bad input gets one sentence                #
#################################################################################

def snapshot(folder):
    """Every file under `folder` with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_never_changes_an_earlier_run(tmp_path, capsys):
    (tmp_path / "smoke").mkdir()                            # an empty run folder (made for a job's logs) is no run
    run = train(tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "2")
    before = snapshot(run)
    msg = error(capsys, train, tmp_path, "--max-train-steps", "2")
    assert "already holds a run with checkpoints up to 0000002.pt; continue it with --resume auto, or start " \
           "another with a new --exp-name" in msg and snapshot(run) == before
    train(tmp_path, "--max-train-steps", "2", "--resume", "auto")                  # nothing to do: says so
    assert "is at step 2, the last of --max-train-steps 2 and --epochs 1400: nothing to do" in capsys.readouterr().err
    assert snapshot(run) == before
    train(tmp_path, "--max-train-steps", "4", "--checkpointing-steps", "2", "--resume", "auto")   # checkpoints 2, 4
    before = snapshot(run)                                  # going back to 2 there would drop 3, 4 and keep 4.pt
    msg = error(capsys, train, tmp_path, "--max-train-steps", "6", "--resume", str(run / "checkpoints/0000002.pt"))
    assert "holds a run with checkpoints up to 0000004.pt; continuing it from" in msg and "with a new --exp-name" in msg
    msg = error(capsys, train, tmp_path / "other", "--resume", str(run / "checkpoints/0000003.pt"))
    assert "0000003.pt' does not exist; name an existing one with --resume" in msg
    assert snapshot(run) == before and not (tmp_path / "other").exists()


def test_smoke_and_random_weights_load_the_files_they_are_given(tmp_path):
    torch.manual_seed(5)
    vae = repae.build_vae(smoke_args())
    torch.save(vae.state_dict(), tmp_path / "v.pt")
    torch.save(dict(latents_scale=torch.full((1, 4, 1, 1), 0.5), latents_bias=torch.full((1, 4, 1, 1), 0.25)),
               tmp_path / "v-latents-stats.pt")
    for flags in (["--smoke"], ["--random-weights", "--model", "SiT-S/2", "--resolution", "64"]):
        args = repae.parse_args([*flags, "--vae-ckpt", str(tmp_path / "v.pt"), "--vae", "f8d4"] +
                                ([] if "--smoke" in flags else ["--freeze-vae", "--proj-coeff", "0"]))
        if "--smoke" not in flags:                          # a full-size f8d4 for the full-size SiT
            torch.save(repae.vae_models["f8d4"]().state_dict(), tmp_path / "v.pt")
        m = repae.build(args, CPU.device)
        assert all(torch.equal(a, b) for a, b in zip(m.vae.state_dict().values(),
                                                    torch.load(tmp_path / "v.pt", weights_only=True).values()))
        assert torch.allclose(m.sit.latent_stats()[0], torch.full((4,), 0.5)) and args.vae_ckpt == str(tmp_path / "v.pt")
    lpips, disc = repae.LPIPS(narrow=4), repae.NLayerDiscriminator()     # L_REG's files: --smoke's quarter-wide LPIPS
    for module in (lpips, disc):
        for p in module.parameters():
            nn.init.uniform_(p)
    torch.save({f"features.{k}": v for k, v in lpips.features.state_dict().items()}, tmp_path / "vgg.pth")
    torch.save(lpips.heads.state_dict(), tmp_path / "heads.pth")
    torch.save(disc.state_dict(), tmp_path / "d.pt")
    m = repae.build(smoke_args("--vgg-ckpt", str(tmp_path / "vgg.pth"), "--lpips-ckpt", str(tmp_path / "heads.pth"),
                               "--disc-pretrained-ckpt", str(tmp_path / "d.pt")), CPU.device)
    for got, want in ((m.lpips, lpips), (m.disc, disc)):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))


def test_smoke_defaults_never_override_given_flags_and_names_must_be_exact(tmp_path):
    args = smoke_args("--max-train-steps", "2", "--batch-size", "4", "--data-dir", str(tmp_path))
    assert (args.max_train_steps, args.batch_size, args.checkpointing_steps) == (2, 4, 20)
    make_images(tmp_path / "d", 4, 2)
    assert smoke_args("--data-dir", str(tmp_path / "d")).num_classes == 10                # --smoke's default
    assert smoke_args("--data-dir", str(tmp_path / "d"), "--num-classes", "7").num_classes == 7
    assert repae.parse_args([]).data_dir == "data" and smoke_args().data_dir is None   # the released default
    ds = repae.SmokeImages(20, 64, 10)                      # no folder: class i % 10, each image its own disc
    assert ds[3]["y"] == ds[13]["y"] == 3 and not torch.equal(ds[3]["x"], ds[13]["x"])
    r = run_cli(os.path.join(HERE, "repae.py"), "--smoke", "--max-train-step", "2", cwd=tmp_path)   # abbreviated
    assert r.returncode == 2 and r.stdout == "" and not (tmp_path / "exps").exists()
    assert r.stderr == "repae.py: error: unrecognized arguments: --max-train-step 2 (see repae.py --help)\n"


RELEASED_LOSS_CFG = """model:
    vq_model:
        quantize_mode: vae

losses:
    discriminator_start: 0
    discriminator_factor: 1.0
    discriminator_weight: 0.1
    quantizer_weight: 1.0
    perceptual_loss: "lpips"
    perceptual_weight: 1.0
    reconstruction_loss: "l1"
    reconstruction_weight: 1.0
    lecam_regularization_weight: 0.0
    kl_weight: 1e-6
    logvar_init: 0.0
"""


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--gradient-accumulation-steps", "x"], "argument --gradient-accumulation-steps: invalid number value: 'x'"),
    (["--freeze-vae", "--lpips-ckpt", "vgg.pth"], "which a frozen VAE (--freeze-vae) never computes; drop them"),
    (["--vae-ckpt", "v.pt", "--freeze-vae", "--disc-ckpt", "d.pt"], "drop them"),
    (["--benchmark", "2", "--resume", "auto"], "--benchmark times random weights; drop --resume"),
    (["--proj-coeff", "0"], "--proj-coeff 0 leaves the projector untrained, so L_REPA cannot guide the VAE"),
    # the released flags that do nothing here: unknown, named in one line (README: what differs)
    (["--report-to", "wandb", "--loss-cfg-path", "c.yaml", "--prediction", "v"],
     "unrecognized arguments: --report-to wandb --loss-cfg-path c.yaml --prediction v"),
    (["--resume-step", "2", "--vae-latents-name", "c"], "unrecognized arguments: --resume-step 2 --vae-latents-name c"),
    (["--path-type", "cosine", "--weighting=lognormal"],
     "unrecognized arguments: --path-type cosine --weighting=lognormal"),
    ])
def test_bad_flags_get_one_sentence(tmp_path, argv, message, capsys):
    msg = error(capsys, smoke_args, *argv)
    assert message in msg and len(msg.splitlines()) == 1


def test_an_encoder_depth_beyond_the_sit_is_one_sentence(capsys):
    msg = error(capsys, repae.parse_args, ["--model", "SiT-B/2", "--encoder-depth", "13", "--random-weights"])
    assert "--encoder-depth 13 is deeper than --model SiT-B/2; pass a smaller one" in msg and len(msg.splitlines()) == 1
    assert repae.parse_args(["--model", "SiT-B/2", "--encoder-depth", "12", "--random-weights"]).encoder_depth == 12


def test_output_folder_disk_space_and_write_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    msg = error(capsys, repae.main, smoke_args("--output-dir", str(tmp_path / "file" / "x")))
    assert "is a file or read-only, so the run folder" in msg and "pass another --output-dir" in msg
    with monkeypatch.context() as patch:                    # root may write anywhere: os.access stands in
        patch.setattr(os, "access", lambda path, mode: path != str(tmp_path))
        msg = error(capsys, repae.main, smoke_args("--output-dir", str(tmp_path / "out")))
    assert f"'{tmp_path}' is a file or read-only, so the run folder" in msg and "pass another --output-dir" in msg
    assert not (tmp_path / "out").exists()
    run = train(tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "2")
    before = snapshot(run / "checkpoints")
    os.symlink("/dev/full", run / "checkpoints/0000004.pt.tmp")   # writing there fails with ENOSPC: a full disk
    msg = error(capsys, train, tmp_path, "--max-train-steps", "4", "--checkpointing-steps", "2", "--resume", "auto",
                code=1)
    assert "could not write checkpoint" in msg and "No space left on device" in msg and "--resume auto" in msg
    assert snapshot(run / "checkpoints") == before          # the earlier checkpoint intact, no temporary file left
    rows = (run / "metrics.jsonl").read_bytes()
    os.symlink("/dev/full", run / "metrics.jsonl.tmp")       # a resume rewrites the metrics up to its checkpoint
    msg = error(capsys, train, tmp_path, "--max-train-steps", "4", "--resume", "auto", code=1)
    assert f"could not rewrite '{run / 'metrics.jsonl'}' ([Errno 28] No space left on device); free some space" in msg
    assert (run / "metrics.jsonl").read_bytes() == rows and not os.path.lexists(run / "metrics.jsonl.tmp")


def test_torchrun_flag_errors_report_once_and_preemption_exits_zero(tmp_path):
    """Under torchrun one process reports a bad flag; a scheduler's SIGTERM to the whole process group (here sent by
    rank 0 at step 2) ends with a checkpoint and exit status 0 when the launcher leaves SIGTERM to the workers."""
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", "repae.py", "--smoke", "--batch-size", "3",
                "--output-dir", str(tmp_path), env={"PYTHONPATH": HERE})
    assert r.returncode != 0 and (r.stdout + r.stderr).count("repae.py: error: ") == 1
    assert "--batch-size 3 is global and not divisible by the 2 processes" in r.stderr
    driver = tmp_path / "driver.py"
    driver.write_text(
        DRIVER_START +
        "step, calls = repae.repae_step, []\n"
        "def signalled(*a):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2 and os.environ['RANK'] == '0':\n"
        "        os.kill(os.getppid(), signal.SIGTERM)           # the whole job: the launcher,\n"
        "        os.killpg(os.getpgid(0), signal.SIGTERM)        # and the workers (each in its own session)\n"
        "    return step(*a)\n"
        "repae.repae_step = signalled\n" + DRIVER_END)
    torchrun = f"{sys.executable} -m torch.distributed.run --nproc_per_node=2 {driver} --smoke --output-dir {tmp_path} " \
               f"--max-train-steps 50"
    r = subprocess.run(["bash", "-c", f"trap '' TERM; exec {torchrun}"], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1",
                            "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT", "PET_SIGNALS_TO_HANDLE": "SIGINT"},
                       start_new_session=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "smoke/checkpoints")) == ["0000002.pt"]
    assert "stopped by signal at step 2" in (tmp_path / "smoke/log.txt").read_text()
    assert r.stdout.count("threads left: 0") == 2, r.stdout    # the signal handler holds no model or process group


def test_export_refuses_a_frozen_vae_run(tmp_path, capsys):
    run = train(tmp_path, "--freeze-vae", "--max-train-steps", "1", "--checkpointing-steps", "1")
    msg = error(capsys, sample.export_vae, sample.parse_args(["--export-vae", str(run / "checkpoints/0000001.pt"),
                                                              "--output-dir", str(tmp_path / "e2e")]))
    assert "comes from a frozen-VAE run" in msg and not (tmp_path / "e2e").exists()


def test_messages_name_the_truth(tmp_path, capsys, monkeypatch):
    long = "a reason " * 40 + "that ends here"              # 370 characters: printed whole, never cut mid-word
    (tmp_path / "x.pt").write_bytes(b"")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(long + "\nmore")))
    msg = error(capsys, repae.load_file, str(tmp_path / "x.pt"), "--vae-ckpt")      # never torch's advice
    assert "a reason" not in msg and msg.count("\n") == 1 and msg.rstrip().endswith("pass another with --vae-ckpt")
    monkeypatch.undo()
    make_images(tmp_path / "d", 2, 4)
    run = train(tmp_path, "--data-dir", str(tmp_path / "d"), "--max-train-steps", "1", "--batch-size", "4")
    log = (run / "log.txt").read_text()
    assert "8 training images" in log and "procedural" not in log and "smoke-size SiT-XL/2" in log
    assert repae.parse_args([]).num_workers <= len(os.sched_getaffinity(0))      # no DataLoader warning


#################################################################################
#                 Speed tooling and the E2E-VAE export                           #
#################################################################################

def test_benchmark_prints_every_figure():
    r = run_cli("repae.py", "--benchmark", "2", "--smoke", "--batch-size", "4", "--peak-tflops", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    median = lambda k: float(lines[k].split()[1])
    assert median("step_time_ms") > 0 and float(lines["images_per_s"]) > 0
    assert float(lines["peak_memory_gb"].split()[0]) > 0 and "2 timed steps" in lines["benchmark"]
    flops = float(lines["flops_per_step"].split()[0]) * 1e12                      # MFU = FLOPs / time / peak
    assert flops > 0 and float(lines["mfu"].split("%")[0]) == pytest.approx(
        100 * flops / (median("step_time_ms") / 1000) / 0.5e12, rel=0.01, abs=0.06)
    assert "recompiles): 0" in lines["warmup_s"]


def test_benchmark_figures_follow_from_the_step_times(monkeypatch, capsys, restore_determinism):
    """On a clock that the n-th step call advances by n^2 x 10 ms: call 1 counts the FLOPs, calls 2-3 warm up,
    calls 4-6 are timed (160, 250, 360 ms); one graph compiled during them is a recompile."""
    clock, calls, real_step = [0.0], [], repae.repae_step
    monkeypatch.setattr(repae, "time", SimpleNamespace(perf_counter=lambda: clock[0], time=time.time))
    monkeypatch.setitem(torch._dynamo.utils.counters["stats"], "unique_graphs", 0)

    def step(x, y, m, hp, sync=True):
        calls.append(len(x))
        n = len(calls)
        torch._dynamo.utils.counters["stats"]["unique_graphs"] += n == 5
        logs = real_step(x, y, m, hp, sync)
        clock[0] += n * n * 10 / 1000
        return logs
    monkeypatch.setattr(repae, "repae_step", step)
    repae.benchmark(smoke_args("--benchmark", "3", "--batch-size", "4", "--peak-tflops", "0.5"))
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert calls == [4] * 6 and out["step_time_ms"] == "median 250.0 min 160.0 max 360.0"
    flops = float(out["flops_per_step"].split()[0]) * 1e12
    assert out["images_per_s"] == "16.00" and out["mfu"].endswith("% of 0.5 TFLOP/s dense bf16")
    assert float(out["mfu"].split("%")[0]) == pytest.approx(100 * flops / 0.25 / 0.5e12, abs=0.06)
    assert out["warmup_s"] == "0.1 (2 steps); graphs compiled: 0, then in the timed steps (recompiles): 1"


def test_flop_count_of_a_sit_forward_equals_its_closed_form():
    """The count --benchmark divides by the step time: 2 FLOPs per multiply-add of every linear and convolution,
    and 4 T^2 D per attention layer (counted on the CPU too)."""
    N, T, D, p, C, P = 2, 16, 64, 2, 4, 32                 # batch, tokens, width, patch, channels, projector width
    sit = repae.SiT(input_size=8, patch_size=p, in_channels=C, hidden_size=D, depth=3, num_heads=2, z_dims=(16,),
                    encoder_depth=2, num_classes=10, projector_dim=P)
    block = N * (2 * T * D * (3 * D + D + 4 * D + 4 * D) + 4 * T * T * D + 2 * D * 6 * D)   # qkv, proj, mlp; adaLN
    rest = N * (2 * T * C * p * p * D + 2 * (256 * D + D * D) + 2 * D * 2 * D + 2 * T * D * p * p * C
                + 2 * T * (D * P + P * P + P * 16))        # patch embed, t embedding, final layer, projector
    flops = repae.count_flops(sit, torch.randn(N, C, 8, 8), torch.rand(N), torch.zeros(N, dtype=torch.long))
    assert flops == 3 * block + rest


def test_compiled_step_matches_eager(monkeypatch):
    """--compile's graph capture (dynamo + AOT autograd) gives the eager losses. The CPU code generator
    (inductor) takes minutes to build on two cores, so the test compiles with the aot_eager backend."""
    torch._dynamo.reset()
    args, m, x, y = tiny_run(seed=3)
    torch.manual_seed(7)
    eager = step(x, y, m, args)
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager", **kw))
    args, m, x, y = tiny_run("--compile", seed=3)
    repae.compile_blocks(m)
    torch.manual_seed(7)
    compiled = step(x, y, m, args)
    for k in eager:
        assert torch.allclose(eager[k], compiled[k], rtol=1e-4, atol=1e-5), k
    torch._dynamo.reset()


def test_export_vae_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    vae = repae.vae_models["f8d4"]()
    sit = repae.SiT_models["SiT-S/2"](input_size=8, z_dims=(16,), encoder_depth=2)
    sit.init_bn(torch.tensor([0.18215, 0.2, 0.3, 0.4]), torch.tensor([0.1, 0.0, -0.1, 0.2]))
    online = copy.deepcopy(sit)
    online.init_bn(torch.ones(4), torch.zeros(4))           # the statistics are the EMA SiT's, not the online one's
    official = dict(model=online.state_dict(), ema=sit.state_dict(), vae=vae.state_dict(), steps=400_000,
                    args=argparse.Namespace(vae="f8d4", model="SiT-S/2"))        # released REPA-E layout
    torch.save(official, tmp_path / "0400000.pt")
    r = run_cli("sample.py", "--export-vae", str(tmp_path / "0400000.pt"), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = repae.vae_models["f8d4"]()
    fresh.load_state_dict(torch.load(tmp_path / "out/e2e-f8d4-0400000.pt", weights_only=True), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), vae.state_dict().values()))
    scale, bias = repae.load_latent_stats(str(tmp_path / "out/e2e-f8d4-0400000-latents-stats.pt"), 4)
    assert torch.equal(scale, sit.bn.running_var.rsqrt()) and torch.equal(bias, sit.bn.running_mean)
    exported = (tmp_path / "out/e2e-f8d4-0400000.pt").read_bytes()   # another export there never overwrites it
    argv = ["--export-vae", str(tmp_path / "0400000.pt"), "--output-dir", str(tmp_path / "out")]
    assert "already exists" in error(capsys, sample.export_vae, sample.parse_args(argv))
    assert (tmp_path / "out/e2e-f8d4-0400000.pt").read_bytes() == exported
    del official["vae"]
    torch.save(official, tmp_path / "ldm.pt")
    r = run_cli("sample.py", "--export-vae", str(tmp_path / "ldm.pt"))
    assert r.returncode != 0 and "end-to-end" in r.stderr


def test_frozen_training_on_an_exported_vae(tmp_path, monkeypatch, capsys):
    run = train(tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "2")
    export = sample.parse_args(["--export-vae", str(run / "checkpoints/0000002.pt"), "--output-dir",
                                str(tmp_path / "e2e")])
    save = torch.save                                       # a disk that fills on the statistics file
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", lambda obj, f: save(obj, f) if "latents-stats" not in f.name else
                      (_ for _ in ()).throw(OSError(28, "No space left on device")))
        assert "-latents-stats.pt' ([Errno 28] No space left on device); free some space and export again" in \
            error(capsys, sample.export_vae, export, code=1)
    assert not (tmp_path / "e2e/e2e-f8d4-0000002.pt").exists()    # the VAE is written last: no half export
    assert not (tmp_path / "e2e/e2e-f8d4-0000002").exists()
    r = run_cli("sample.py", "--export-vae", str(run / "checkpoints/0000002.pt"), "--output-dir", str(tmp_path / "e2e"))
    assert r.returncode == 0, r.stderr[-3000:]
    vae_path = tmp_path / "e2e/e2e-f8d4-0000002.pt"
    disc = torch.load(tmp_path / "e2e/e2e-f8d4-0000002-discriminator-ckpt.pt", weights_only=True)   # released name
    assert all(torch.equal(v, disc[k]) for k, v in load_ckpt(run / "checkpoints/0000002.pt")["discriminator"].items())
    scale, bias = repae.load_latent_stats(str(vae_path).replace(".pt", "-latents-stats.pt"), 4)
    args = smoke_args("--freeze-vae", "--vae-ckpt", str(vae_path))  # --smoke loads the VAE it is given
    m = repae.wrap_distributed(repae.build(args, CPU.device), CPU)
    assert torch.allclose(m.sit.latent_stats()[0], scale) and torch.equal(m.sit.latent_stats()[1], bias)
    exported = torch.load(vae_path, weights_only=True)
    x, y = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), torch.arange(4)
    step(x, y, m, args)
    assert all(torch.equal(v, exported[k]) for k, v in m.vae.state_dict().items())
    assert m.disc is None and m.lpips is None and m.opt_vae is None
    repae.save_checkpoint(str(tmp_path / "frozen.pt"), m, args, 1, CPU)
    assert {"discriminator", "opt_vae", "opt_disc"}.isdisjoint(load_ckpt(tmp_path / "frozen.pt"))


#################################################################################
#        The tuned VAE as a product: diffusers folders, reconstructions          #
#################################################################################

def diffusers_vae(ours, folder, **config):
    """diffusers' own AutoencoderKL with the config.json fields of our VAE, random weights, saved to `folder`."""
    import diffusers                                        # test-only: the programs never import it
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**{k: v for k, v in repae.diffusers_config(ours).items() if k != "_class_name"},
                                  **config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    ref.save_pretrained(folder)
    return ref


def vae_flags(vae_ckpt, name="f8d4"):
    """What repae.load_vae reads: a smoke-size VAE of layout `name` with the weights at `vae_ckpt`."""
    return SimpleNamespace(vae=name, smoke=True, vae_ckpt=str(vae_ckpt), latents_stats=None)


@pytest.mark.parametrize("name", ["f8d4", "f16d32"])
def test_a_diffusers_vae_encodes_and_decodes_as_diffusers_does(name, tmp_path):
    """The folder, its .safetensors, and a file with diffusers' attention names before 0.14 (query/key/value/
    proj_attn) load; f16d32 has attention at its lowest level (AttnDownEncoderBlock2D, AttnUpDecoderBlock2D)."""
    import safetensors.torch
    ours = repae.build_vae(SimpleNamespace(vae=name, smoke=True))
    c = ours.z_channels
    mean, std = torch.linspace(-0.5, 0.5, c), torch.linspace(0.5, 2.0, c)
    ref = diffusers_vae(ours, tmp_path / "vae", latents_mean=mean.tolist(), latents_std=std.tolist())
    weights = safetensors.torch.load_file(tmp_path / "vae/diffusion_pytorch_model.safetensors")
    old_names = dict(to_q="query", to_k="key", to_v="value")
    old = {re.sub(r"\.(to_[qkv])\.", lambda m: f".{old_names[m[1]]}.", k).replace(".to_out.0.", ".proj_attn."): v
           for k, v in weights.items()}
    assert len(set(old) - set(weights)) == 16 + 24 * (name == "f16d32")   # 8 per attention: 2 mid (+ 3 lowest)
    shutil.copytree(tmp_path / "vae", tmp_path / "old")
    safetensors.torch.save_file(old, tmp_path / "old/diffusion_pytorch_model.safetensors")
    z, x = torch.randn(2, c, 2, 2), torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        image, latent = ref.decode(z).sample, ref.encode(x).latent_dist.mode()
        for path in ("vae", "vae/diffusion_pytorch_model.safetensors", "old"):
            vae, (scale, bias) = repae.load_vae(vae_flags(tmp_path / path, name))
            torch.testing.assert_close(vae.decode(z), image, rtol=0, atol=1e-5)
            torch.testing.assert_close(vae.encode(x).mode(), latent, rtol=0, atol=1e-5)
            torch.testing.assert_close(scale, 1 / std)
            assert torch.equal(bias, mean)


def test_a_diffusers_vae_our_vae_cannot_be_is_one_sentence_naming_the_field(tmp_path, capsys):
    diffusers_vae(repae.build_vae(smoke_args()), tmp_path / "vae")
    config = json.loads((tmp_path / "vae/config.json").read_text())
    for field, value in (("latent_channels", 8), ("block_out_channels", [32, 64, 64, 64]), ("layers_per_block", 2)):
        (tmp_path / "vae/config.json").write_text(json.dumps({**config, field: value}))
        msg = error(capsys, repae.load_vae, vae_flags(tmp_path / "vae"))
        assert f"is a diffusers VAE with {field} {value}, but" in msg and msg.count("\n") == 1, msg


def test_export_vae_writes_a_diffusers_folder_that_diffusers_and_repae_load(tmp_path, capsys, monkeypatch):
    import diffusers
    ckpt, sit, vae = _sample_tiny(tmp_path)
    out, argv = tmp_path / "out", ["--export-vae", ckpt, "--output-dir", str(tmp_path / "out")]
    write = repae.write_atomic
    with monkeypatch.context() as patch:                    # a full disk at the folder's weights: no half folder
        patch.setattr(repae, "write_atomic", lambda path, fn: OSError(28, "No space left on device")
                      if path.endswith(".safetensors") else write(path, fn))
        msg = error(capsys, sample.export_vae, sample.parse_args(argv), code=1)
    assert "e2e-f8d4-0000020' ([Errno 28] No space left on device); free some space and export again" in msg
    assert os.listdir(out) == ["e2e-f8d4-0000020-latents-stats.pt"]           # no folder, no .tmp, no VAE
    sample.export_vae(sample.parse_args(argv))
    folder = out / "e2e-f8d4-0000020"
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ref = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ref.decode(z).sample, vae.decode(z), rtol=0, atol=1e-5)
    stats = torch.load(out / "e2e-f8d4-0000020-latents-stats.pt", weights_only=True)
    scale, bias = stats["latents_scale"].flatten(), stats["latents_bias"].flatten()
    assert torch.equal(scale, sit.bn.running_var.rsqrt()) and torch.equal(bias, sit.bn.running_mean)
    torch.testing.assert_close(1 / torch.tensor(ref.config.latents_std), scale)   # the EMA BN's statistics
    assert torch.equal(torch.tensor(ref.config.latents_mean), bias) and ref.config.sample_size == 64
    assert ref.config.scaling_factor == pytest.approx(sit.bn.running_var.mean().item() ** -0.5)
    loaded, (folder_scale, folder_bias) = repae.load_vae(vae_flags(folder))
    released = torch.load(out / "e2e-f8d4-0000020.pt", weights_only=True)
    assert all(torch.equal(v, released[k]) and torch.equal(v, vae.state_dict()[k])
               for k, v in loaded.state_dict().items())
    torch.testing.assert_close(folder_scale, scale)
    assert torch.equal(folder_bias, bias)
    own = _sample_run(ckpt, tmp_path / "own")               # sample.py --vae-ckpt takes the folder too
    assert np.array_equal(_sample_run(ckpt, tmp_path / "folder", "--vae-ckpt", str(folder)), own)
    os.remove(out / "e2e-f8d4-0000020.pt")                 # the folder alone is an earlier export too
    assert f"'{folder}' already exists" in error(capsys, sample.export_vae, sample.parse_args(argv))


def noise_images(folder, n=6):
    """n random-pixel images of various sizes in two class folders, so the ADM crop shows in every pixel."""
    rng = np.random.default_rng(0)
    for i, (w, h) in zip(range(n), [(80, 70), (70, 96), (40, 40), (33, 65), (130, 64), (64, 32)]):
        os.makedirs(folder / f"class{i % 2}", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"class{i % 2}/{i}.png")


def _reconstruct(weights, out, *flags, n=5):
    """sample.py --reconstruct of the first n images of tmp_path/d at 32 px, 2 a batch; (real, recon) arrays."""
    sample.reconstruct(sample.parse_args(["--reconstruct", *weights, "--data-dir", str(out.parent / "d"),
                                          "--resolution", "32", "--num-fid-samples", str(n), "--pproc-batch-size",
                                          "2", "--sample-dir", str(out), *flags]))
    return [np.load(next(out.glob(f"*-{side}.npz")))["arr_0"] for side in ("real", "recon")]


def test_reconstructions_are_the_adm_crops_and_their_decoded_posterior_mode(tmp_path, capsys, monkeypatch):
    ckpt, _, vae = _sample_tiny(tmp_path)
    noise_images(tmp_path / "d")
    real, recon = _reconstruct(["--ckpt", ckpt], tmp_path / "s")
    printed = capsys.readouterr().out
    paths = [p for p, _ in repae.ImageFolder(str(tmp_path / "d"), 32).samples[:5]]   # the loader's sorted order
    crops = torch.stack([repae.load_image(p, 32) for p in paths])
    assert real.shape == (5, 32, 32, 3) and np.array_equal(real, crops.permute(0, 2, 3, 1).numpy())
    with torch.no_grad():                                   # the run's batches [0, 1], [2, 3], [4]
        x = torch.cat([vae.decode(vae.encode(c.float() / 127.5 - 1).mode()) for c in crops.split(2)])
    assert np.array_equal(recon, (255 * (x + 1) / 2).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    mse = ((real.astype(np.float64) - recon) ** 2).mean(axis=(1, 2, 3))
    assert f"PSNR {np.mean(10 * np.log10(255 ** 2 / mse)):.3f} dB, the mean over the 5 images" in printed
    a = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", a ^ np.array([0, 1], np.uint8)[:, None, None, None])   # MSE 0 and 1
    assert sample.psnr(tmp_path / "a.npz", tmp_path / "b.npz") == pytest.approx((100 + 20 * math.log10(255)) / 2)
    # the run's VAE exported, as a file and as a diffusers folder, reconstructs the same (the smoke VAE as f8d4)
    sample.export_vae(sample.parse_args(["--export-vae", ckpt, "--output-dir", str(tmp_path / "e2e")]))
    monkeypatch.setitem(repae.vae_models, "f8d4", functools.partial(repae.AutoencoderKL, ch=32, ch_mult=(1, 1, 2, 2),
                                                                    z_channels=4, num_res_blocks=1))
    for i, weights in enumerate(("e2e/e2e-f8d4-0000020.pt", "e2e/e2e-f8d4-0000020")):
        pair = _reconstruct(["--vae-ckpt", str(tmp_path / weights)], tmp_path / f"v{i}")
        assert np.array_equal(pair[0], real) and np.array_equal(pair[1], recon)
    assert "holds 6 images, fewer than --num-fid-samples 7; pass --num-fid-samples 6 or fewer" in \
        error(capsys, lambda: _reconstruct(["--ckpt", ckpt], tmp_path / "x", n=7))
    assert "other settings" in error(capsys, _reconstruct, ["--ckpt", ckpt], tmp_path / "s", "--no-tf32")
    assert "--resolution 36 is not a multiple of 8" in \
        error(capsys, _reconstruct, ["--ckpt", ckpt], tmp_path / "y", "--resolution", "36")


def test_reconstruct_in_two_processes_equals_one_and_a_resume_redoes_only_the_missing_pngs(tmp_path, capsys):
    ckpt, _, _ = _sample_tiny(tmp_path)
    noise_images(tmp_path / "d")
    flags = ["--reconstruct", "--ckpt", ckpt, "--data-dir", str(tmp_path / "d"), "--resolution", "32",
             "--num-fid-samples", "6", "--pproc-batch-size", "2"]
    threads = torch.get_num_threads()

    def one(out):                                           # single-threaded, as torchrun's workers
        torch.set_num_threads(1)
        try:
            sample.reconstruct(sample.parse_args(flags + ["--sample-dir", str(out)]))
        finally:
            torch.set_num_threads(threads)
        return capsys.readouterr().out
    psnr = re.compile(r"PSNR [\d.]+ dB")
    printed = one(tmp_path / "one")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER_START + "import sample\nsample.reconstruct(sample.parse_args(sys.argv[1:]))\n")
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver), *flags,
                "--sample-dir", str(tmp_path / "two"), env={"PYTHONPATH": HERE})
    assert r.returncode == 0 and "with 2 process(es)" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("threads left: 0") == 2 and psnr.findall(r.stdout) == psnr.findall(printed)
    name = "e2e-d-32px-n6"
    npz = {side: (tmp_path / f"one/{name}-{side}.npz").read_bytes() for side in ("real", "recon")}
    assert all((tmp_path / f"two/{name}-{side}.npz").read_bytes() == data for side, data in npz.items())
    pngs = sorted((tmp_path / "two").glob("*/*.png"))
    assert len(pngs) == 12
    mtimes = {p: p.stat().st_mtime_ns for p in pngs}
    for i in (1, 4):                                        # batches [0, 1] and [4, 5] are redone
        (tmp_path / f"two/{name}-recon/{i:06d}.png").unlink()
    printed = one(tmp_path / "two")
    assert "6 images in" in printed and ": 2 already there" in printed
    assert psnr.findall(printed) == psnr.findall(r.stdout)
    assert all((tmp_path / f"two/{name}-{side}.npz").read_bytes() == data for side, data in npz.items())
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.name not in ("000001.png", "000004.png")
               or "real" in p.parent.name)                  # kept PNGs are never rewritten


def test_export_and_reconstruct_refuse_the_flags_they_do_not_read(capsys):
    for argv, msg in [(["--export-vae", "r.pt", "--reconstruct", "--grid"], "reads no other flag; drop --grid, "
                                                                           "--reconstruct"),
                      (["--reconstruct", "--ckpt", "r.pt", "--data-dir", "d", "--cfg-scale", "2", "--model",
                        "SiT-B/2"], "with no SiT or sampler; drop --cfg-scale, --model"),
                      (["--reconstruct", "--ckpt", "r.pt"], "--reconstruct needs the images: pass --data-dir"),
                      (["--reconstruct", "--data-dir", "d"], "(--vae-ckpt); give one"),
                      (["--reconstruct", "--data-dir", "d", "--ckpt", "r.pt", "--vae-ckpt", "v"], "give one"),
                      (["--ckpt", "r.pt", "--data-dir", "d"], "add --reconstruct, or drop --data-dir"),
                      (["--ckpt", "r.pt", "--output-dir", "o"], "--output-dir is where --export-vae writes"),
                      (["--vae-ckpt", "v.pt"], "name the checkpoint with --ckpt")]:
        err = error(capsys, sample.parse_args, argv)
        assert msg in err and err.count("\n") == 1, (argv, err)
    assert sample.parse_args(["--export-vae", "r.pt"]).output_dir == "pretrained/e2e"
    r = run_cli("-c", "import sys, repae, sample, fid; print([m for m in sys.modules if m.startswith('diffusers')])")
    assert r.returncode == 0 and r.stdout == "[]\n", r.stderr      # diffusers is for the tests only


#################################################################################
#            The released workflow: the same commands, script names aside         #
#################################################################################

# The four commands of the released README (End2End-Diffusion/REPA-E), after the launcher and the script name
RELEASED_COMMANDS = {
    "train_repae.py": """--max-train-steps=400000 --report-to="wandb" --allow-tf32 --mixed-precision="fp16" --seed=0
        --data-dir="data" --output-dir="exps" --batch-size=256 --path-type="linear" --prediction="v"
        --weighting="uniform" --model="SiT-XL/2" --checkpointing-steps=50000
        --loss-cfg-path="configs/l1_lpips_kl_gan.yaml" --vae="f8d4" --vae-ckpt="pretrained/sdvae/sdvae-f8d4.pt"
        --disc-pretrained-ckpt="pretrained/sdvae/sdvae-f8d4-discriminator-ckpt.pt" --enc-type="dinov2-vit-b"
        --proj-coeff=0.5 --encoder-depth=8 --vae-align-proj-coeff=1.5 --bn-momentum=0.1
        --exp-name="sit-xl-dinov2-b-enc8-repae-sdvae-0.5-1.5-400k\"""",
    "train_ldm_only.py": """--max-train-steps=4000000 --report-to="wandb" --allow-tf32 --mixed-precision="fp16" --seed=0
        --data-dir="data" --batch-size=256 --path-type="linear" --prediction="v" --weighting="uniform"
        --model="SiT-XL/1" --checkpointing-steps=50000 --vae="f16d32"
        --vae-ckpt="pretrained/e2e-vavae/e2e-vavae-400k.pt" --vae-latents-name="e2e-vavae" --learning-rate=1e-4
        --enc-type="dinov2-vit-b" --proj-coeff=0.5 --encoder-depth=8 --output-dir="exps"
        --exp-name="sit-xl-1-dinov2-b-enc8-ldm-only-e2e-vavae-0.5-4m\"""",
    "generate.py": """--num-fid-samples 50000 --path-type linear --mode sde --num-steps 250 --cfg-scale 1.0
        --guidance-high 1.0 --guidance-low 0.0 --exp-path pretrained/sit-ldm-e2e-vavae --train-steps 4000000""",
}
OUR_SCRIPTS = {"train_repae.py": "repae.py", "train_ldm_only.py": "repae.py", "generate.py": "sample.py"}


# The released flags that do nothing here (--prediction, --path-type, --weighting: v, the linear path and uniform t
# are the only choices), and train_ldm_only.py's latent cache, which --freeze-vae replaces
DROPPED = r'--(report-to|prediction|path-type|weighting|loss-cfg-path|vae-latents-name)[= ]"?[^" ]*"?'


def test_the_released_commands_run_with_only_the_script_and_the_dropped_flags_changed(tmp_path, monkeypatch):
    """Each released command, launcher and script name aside, without DROPPED (--freeze-vae for the cache), plus
    --smoke for training models of toy size (it changes no flag the command gives): train REPA-E, train a SiT on an
    E2E-VAE (encoding each batch: no cache), generate."""
    import shlex
    monkeypatch.chdir(tmp_path)
    argv = lambda name: OUR_SCRIPTS[name].split()[1:] + \
        shlex.split(re.sub(DROPPED, "", RELEASED_COMMANDS[name])) + \
        ["--smoke"] * (name != "generate.py") + ["--freeze-vae"] * (name == "train_ldm_only.py")
    make_images(tmp_path / "data", 2, 128)                    # --batch-size=256
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/l1_lpips_kl_gan.yaml").write_text(RELEASED_LOSS_CFG)
    for name, vae in (("sdvae/sdvae-f8d4", "f8d4"), ("e2e-vavae/e2e-vavae-400k", "f16d32")):
        os.makedirs(tmp_path / "pretrained" / os.path.dirname(name))
        model = repae.build_vae(SimpleNamespace(vae=vae, smoke=True))     # as downloaded, at smoke size
        torch.save(model.state_dict(), tmp_path / f"pretrained/{name}.pt")
        torch.save(dict(latents_scale=torch.ones(1, model.z_channels, 1, 1),
                        latents_bias=torch.zeros(1, model.z_channels, 1, 1)), tmp_path / f"pretrained/{name}-latents-stats.pt")
    torch.save(repae.NLayerDiscriminator().state_dict(), tmp_path / "pretrained/sdvae/sdvae-f8d4-discriminator-ckpt.pt")
    handlers, steps = signal.getsignal(signal.SIGTERM), (repae.repae_step, repae.frozen_vae_step)

    def preempted_at_step_1(step):                          # both runs would take days: a scheduler stops them
        return lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM) or step(*a, **k)
    for name, step in zip(("repae_step", "frozen_vae_step"), steps):
        monkeypatch.setattr(repae, name, preempted_at_step_1(step))
    try:
        repae.main(repae.parse_args(argv("train_repae.py")))
        assert os.listdir("exps/sit-xl-dinov2-b-enc8-repae-sdvae-0.5-1.5-400k/checkpoints") == ["0000001.pt"]
        repae.main(repae.parse_args(argv("train_ldm_only.py")))
    finally:
        signal.signal(signal.SIGTERM, handlers)
    run = tmp_path / "exps/sit-xl-1-dinov2-b-enc8-ldm-only-e2e-vavae-0.5-4m"
    ckpt = load_ckpt(run / "checkpoints/0000001.pt")
    assert ckpt["args"].freeze_vae and "discriminator" not in ckpt
    os.makedirs("pretrained/sit-ldm-e2e-vavae/checkpoints")
    shutil.copy(run / "checkpoints/0000001.pt", "pretrained/sit-ldm-e2e-vavae/checkpoints/4000000.pt")
    generate, batches = sample.generate, []

    class Enough(Exception):
        pass

    def first_batch_only(*a):                               # 50,000 samples: the first batch of 128 is enough
        if batches:
            raise Enough
        batches.append(1)
        return generate(*a)
    monkeypatch.setattr(sample, "generate", first_batch_only)
    with pytest.raises(Enough):
        sample.main(sample.parse_args(argv("generate.py")))
    (folder,) = os.listdir("samples")
    assert folder == "sit-ldm-e2e-vavae-4000000-sde250-cfg1.0-0.0-1.0-seed0-n50000"
    assert len([f for f in os.listdir(f"samples/{folder}") if f.endswith(".png")]) == 128


#################################################################################
#          README: every command parses, every cited function exists          #
#################################################################################

def readme_commands():
    """(script, argv) of every repae.py / sample.py / fid.py call in the README's bash blocks."""
    import re
    import shlex
    text = open(os.path.join(HERE, "README.md")).read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split("#")[0]) if not part.strip().startswith("#") else []
                for i, w in enumerate(words):
                    if w in ("repae.py", "sample.py", "fid.py"):
                        yield w, words[i + 1:]


def test_readme_commands_match_the_argument_parsers(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)                             # where the released commands find the released config
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/l1_lpips_kl_gan.yaml").write_text(RELEASED_LOSS_CFG)
    parsers = {"repae.py": repae.parse_args, "sample.py": sample.parse_args, "fid.py": fid.parse_args}
    seen = {name: 0 for name in parsers}
    for script, argv in readme_commands():
        parsers[script](argv)                               # exits with the parser's message on a bad flag
        seen[script] += 1
    assert seen["repae.py"] >= 13 and seen["sample.py"] >= 4 and seen["fid.py"] >= 1


def test_readme_cites_functions_that_exist():
    text = open(os.path.join(HERE, "README.md")).read()
    cited = re.findall(r"`(repae|sample|fid)\.py: ([A-Za-z_][A-Za-z0-9_]*)`", text)
    assert len(cited) >= 8, cited
    assert not re.search(r"\b(repae|sample|fid)\.py:\d", text), "a line-number citation; cite the function by name"
    missing = [f"{f}.py: {name}" for f, name in cited if not hasattr({"repae.py": repae, "sample.py": sample, "fid.py": fid}[f"{f}.py"], name)]
    assert not missing, f"README.md cites names that are not top-level in their file: {missing}"
    assert len(text.splitlines()) <= 300
    assert "session" not in text.lower()
    assert "huggingface-cli" not in text
    assert "hf download" in text
    assert "@article" in text or "@misc" in text
    assert "github.com/End2End-Diffusion/REPA-E" in text


#################################################################################
#     sample.py: samplers on a closed-form toy, per-sample seeds, checkpoints    #
#################################################################################
class _SampleGaussianModel(nn.Module):
    """Exact velocity E[eps - x0 | x_t] for data x0 ~ N(mu_y, s^2) per element, x_t = (1-t) x0 + t eps:
    v = -mu + (t - a s^2) / (a^2 s^2 + t^2) (x_t - a mu), a = 1 - t. The null label has mean `null_mu`.
    Records (t, labels) of every call."""
    def __init__(self, mus, s, null_mu=0.0):
        super().__init__()
        self.mus = torch.tensor(list(mus) + [null_mu], dtype=torch.float64)
        self.s, self.num_classes, self.calls = s, len(mus), []

    def forward(self, x, t, y, mode="train"):
        assert mode == "sample" and x.dtype == torch.float32
        self.calls.append((t[0].item(), y.clone()))
        t, x, mu = t.double().view(-1, 1, 1, 1), x.double(), self.mus[y].view(-1, 1, 1, 1)
        a, s2 = 1 - t, self.s ** 2
        return (-mu + (t - a * s2) / (a * a * s2 + t * t) * (x - a * mu)).float(), None


def _sample_null_times(model):
    return sorted({round(t, 9) for t, y in model.calls if (y == model.num_classes).any()})


def test_sample_ode_transports_noise_to_the_data_gaussian():
    # the exact flow of N(0,1) -> N(mu, s^2) under the linear path is x1 -> mu + s x1: Euler converges to it
    model = _SampleGaussianModel([1.5], 0.5)
    noise = torch.randn(2048, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(2048, dtype=torch.long)
    exact = 1.5 + 0.5 * noise.double()
    euler = {n: (repae.euler_sampler(model, noise, y, num_steps=n) - exact).abs().max().item() for n in (50, 200)}
    heun = {n: (repae.euler_sampler(model, noise, y, num_steps=n, heun=True) - exact).abs().max().item()
            for n in (50, 200)}
    assert euler[200] < 0.02 and 3 < euler[50] / euler[200] < 5, euler          # first order
    assert heun[200] < 1e-4 and 12 < heun[50] / heun[200] < 20, heun            # second order


def test_sample_sde_reaches_the_data_mean_and_variance():
    # The reference stops the SDE at t = 0.04 and takes one noiseless step to 0. From the exact marginal
    # N(a mu, V) at t = 0.04 (a = 0.96, V = a^2 s^2 + t^2) that step gives mean mu and std (1 - t k) sqrt(V),
    # k = (2t - a s^2) / V: 0.49495 for s = 0.5, the limit as the steps grow.
    model, y, t, a, s2 = _SampleGaussianModel([-1.0], 0.5), torch.zeros(8192, dtype=torch.long), 0.04, 0.96, 0.25
    limit = (1 - t * (2 * t - a * s2) / (a * a * s2 + t * t)) * (a * a * s2 + t * t) ** 0.5
    stats = {}
    for n in (3, 250):
        torch.manual_seed(0)
        x = sample.euler_maruyama_sampler(model, torch.randn(8192, 1, 2, 2), y, num_steps=n)
        stats[n] = (x.mean().item(), x.std().item())
    assert abs(stats[250][0] + 1.0) < 0.01 and abs(stats[250][1] - limit) < 0.006, stats   # SE ~0.003
    assert abs(stats[3][1] - limit) > 0.1, stats


def _sample_reference_sde(model, noise, y, num_steps, cfg_scale, low, high):
    """The reference's Euler-Maruyama loop, restated step by step (global RNG, randn_like before the call)."""
    ts = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = noise.double()
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        cfg = cfg_scale > 1 and low <= t_cur <= high
        xi, yi = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.num_classes)])) if cfg else (x, y)
        tt = torch.ones(xi.shape[0], dtype=torch.float64) * t_cur
        deps = torch.randn_like(x) * torch.sqrt(torch.abs(t_next - t_cur)) if i < num_steps - 1 else None
        v = model(xi.float(), tt.float(), yi, mode="sample")[0].double()
        t4 = tt.view(-1, 1, 1, 1)
        score = ((1 - t4) / -1 * v - xi) / (t4 ** 2 - (1 - t4) / -1 * t4)
        d = v - 0.5 * 2 * t_cur * score
        if cfg:
            dc, du = d.chunk(2)
            d = du + cfg_scale * (dc - du)
        x = x + d * (t_next - t_cur) + (torch.sqrt(2 * t_cur) * deps if deps is not None else 0)
    return x


def _sample_reference_heun(model, noise, y, num_steps, cfg_scale, low, high):
    """The reference's Euler/Heun loop: the corrector is guided iff the predictor's t_cur is in the interval."""
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = noise.double()

    def vel(x_, t_, cfg):
        xi, yi = (torch.cat([x_, x_]), torch.cat([y, torch.full_like(y, model.num_classes)])) if cfg else (x_, y)
        v = model(xi.float(), torch.full((xi.shape[0],), float(t_)), yi, mode="sample")[0].double()
        return v.chunk(2)[1] + cfg_scale * (v.chunk(2)[0] - v.chunk(2)[1]) if cfg else v

    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        cfg = cfg_scale > 1 and low <= t_cur <= high
        d = vel(x, t_cur, cfg)
        x_next = x + (t_next - t_cur) * d
        if i < num_steps - 1:
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * vel(x_next, t_next, cfg))
        x = x_next
    return x


def test_sample_samplers_match_the_reference_loops():
    model = _SampleGaussianModel([1.0, -2.0], 0.7)
    noise = torch.randn(6, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    torch.manual_seed(3)
    ours = sample.euler_maruyama_sampler(model, noise, y, num_steps=12, cfg_scale=2.5, guidance_low=0.2,
                                         guidance_high=0.7)
    torch.manual_seed(3)
    ref = _sample_reference_sde(model, noise, y, 12, 2.5, 0.2, 0.7)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # [0.45, 1]: at t_cur = 0.5 the predictor is guided and t_next = 0.4 is outside: the corrector must be too
    ours = repae.euler_sampler(model, noise, y, num_steps=10, cfg_scale=3.0, guidance_low=0.45, heun=True)
    ref = _sample_reference_heun(model, noise, y, 10, 3.0, 0.45, 1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_sample_cfg_scale_one_is_the_unguided_sampler():
    model, noise, y = _SampleGaussianModel([1.0, -1.0], 0.5), torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 1, 0])
    x = noise.double()
    for t_cur, t_next in zip(torch.linspace(1, 0, 9, dtype=torch.float64).tolist()[:-1],
                             torch.linspace(1, 0, 9, dtype=torch.float64).tolist()[1:]):
        x = x + (t_next - t_cur) * model(x.float(), torch.full((4,), t_cur), y, mode="sample")[0].double()
    model.calls.clear()
    assert torch.equal(repae.euler_sampler(model, noise, y, num_steps=8, cfg_scale=1.0), x)
    torch.manual_seed(0)
    sample.euler_maruyama_sampler(model, noise, y, num_steps=8, cfg_scale=1.0)
    assert _sample_null_times(model) == []                  # no unconditional pass at all


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_sample_guidance_applies_only_inside_the_interval(mode):
    model = _SampleGaussianModel([1.0, -1.0], 0.5, null_mu=3.0)
    noise, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 1, 0])

    def run(**cfg):
        torch.manual_seed(0)
        model.calls.clear()
        fn = sample.euler_sampler if mode == "ode" else sample.euler_maruyama_sampler
        return fn(model, noise, y, num_steps=10, **cfg)

    unguided = run()
    assert torch.equal(run(cfg_scale=3.0, guidance_low=0.93, guidance_high=0.97), unguided)   # no step inside
    assert _sample_null_times(model) == []
    guided = run(cfg_scale=3.0, guidance_low=0.0, guidance_high=0.5)
    times = sorted({round(t, 9) for t, _ in model.calls})
    assert _sample_null_times(model) == [t for t in times if t <= 0.5] and len(_sample_null_times(model)) < len(times)
    assert not torch.allclose(guided, unguided)
    grid = torch.linspace(1, 0, 11, dtype=torch.float64) if mode == "ode" else \
        torch.cat([torch.linspace(1, 0.04, 10, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    grid = grid.tolist()
    run(cfg_scale=3.0, guidance_low=grid[6], guidance_high=grid[3])  # both bounds are grid times: both inclusive
    assert _sample_null_times(model) == sorted(round(float(np.float32(t)), 9) for t in grid[3:7])


def test_sample_inputs_and_sde_noise_do_not_depend_on_the_batch():
    shape = (1, 2, 2)
    noise, y, gens = sample.draw_inputs(range(6), 7, shape, 5)
    parts = [sample.draw_inputs(range(a, b), 7, shape, 5) for a, b in ((0, 2), (2, 6))]
    assert torch.equal(noise, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    schedule = torch.tensor([4, 3, 2, 1, 0, 4])             # --balanced/--class-labels: same noise, given labels
    assert torch.equal(sample.draw_inputs(range(6), 7, shape, 5, schedule)[0], noise)
    assert torch.equal(sample.draw_inputs(range(2, 4), 7, shape, 5, schedule)[1], schedule[2:4])
    seed8 = sample.draw_inputs(range(6), 8, shape, 5)[0]     # another seed is another set, not this one shifted
    assert not any(torch.equal(a, b) for a in noise for b in seed8)
    model = _SampleGaussianModel([0.0, 1.0, 2.0, 3.0, 4.0], 0.5)
    whole = sample.euler_maruyama_sampler(model, noise, y, num_steps=6, generators=gens)
    split = torch.cat([sample.euler_maruyama_sampler(model, p[0], p[1], num_steps=6, generators=p[2]) for p in parts])
    assert torch.equal(whole, split)


def test_sample_balanced_labels(capsys):
    args = sample.parse_args(["--ckpt", "x", "--balanced", "--num-fid-samples", "20"])
    labels = sample.label_schedule(args, 5)
    assert labels.bincount().tolist() == [4] * 5 and not torch.equal(labels, labels.sort().values)
    assert "divisible" in error(capsys, sample.label_schedule, args, 6)


# ------------------------------------------------------------- checkpoints, folders, processes

def _sample_tiny(tmp_path, frozen=False):
    """A smoke-size training checkpoint with random (non-trivial) weights; with frozen=True no `vae`
    entry and the VAE in its own file, named by the run's vae_ckpt."""
    torch.manual_seed(0)
    args = repae.parse_args(["--smoke"])
    vae = repae.build_vae(args)
    sit = repae.build_sit(args, [64], vae)
    with torch.no_grad():
        for name, p in sit.named_parameters():
            if name != "pos_embed":                         # adaLN-Zero starts at v = 0: make it a real field
                p.add_(torch.randn_like(p) * 0.05)
        sit.bn.running_mean.normal_(0, 0.3)
        sit.bn.running_var.uniform_(0.5, 2.0)
    ckpt = dict(model=sit.state_dict(), ema=sit.state_dict(), args=args, steps=20)
    if frozen:
        args.freeze_vae, args.vae_ckpt = True, str(tmp_path / "vae.pt")
        torch.save(vae.state_dict(), args.vae_ckpt)
    else:
        ckpt["vae"] = vae.state_dict()
    path = tmp_path / ("frozen.pt" if frozen else "e2e.pt")
    torch.save(ckpt, path)
    return str(path), sit, vae


def _sample_npz(out):
    """The one .npz that sample.py wrote under --sample-dir `out` (next to its PNG folder)."""
    (npz,) = [f for f in os.listdir(out) if f.endswith(".npz")]
    return np.load(out / npz)["arr_0"]


def _sample_run(ckpt, out, *flags):
    sample.main(sample.parse_args(["--ckpt", ckpt, "--sample-dir", str(out), "--num-fid-samples", "6",
                                   "--pproc-batch-size", "4", "--num-steps", "4", "--cfg-scale", "2",
                                   "--guidance-high", "0.7", *flags]))
    return _sample_npz(out)


def test_sample_folder_npz_and_resume_regenerates_exactly_the_missing_pngs(tmp_path, capsys):
    ckpt, _, _ = _sample_tiny(tmp_path)
    out = tmp_path / "s"
    arr = _sample_run(ckpt, out)
    assert arr.shape == (6, 64, 64, 3) and arr.dtype == np.uint8 and len({a.tobytes() for a in arr}) == 6
    (folder,) = [out / f for f in os.listdir(out) if not f.endswith(".npz")]
    assert folder.name == "e2e-sde4-cfg2.0-0.0-0.7-seed0-n6"             # generate.py's: settings in the name
    assert sample.sample_folder(sample.parse_args(["--ckpt", "exps/run/checkpoints/0000020.pt", "--balanced"])) == \
        "samples/run-0000020-sde250-cfg1.0-0.0-1.0-seed0-n50000-balanced"   # a run's checkpoint: the run named
    assert sample.sample_folder(sample.parse_args(["--ckpt", "e2e.pt", "--mode", "ode", "--heun", "--num-steps", "5",
                                                   "--global-seed", "3", "--grid", "--class-labels", "1"])) == \
        "samples/e2e-ode5-heun-cfg1.0-0.0-1.0-seed3-grid"
    names = [f"{i:06d}.png" for i in range(6)]
    data = {n: (folder / n).read_bytes() for n in names}
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in names}
    for n in (names[1], names[4]):
        (folder / n).unlink()
    os.remove(f"{folder}.npz")
    for full in (folder / f"{names[1]}.tmp", out / f"{folder.name}.npz.tmp"):   # a full disk at a PNG, at the .npz
        os.symlink("/dev/full", full)
        msg = error(capsys, _sample_run, ckpt, out, code=1)
        assert "could not write" in msg and "No space left on device" in msg and "same command again" in msg
        assert not os.path.lexists(full) and not os.path.exists(f"{folder}.npz")
    again = _sample_run(ckpt, out)
    assert all((folder / n).read_bytes() == data[n] for n in names) and np.array_equal(again, arr)
    assert all((folder / n).stat().st_mtime_ns == mtimes[n] for n in names if n not in (names[1], names[4]))
    msg = error(capsys, _sample_run, ckpt, out, "--mixed-precision", "bf16")   # never mix samples of two settings
    assert "other settings" in msg and "mixed_precision" in msg
    (folder / names[2]).unlink()            # another batch size: not refused, the same noise; the redrawn image
    os.remove(f"{folder}.npz")              # may move by float round-off (CPU matrix kernels block by batch size)
    other, kept = _sample_run(ckpt, out, "--pproc-batch-size", "3").astype(int), [0, 1, 3, 4, 5]
    assert np.array_equal(other[kept], arr[kept]) and np.abs(other[2] - arr[2]).max() <= 1


def test_a_checkpoint_of_the_cosine_path_is_refused(tmp_path, capsys):
    path, _, _ = _sample_tiny(tmp_path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["args"].path_type = "cosine"                       # the released --path-type cosine
    torch.save(ckpt, path)
    msg = error(capsys, _sample_run, path, tmp_path / "out")
    assert f"'{path}' was trained on the cosine path; these samplers follow the linear one" in msg


def test_sample_images_are_the_ema_sit_sampled_with_the_runs_settings_and_decoded_by_its_bn_stats(tmp_path):
    """Each PNG, recomputed from the checkpoint by hand: the EMA SiT (not `model`) and --heun reach the sampler,
    z = z_n / scale + bias uses the EMA BatchNorm buffers, and [-1, 1] -> uint8 truncates
    (floor of 127.5 (x + 1)), as the official generate.py whose samples gave the paper's FIDs."""
    path, sit, vae = _sample_tiny(tmp_path)
    ckpt = torch.load(path, weights_only=False)
    online = copy.deepcopy(sit)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ckpt["model"] = online.state_dict()                     # the online SiT differs: samples must not come from it
    torch.save(ckpt, path)
    sit.eval()
    scale, bias = sit.bn.running_var.rsqrt(), sit.bn.running_mean
    noise, y, gens = sample.draw_inputs(range(6), 0, (4, 8, 8), 10)
    for flags, fn in [(["--mode", "sde"], lambda: sample.euler_maruyama_sampler(
                          sit, noise, y, 4, 2.0, 0.0, 0.7, generators=gens)),
                      (["--mode", "ode", "--heun"], lambda: repae.euler_sampler(
                          sit, noise, y, 4, 2.0, 0.0, 0.7, heun=True))]:
        arr = _sample_run(path, tmp_path / flags[1], *flags)
        with torch.no_grad():
            x = repae.decode_latent(vae, fn(), scale, bias)
        level = (127.5 * (x.double() + 1)).clamp(0, 255).permute(0, 2, 3, 1).numpy()
        assert ((level - arr > -1e-3) & (level - arr < 1 + 1e-3)).all(), flags     # floor: level - arr in [0, 1)
        assert (level - arr > 0.5).mean() > 0.2                                      # not rounding


def test_sample_one_and_three_processes_give_identical_npz(tmp_path):
    # batches are fixed index ranges drawn from per-sample seeds, so 3 processes (gloo) redraw the same
    # floats as 1; both single-threaded, as torchrun sets OMP_NUM_THREADS=1 for its workers. Three: a
    # world size that does not divide repae.py's default --batch-size, a training flag sampling never reads
    ckpt, _, _ = _sample_tiny(tmp_path)
    flags = ["--ckpt", ckpt, "--num-fid-samples", "6", "--pproc-batch-size", "2", "--num-steps", "4",
             "--cfg-scale", "2", "--guidance-high", "0.7"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample.main(sample.parse_args(flags + ["--sample-dir", str(tmp_path / "one")]))
    finally:
        torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    driver = tmp_path / "driver.py"                          # sample.py's main, counting the threads left at exit
    driver.write_text(DRIVER_START + "import sample\nsample.main(sample.parse_args(sys.argv[1:]))\n")
    three = lambda: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                                    str(driver), *flags, "--sample-dir", str(tmp_path / "three")], cwd=HERE,
                                   env=dict(env, OMP_NUM_THREADS="1", PYTHONPATH=HERE),
                                   capture_output=True, text=True, timeout=180)
    r = three()
    assert r.returncode == 0 and "with 3 process(es)" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("threads left: 0") == 3, r.stdout[-2000:]
    one, arr = _sample_npz(tmp_path / "one"), _sample_npz(tmp_path / "three")
    assert one.shape == (6, 64, 64, 3) and np.array_equal(one, arr)
    (npz,) = (tmp_path / "three").glob("*.npz")
    npz.unlink()
    folder, png = tmp_path / f"three/{npz.stem}", tmp_path / f"three/{npz.stem}/000002.png"
    for i in range(3):                                      # batches (0, 1) and (2, 3) redrawn: rank 1 draws 2 and
        (folder / f"{i:06d}.png").unlink()                  # 3, and says its own write error itself
    os.symlink("/dev/full", f"{png}.tmp")
    r = three()
    assert r.returncode != 0 and f"error: could not write '{png}' ([Errno 28]" in r.stderr, r.stderr[-3000:]
    os.symlink("/dev/full", f"{npz}.tmp")                   # rank 0's .npz on a full disk: its sentence stops all
    r = three()                                             # three, none with a traceback from a barrier
    assert r.returncode != 0 and r.stderr.count(": error: could not write") == 1, r.stderr[-3000:]
    assert "[rank1]" not in r.stderr and "[rank2]" not in r.stderr


def test_sample_frozen_vae_checkpoint_equals_the_end_to_end_layout(tmp_path, capsys):
    e2e, _, _ = _sample_tiny(tmp_path)
    frozen, _, _ = _sample_tiny(tmp_path, frozen=True)     # same seed: the same SiT, BN stats and VAE
    ref = _sample_run(e2e, tmp_path / "e2e")
    assert np.array_equal(_sample_run(frozen, tmp_path / "from_args"), ref)             # run's vae_ckpt
    os.rename(tmp_path / "vae.pt", tmp_path / "moved.pt")
    assert np.array_equal(_sample_run(frozen, tmp_path / "from_flag", "--vae-ckpt", str(tmp_path / "moved.pt")), ref)
    assert re.search("holds no VAE.*--vae-ckpt", error(capsys, _sample_run, frozen, tmp_path / "none"))
    torch.manual_seed(1)                                    # --vae-ckpt wins over the checkpoint's own `vae` too
    torch.save(repae.build_vae(smoke_args()).state_dict(), tmp_path / "other.pt")
    other = [_sample_run(c, tmp_path / f"other{i}", "--vae-ckpt", str(tmp_path / "other.pt"))
             for i, c in enumerate((e2e, frozen))]
    assert np.array_equal(*other) and not np.array_equal(other[0], ref)
    # a fixed statistics file replaces the EMA BatchNorm buffers (checkpoints that normalised with one)
    stats = dict(latents_scale=torch.full((1, 4, 1, 1), 3.0), latents_bias=torch.zeros(1, 4, 1, 1))
    torch.save(stats, tmp_path / "st.pt")
    assert not np.array_equal(_sample_run(e2e, tmp_path / "stats", "--latents-stats", str(tmp_path / "st.pt")), ref)


def test_sample_official_repae_checkpoint_layout(tmp_path, monkeypatch, capsys):
    # Released checkpoints: official train_repae.py args (no `smoke`), SiT `ema` + tuned `vae` in one file.
    # The registries are shrunk so the real-name path (SiT-XL/2, f8d4) runs at smoke size.
    monkeypatch.setitem(repae.SiT_models, "SiT-XL/2", functools.partial(repae.SiT, depth=8, hidden_size=32, num_heads=2,
                                                                         patch_size=2, projector_dim=64))
    monkeypatch.setitem(repae.vae_models, "f8d4", functools.partial(repae.AutoencoderKL, ch=32, ch_mult=(1, 1, 2, 2),
                                                                    z_channels=4, num_res_blocks=1))
    official = argparse.Namespace(model="SiT-XL/2", vae="f8d4", resolution=64, num_classes=10, encoder_depth=8,
                                  cfg_prob=0.1, bn_momentum=0.1, qk_norm=False, fused_attn=True,
                                  enc_type="dinov2-vit-b",
                                  path_type="linear", vae_ckpt="pretrained/sdvae-f8d4/sdvae-f8d4.pt", proj_coeff=0.5)
    torch.manual_seed(0)
    vae = repae.build_vae(official)
    sit = repae.build_sit(official, [768], vae)             # DINOv2-B width, read back from projectors.0.4.weight
    with torch.no_grad():
        for p in sit.final_layer.parameters():
            p.normal_(0, 0.05)
    torch.save(dict(model=sit.state_dict(), ema=sit.state_dict(), vae=vae.state_dict(), discriminator={}, opt={},
                    opt_vae={}, opt_disc={}, args=official, steps=400_000), tmp_path / "0400000.pt")
    arr = _sample_run(str(tmp_path / "0400000.pt"), tmp_path / "off", "--mode", "ode")
    assert arr.shape == (6, 64, 64, 3) and len({a.tobytes() for a in arr}) == 6
    msg = error(capsys, _sample_run, str(tmp_path / "0400000.pt"), tmp_path / "bad", "--num-classes", "7")
    assert "does not match" in msg and not (tmp_path / "bad").exists()       # a mismatch names itself


def test_sample_grid_and_refusals(tmp_path, capsys, monkeypatch):
    ckpt, _, _ = _sample_tiny(tmp_path)
    args = lambda labels: sample.parse_args(["--ckpt", ckpt, "--grid", "--class-labels", labels, "--num-steps", "4",
                                             "--mode", "ode", "--sample-dir", str(tmp_path / labels)])
    sample.main(args("1,3,5"))
    sample.main(args("1,4,5"))
    grid = "e2e-ode4-cfg1.0-0.0-1.0-seed0-grid.png"
    a, b = (np.asarray(Image.open(tmp_path / s / grid)) for s in ("1,3,5", "1,4,5"))
    assert a.shape == (134, 134, 3)                         # 2 x 2 tiles of 64 px, padding 2
    # tile k depends on its own label and seed only: changing label 1 changes tile 1, not tile 0
    assert np.array_equal(a[2:66, 2:66], b[2:66, 2:66]) and not np.array_equal(a[2:66, 68:132], b[2:66, 68:132])
    assert "lie in" in error(capsys, sample.main, args("1,10"))
    assert "invalid class_labels value: '1,2,'" in error(capsys, args, "1,2,")      # one line, before any model
    for argv, msg in [(["--ckpt", ckpt, "--global-seed", "-1"], "--global-seed: must be at least 0"),
                      (["--exp-path", "exps/run"], "name the checkpoint with --ckpt, or with --exp-path and --train-"),
                      (["--exp-path", "exps/run", "--train-steps", "20", "--ckpt", ckpt], "or with --exp-path and"),
                      (["--ckpt", ckpt, "--guidance-low", "0.8", "--guidance-high", "0.7"], "must not exceed"),
                      (["--ckpt", ckpt, "--grid", "--class-labels", "1", "--balanced"], "drop it with --class-labels"),
                      (["--ckpt", ckpt, "--class-labels", "1,2"], "--grid and --class-labels go together")]:
        assert msg in error(capsys, sample.parse_args, argv)
    with monkeypatch.context() as patch:                    # a grid is one process's work: torchrun is refused
        patch.setattr(repae, "init_distributed", lambda **kw: SimpleNamespace(**{**vars(CPU), "world": 2}))
        assert "run it with python sample.py, not torchrun" in error(capsys, sample.main, args("1,3"))
    no_ema = tmp_path / "no_ema.pt"
    torch.save(dict(model=torch.load(ckpt, weights_only=False)["model"]), no_ema)
    assert "no 'ema'" in error(capsys, _sample_run, str(no_ema), tmp_path / "x")
    run = repae.parse_args(["--smoke", "--cfg-prob", "0"])  # no label dropout, no null label: no guidance
    vae = repae.build_vae(run)
    torch.save(dict(ema=repae.build_sit(run, [64], vae).state_dict(), vae=vae.state_dict(), args=run),
               tmp_path / "c.pt")
    assert "trained without label dropout (--cfg-prob 0), so it has no null label; use --cfg-scale 1" in \
        error(capsys, _sample_run, str(tmp_path / "c.pt"), tmp_path / "y")


#################################################################################
#        fid.py: metric definitions, the Inception port, input checks, CLI       #
#################################################################################
@functools.lru_cache(maxsize=1)
def _fid_random_net():
    # Default conv init shrinks activations to ~1e-8 over Inception's depth, which would make
    # "identical features" trivially true; He init keeps them O(1).
    torch.manual_seed(0)
    net = fid.InceptionFID().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    with torch.no_grad():
        net.fc.weight.mul_(30)      # logits of a few units, so that IS moves measurably off 1 and a wrong one shows
    return net


@pytest.fixture(scope="module")
def _fid_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "random_inception.pth"  # ~95 MB, written once
    torch.save(_fid_random_net().state_dict(), path)
    return path


def _fid_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _fid_cli(*args):
    cmd = [sys.executable, os.path.join(HERE, "fid.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=300)


def _fid_write_stats(path, dim, seed):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((16, dim))
    np.savez(path, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), mu_s=feats.mean(0)[:3],
             sigma_s=np.cov(feats[:, :3], rowvar=False), pool=feats)
    return path

# ---------------------------------------------------------------- Frechet distance

def test_fid_frechet_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((50, 8)) * 2 + 1
    s = (a.mean(0), np.cov(a, rowvar=False))
    t = (b.mean(0), np.cov(b, rowvar=False))
    assert abs(fid.frechet_distance(*s, *s)) < 1e-9
    d1, d2 = fid.frechet_distance(*s, *t), fid.frechet_distance(*t, *s)
    assert d1 > 1 and d1 == pytest.approx(d2, rel=1e-9)


def test_fid_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert fid.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_frechet_near_singular_is_finite():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 32)), rng.standard_normal((4, 32))  # rank-3 covariances in 32-d
    d = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(d) and d > 0
    assert np.isfinite(fid.frechet_distance(np.zeros(4), np.zeros((4, 4)), np.ones(4), np.zeros((4, 4))))


def test_fid_frechet_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="differ in dimension"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))

# ---------------------------------------------------------------- Inception score

def test_fid_inception_score_one_for_identical_predictions():
    p = np.random.default_rng(3).dirichlet(np.ones(10))
    assert fid.inception_score(np.tile(p, (40, 1))) == pytest.approx(1.0, abs=1e-12)


def test_fid_inception_score_k_for_k_confident_equally_likely_classes():
    k = 7
    probs = np.tile(np.eye(k), (10, 1))  # every chunk of 7 rows holds each class once
    assert fid.inception_score(probs, split_size=k) == pytest.approx(k, rel=1e-12)

# ---------------------------------------------------------------- precision / recall

def test_fid_precision_recall_identical_sets_give_one():
    x = np.random.default_rng(4).standard_normal((40, 16))
    assert fid.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_fid_precision_recall_fall_for_disjoint_sets():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((40, 16)), rng.standard_normal((30, 16)) + 100
    assert fid.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_fid_precision_is_of_the_samples_and_recall_of_the_reference():
    # Samples collapsed into the middle of the reference: every sample looks real (precision 1), but they cover
    # almost none of the reference (recall near 0). The metrics named on the command line must say so.
    rng = np.random.default_rng(6)
    ref, samples = dict(pool=rng.standard_normal((60, 2))), dict(pool=0.01 * rng.standard_normal((60, 2)))
    result = fid.compute_metrics(["pr"], samples, ref)
    assert result["Precision"] == 1.0 and result["Recall"] < 0.1, result


def test_fid_frechet_regularises_both_covariances_when_sqrtm_fails(monkeypatch):
    # ADM (and pytorch-fid): if sqrtm(sigma1 sigma2) is not finite, retry on (sigma1 + eps I)(sigma2 + eps I)
    rng = np.random.default_rng(8)
    s1, s2 = (np.cov(rng.standard_normal((9, 4)), rowvar=False) for _ in range(2))
    seen, sqrtm = [], fid.scipy.linalg.sqrtm
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda m: seen.append(m) or (np.full_like(m, np.inf) if len(seen)
                                                                                   == 1 else sqrtm(m)))
    d = fid.frechet_distance(np.zeros(4), s1, np.zeros(4), s2)
    off = 1e-6 * np.eye(4)
    np.testing.assert_allclose(seen[1], (s1 + off) @ (s2 + off), rtol=1e-12)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm((s1 + off) @ (s2 + off)).real)
    assert len(seen) == 2 and d == pytest.approx(expected, rel=1e-9)

# ---------------------------------------------------------------- Inception network

def test_fid_state_dict_keys_match_pytorch_fid_layout():
    ours = fid.InceptionFID().state_dict()
    ref = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)


def test_fid_features_shapes_determinism_and_sfid_layer():
    net, x = _fid_random_net(), torch.from_numpy(_fid_images(2, size=40))
    seen = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.inference_mode():
        a, b = net(x), net(x.clone())
    hook.remove()
    assert [t.shape for t in a] == [(2, 2048), (2, 2023), (2, 1008)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.allclose(a[0][0], a[0][1], rtol=0, atol=1e-3)  # different images, different features
    # sFID features: ADM's mixed_6/conv = Mixed_6d's 1x1 branch, first 7 channels, flattened as NHWC.
    assert torch.equal(a[1], seen[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    with pytest.raises(ValueError, match="uint8"):
        net(x.float())


def test_fid_pool_branches_logits_and_covariance_are_the_graphs():
    """Spec Sec. 9: the FID blocks average-pool without counting the padding, the last E block max-pools, IS
    reads the logits before the bias, and sigma is the unbiased (N - 1) covariance, as numpy's default in ADM."""
    net, x = copy.deepcopy(_fid_random_net()), torch.from_numpy(_fid_images(2, size=40))   # the cached one stays
    with torch.no_grad():
        net.fc.bias.fill_(1.0)
    seen = {}
    for name in ("Mixed_6b", "Mixed_7b", "Mixed_7c"):
        block = net.get_submodule(name)
        block.register_forward_pre_hook(lambda m, inp, name=name: seen.update({name: inp[0]}))
        block.branch_pool.register_forward_pre_hook(lambda m, inp, name=name: seen.update({name + "_pool": inp[0]}))
    with torch.no_grad():
        pool, spatial, logits = net(x)
    for name in ("Mixed_6b", "Mixed_7b"):
        want = F.avg_pool2d(seen[name], 3, stride=1, padding=1, count_include_pad=False)
        torch.testing.assert_close(seen[name + "_pool"], want)
    torch.testing.assert_close(seen["Mixed_7c_pool"], F.max_pool2d(seen["Mixed_7c"], 3, stride=1, padding=1))
    torch.testing.assert_close(logits, pool @ net.fc.weight.T)
    feats = np.random.default_rng(0).standard_normal((5, 3))
    sigma = fid.derive_statistics(feats, feats, feats, ["sigma"])["sigma"]
    centred = feats - feats.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 4)


def test_fid_build_inception_loads_checkpoint_strictly(tmp_path, _fid_ckpt):
    net = fid.build_inception(str(_fid_ckpt))
    expected = _fid_random_net().state_dict()
    assert not net.training and all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    torch.save({"fc.weight": torch.zeros(1008, 2048), "extra": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(fid.InputError, match="does not hold the pytorch-fid Inception weights"):
        fid.build_inception(str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="does not exist"):
        fid.build_inception(str(tmp_path / "missing.pth"))
    torch.save({**expected, "fc.extra": torch.zeros(1)}, tmp_path / "more.pth")    # every key right, one more
    with pytest.raises(fid.InputError, match=r"\(1 keys missing, unexpected or of another shape, e.g. fc.extra\)"):
        fid.build_inception(str(tmp_path / "more.pth"))


def test_fid_precomputed_statistics_win_over_the_images():
    """ADM's reference batches hold images and mu, sigma, mu_s, sigma_s: those are used as stored, and only what
    is missing (pool for precision/recall, probs for IS) is derived from one Inception pass over the images."""
    rng, calls = np.random.default_rng(0), []
    pool, spatial, logits = rng.random((5, 3)), rng.random((5, 2)), rng.random((5, 4))
    features = lambda images, path: calls.append((images, path)) or (pool, spatial, logits)
    stats = dict(mu=np.zeros(3), sigma=np.eye(3))
    side = fid.resolve_side("ref.npz", stats, "images", ["mu", "sigma", "pool", "probs"], features)
    assert side["mu"] is stats["mu"] and side["sigma"] is stats["sigma"] and side["pool"] is pool
    assert np.allclose(side["probs"], np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    assert calls == [("images", "ref.npz")]
    assert fid.resolve_side("ref.npz", stats, "images", ["mu", "sigma"], features) is stats and len(calls) == 1


# ---------------------------------------------------------------- inputs

def test_fid_folder_and_npz_read_the_same_images(tmp_path):
    imgs = _fid_images(5, size=12)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    np.savez(tmp_path / "imgs.npz", arr_0=imgs)                # memory-mapped
    np.savez_compressed(tmp_path / "packed.npz", arr_0=imgs)   # streamed
    for path in (str(tmp_path), str(tmp_path / "imgs.npz"), str(tmp_path / "packed.npz")):
        stats, (count, read) = fid.load_side(path)
        assert stats == {} and count == 5
        for workers in (0, 2):
            assert np.array_equal(np.concatenate(list(read(2, workers))), imgs)


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 8, 8, 3), np.float32), "must be uint8"),
    (np.zeros((4, 8, 8), np.uint8), "shape"),
    (np.zeros((4, 8, 8, 4), np.uint8), "shape"),
    (np.zeros((0, 8, 8, 3), np.uint8), "no images"),
    (np.asfortranarray(np.zeros((4, 8, 8, 3), np.uint8)), r"got uint8 \(4, 8, 8, 3\) in Fortran order; save it as"),
])
def test_fid_bad_npz_images(tmp_path, array, message):
    np.savez(tmp_path / "x.npz", arr_0=array)
    with pytest.raises(ValueError, match=message):
        fid.load_side(str(tmp_path / "x.npz"))


def test_fid_npz_damaged_anywhere_is_one_sentence(tmp_path):
    """6 bytes overwritten at every place of a np.savez_compressed file: damage to the zip directory or a member's
    header, to the .npy header, to the deflate code of the images (zlib's "invalid distance", found only while
    reading them) or to their bytes (a CRC mismatch) is an InputError, never another exception; some is harmless.
    np.savez stores images raw, where damage cannot be seen (as in ADM's evaluator), but not its headers."""
    images = np.broadcast_to(np.arange(64, dtype=np.uint8)[:, None], (40, 64, 64, 3)).copy()
    images[::3] //= 2                                       # smooth images: a long deflate code, few raw bytes
    path = str(tmp_path / "bad.npz")

    def damaged(raw, places):
        seen = collections.Counter()
        for at in places:
            (tmp_path / "bad.npz").write_bytes(raw[:at] + b"\xff" * 6 + raw[at + 6:])
            try:
                list(fid.load_side(path)[1][1](8))
                seen["harmless"] += 1                       # e.g. the member's time stamp
            except fid.InputError as e:
                seen[str(e).replace(path, "bad.npz")] += 1
        return seen
    np.savez_compressed(tmp_path / "ok.npz", arr_0=images)
    raw = (tmp_path / "ok.npz").read_bytes()
    seen = damaged(raw, range(len(raw) - 6))
    for message in ("bad.npz is damaged past its header (Error -3 while decompressing data",
                    "bad.npz is damaged past its header (Bad CRC-32", "bad.npz is a damaged .npz file (BadZipFile",
                    "bad.npz is not a valid .npz file: arr_0.npy is not a .npy array"):
        assert any(m.startswith(message) for m in seen), (message, seen)
    assert seen["harmless"] < len(raw) / 50
    np.savez(tmp_path / "ok.npz", arr_0=images[:1])
    raw = (tmp_path / "ok.npz").read_bytes()
    seen = damaged(raw, [*range(200), *range(len(raw) - 130, len(raw) - 6)])   # headers, then the zip directory
    assert any(m.startswith("bad.npz is not a valid .npz file: arr_0.npy is not a .npy array") for m in seen), seen
    assert any(m.startswith("bad.npz is a damaged .npz file (BadZipFile") for m in seen), seen


def test_fid_bad_folders(tmp_path):
    empty, one, mixed = (tmp_path / n for n in ("empty", "one", "mixed"))
    for d in (empty, one, mixed):
        d.mkdir()
    with pytest.raises(ValueError, match="no png/jpg/jpeg/webp"):
        fid.load_side(str(empty))
    Image.fromarray(_fid_images(1)[0]).save(one / "a.PNG")  # extensions in any case, as cameras and Windows write
    assert fid.load_side(str(one))[1][0] == 1  # enough for IS; the other metrics are decided by choose_metrics
    Image.fromarray(_fid_images(1, size=8)[0]).save(mixed / "a.png")
    Image.fromarray(_fid_images(1, size=16)[0]).save(mixed / "b.jpg")
    with pytest.raises(ValueError, match="differ in resolution"):
        fid.load_side(str(mixed))


def test_fid_bad_paths_and_statistics_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        fid.load_side(str(tmp_path / "nope.npz"))
    for name, arrays, message in [("junk", dict(foo=np.zeros(3)), "neither images"),
                                  ("half", dict(mu=np.zeros(3)), "mu without sigma"),
                                  ("wide", dict(mu=np.zeros(3), sigma=np.zeros((3, 4))), "a float matrix \\(d, d\\)"),
                                  ("intpool", dict(pool=np.zeros((5, 3), np.int64)), "pool must be float features"),
                                  ("flatpool", dict(pool=np.zeros(5)), "pool must be float features of shape")]:
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            fid.load_side(str(tmp_path / f"{name}.npz"))
    with zipfile.ZipFile(tmp_path / "padded.npz", "w") as zf:  # a member longer than its header says
        with zf.open("arr_0.npy", "w") as f:
            np.save(f, _fid_images(2, size=8))
            f.write(bytes(7))
    with pytest.raises(ValueError, match="arr_0 is truncated or padded"):
        fid.load_side(str(tmp_path / "padded.npz"))
    (tmp_path / "one.png").write_bytes(b"")
    with pytest.raises(ValueError, match="one.png is neither a .npz file nor a folder of images"):
        fid.load_side(str(tmp_path / "one.png"))
    np.savez(tmp_path / "fidonly.npz", mu=np.zeros(3), sigma=np.eye(3))
    side = ("fidonly.npz", *fid.load_side(str(tmp_path / "fidonly.npz")))
    np.savez(tmp_path / "ten.npz", arr_0=_fid_images(10, size=8))
    images = ("ten.npz", *fid.load_side(str(tmp_path / "ten.npz")))
    assert fid.choose_metrics(["is"], [images, side]) == (["is"], None)   # IS looks at the samples only
    for save, of, message in [(str(tmp_path / "s.txt"), images, "--save-stats .*s.txt must be a .npz path"),
                              (str(tmp_path / "s.npz"), side, "statistics computed from images, and fidonly.npz has")]:
        with pytest.raises(ValueError, match=message):
            fid._save_keys(save, of)
    np.savez(tmp_path / "pool3.npz", pool=np.zeros((3, 4)))    # k = 3 neighbours need more than 3 features
    with pytest.raises(ValueError, match="pool3.npz has 3 pool features"):
        fid.choose_metrics(["pr"], [images, ("pool3.npz", *fid.load_side(str(tmp_path / "pool3.npz")))])
    with pytest.raises(ValueError, match="fidonly.npz has no images and no mu_s/sigma_s"):
        fid.choose_metrics(["sfid"], [side, side])  # sFID asked of a file that only has FID stats
    assert fid.choose_metrics(None, [side, side])[0] == ["fid"]


def test_fid_main_reports_bad_input_in_one_line(tmp_path, capsys, restore_determinism):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with pytest.raises(SystemExit) as e:
        fid.main(fid.parse_args([str(tmp_path / "nope"), str(tmp_path / "nope2"), "--device", "cpu"]))
    assert e.value.code == 2
    assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)   # float32, as ADM's
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        fid.main(fid.parse_args([str(tmp_path), str(tmp_path), "--metrics", "fid,kid", "--device", "cpu"]))
    assert e.value.code == 2 and "kid" in capsys.readouterr().err

# ---------------------------------------------------------------- CLI end to end

def test_fid_cli_end_to_end(tmp_path, capsys, monkeypatch, _fid_ckpt):
    stats = tmp_path / "stats.npz"
    (tmp_path / "s").mkdir()
    for i, im in enumerate(_fid_images(4, seed=1)):
        Image.fromarray(im).save(tmp_path / "s" / f"{i:06d}.png")
    np.savez(tmp_path / "r.npz", arr_0=_fid_images(4, seed=2))
    # The network run, as a real subprocess, with DataLoader workers on a PNG folder and an npz. No --metrics:
    # 4 samples per side allow IS and precision/recall, not FID/sFID, which says so before the pass.
    # FID/sFID on 2048-d features cost ~1 min of sqrtm on 2 cores: checked below on small statistics.
    out = _fid_cli(str(tmp_path / "s"), str(tmp_path / "r.npz"), "--device", "cpu", "--workers", "2",
                   "--inception-ckpt", str(_fid_ckpt), "--batch-size", "3", "--save-stats", str(stats))
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ") for line in out.stdout.strip().splitlines())
    assert list(lines) == ["IS", "Precision", "Recall"] and all(np.isfinite(float(v)) for v in lines.values())
    err = out.stderr.splitlines()
    assert err[0].startswith("fid.py: skipping FID, sFID: FID needs more than 2048 samples per side")
    assert "sFID needs more than 2023 samples per side" in err[0] and err[0].endswith("Computing IS, precision/recall.")
    assert "images/s" in err[1] and "4/4 images" in out.stderr and "Traceback" not in out.stderr
    assert err[-1] == ("fid.py: --save-stats left out mu, sigma, mu_s, sigma_s: 4 samples give rank-deficient "
                       "covariances.")
    with np.load(stats) as f:  # rank-deficient covariances are not saved as if they were statistics
        assert f.files == ["pool"] and f["pool"].shape == (4, 2048)
        saved_pool = f["pool"]
    # the printed metrics, recomputed from the network's outputs on the same images: IS from the softmax of the
    # logits, precision over the samples' features against the reference's k-NN balls, recall the other way
    with torch.no_grad():
        (pool_s, _, logits), (pool_r, _, _) = (_fid_random_net()(torch.from_numpy(_fid_images(4, seed=s)))
                                               for s in (1, 2))
    np.testing.assert_allclose(saved_pool, pool_s.numpy(), rtol=1e-4, atol=1e-5)
    is_ = fid.inception_score(torch.softmax(logits.double(), 1).numpy())
    precision, recall = fid.precision_recall(pool_r.numpy(), pool_s.numpy())
    assert float(lines["IS"]) == pytest.approx(is_, abs=2e-4) and abs(is_ - 1) > 2e-3
    assert (float(lines["Precision"]), float(lines["Recall"])) == pytest.approx((precision, recall), abs=1e-4)
    # Statistics files on both sides need no network; in-process to save the ~8 s of importing
    # torch and torchvision again.
    monkeypatch.setattr(fid, "build_inception", lambda ckpt: pytest.fail("the network was built"))
    a, b = _fid_write_stats(tmp_path / "a.npz", 5, seed=3), _fid_write_stats(tmp_path / "b.npz", 5, seed=4)
    fid.main(fid.parse_args([str(a), str(b), "--device", "cpu", "--metrics", "fid,sfid,pr"]))
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert list(lines) == ["FID", "sFID", "Precision", "Recall"] and all(np.isfinite(float(v)) for v in lines.values())
    fid.main(fid.parse_args([str(a), str(b), "--device", "cpu", "--metrics", "fid,sfid,pr", "--json"]))
    result = json.loads(capsys.readouterr().out)
    with np.load(a) as sa, np.load(b) as sb:
        assert result["FID"] == pytest.approx(fid.frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"]))
        sfid = fid.frechet_distance(sa["mu_s"], sa["sigma_s"], sb["mu_s"], sb["sigma_s"])
        assert result["sFID"] == pytest.approx(sfid)
        assert result["sFID"] != pytest.approx(result["FID"])
    assert float(lines["FID"]) == pytest.approx(result["FID"], abs=1e-4)


def test_fid_cli_missing_weights_fails_fast_naming_the_flag(tmp_path, monkeypatch, capsys, _fid_ckpt):
    np.savez(tmp_path / "s.npz", arr_0=_fid_images(4))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty hub cache
    # Port 9 on localhost refuses at once, so the test is offline and fast whatever the network.
    monkeypatch.setattr(fid, "WEIGHTS_URL", "http://127.0.0.1:9/pt_inception.pth")
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        fid.main(fid.parse_args([str(tmp_path / "s.npz")] * 2 + ["--metrics", "is", "--device", "cpu"]))
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--inception-ckpt" in err and "Traceback" not in err
    os.symlink(_fid_ckpt, tmp_path / "torch_home/hub/checkpoints/pt_inception.pth")   # once in the cache: no download
    expected = torch.load(_fid_ckpt, weights_only=True)
    assert all(torch.equal(v, expected[k]) for k, v in fid.build_inception().state_dict().items())

# ---------------------------------------------------------------- the ADM evaluator's behaviour

def _fid_tf1_resize_loops(img, out_h, out_w):
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) by explicit index arithmetic, float32."""
    def taps(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        for i in range(n_out):
            src = np.float32(i) * scale  # no half-pixel offset
            lo = int(np.floor(src))
            yield lo, min(lo + 1, n_in - 1), np.float32(src - np.float32(lo))
    out = np.zeros((out_h, out_w, img.shape[2]), np.float32)
    cols = list(taps(img.shape[1], out_w))
    for y, (y0, y1, wy) in enumerate(taps(img.shape[0], out_h)):
        for x, (x0, x1, wx) in enumerate(cols):
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * wx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * wx
            out[y, x] = top + (bottom - top) * wy
    return out


def test_fid_preprocessing_is_tf1_resize_bilinear_then_x_minus_128_over_128():
    img = np.random.default_rng(7).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    for size in (3, 11):  # down and up, from a non-square image
        got = fid.tf1_resize_bilinear(x, size)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got, _fid_tf1_resize_loops(img.astype(np.float32), size, size), rtol=0, atol=1e-4)
    expected = (_fid_tf1_resize_loops(img.astype(np.float32), 299, 299) - 128) / 128
    got = fid.preprocess(torch.from_numpy(img)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # pytorch-fid's preprocessing (half-pixel centres, 2x/255 - 1) is measurably another one.
    pytorch_fid = torch.nn.functional.interpolate(x / 255, size=(299, 299), mode="bilinear") * 2 - 1
    assert np.abs(pytorch_fid[0].permute(1, 2, 0).numpy() - expected).max() > 0.1
    # and the network's first convolution sees exactly preprocess(images)
    seen, net = [], _fid_random_net()
    hook = net.Conv2d_1a_3x3.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.inference_mode():
        net(torch.from_numpy(img)[None])
    hook.remove()
    assert torch.equal(seen[0], fid.preprocess(torch.from_numpy(img)[None]))


def test_fid_inception_score_uses_consecutive_chunks_of_5000():
    def adm_inception_score(probs):  # chunks of 5000 in sample order, the last one shorter
        scores = []
        for start in range(0, len(probs), 5000):
            part = probs[start:start + 5000]
            kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
            scores.append(np.exp(kl.sum(1).mean()))
        return np.mean(scores)

    def ten_equal_splits(probs):
        return np.mean([np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean()) for p in np.array_split(probs, 10)])
    for n in (12000, 50000):
        rng = np.random.default_rng(n)
        # the preferred class drifts with the sample index, so where the chunks are cut matters
        logits = 2 * rng.standard_normal((n, 10)) + np.linspace(0, 3, n)[:, None] * np.arange(10)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        got = fid.inception_score(probs)
        assert got == pytest.approx(adm_inception_score(probs), rel=1e-12)
        if n == 50000:  # the one count where ADM's chunks are 10 equal splits
            assert got == pytest.approx(ten_equal_splits(probs), rel=1e-12)
        else:
            assert abs(got / ten_equal_splits(probs) - 1) > 1e-3  # 0.67% here


def _fid_dists16(a, b):
    """ADM's DistanceBlock in numpy float16: features cast to float16, every operation rounded to float16."""
    a16, b16 = np.asarray(a).astype(np.float16), np.asarray(b).astype(np.float16)
    uv = (a16.astype(np.float32) @ b16.astype(np.float32).T).astype(np.float16)  # GPU matmul: float32 accumulator
    with np.errstate(over="ignore"):
        return np.maximum(np.sum(a16 * a16, 1)[:, None] - 2 * uv + np.sum(b16 * b16, 1)[None], np.float16(0))


def _fid_dists32(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], np.float32(0))


def _fid_pr_brute(real, fake, dists, k=3):
    """(precision, recall): radius = (k+1)-th smallest distance including self, inside means <=."""
    r_real, r_fake = np.sort(dists(real, real), 1)[:, k], np.sort(dists(fake, fake), 1)[:, k]
    d = dists(real, fake)
    return float((d <= r_real[:, None]).any(0).mean()), float((d <= r_fake[None]).any(1).mean())


def test_fid_precision_decides_a_float16_boundary_case_as_adm_does():
    # The real point at the origin has radius 64: its 4th smallest distance, self included, is 8^2.
    # The fake point (-8, 1/8) lies 64 + 1/64 from it: outside in float32. In float16 its norm
    # 64.015625 rounds to 64 (the spacing there is 1/16), and ADM's `<=` counts it inside.
    real = np.array([[0, 0], [8, 0], [8, 0], [8, 0]], np.float32)
    fake = np.array([[-8, 0.125], [100, 100], [100, 100], [100, 100]], np.float32)
    float32 = _fid_pr_brute(real, fake, _fid_dists32)
    float16 = _fid_pr_brute(real, fake, _fid_dists16)
    assert float32[0] == 0 and float16[0] == 0.25
    assert fid.precision_recall(real, fake, k=3) == float16


def test_fid_precision_recall_chunking_matches_brute_force():
    rng = np.random.default_rng(6)
    # Multiples of 1/4 near 4: every float32 sum is exact, so any summation order gives the same float16
    # roundings. The norms (~1000-2000, float16 spacing 1-2) dwarf the distances (~20), as pool features' do.
    real, fake = 4 + rng.integers(0, 8, (37, 64)) / 4, 4.25 + rng.integers(0, 8, (29, 64)) / 4
    float16 = _fid_pr_brute(real, fake, _fid_dists16)
    assert 0 < float16[0] < 1 and 0 < float16[1] < 1 and float16 != _fid_pr_brute(real, fake, _fid_dists32)
    for chunk in (3, 16, 10000):  # blocks smaller than k + 1 columns, uneven blocks, one block
        assert fid.precision_recall(real, fake, k=3, chunk=chunk) == float16


def test_fid_distance_block_overflow_behaves_as_adm():
    # A float16 block with a non-finite entry (here a norm of 90000 > 65504) is recomputed in float32 ...
    big, small = np.array([[300, 0], [0, 1]], np.float32), np.array([[1, 2], [3, 4]], np.float32)
    assert not np.isfinite(_fid_dists16(big, small)).all()
    assert np.array_equal(fid._distance_block(torch.from_numpy(big), torch.from_numpy(small)).numpy(),
                          _fid_dists32(big, small))
    # ... but when only -2 u.v overflows, the block is -inf there, clamped to 0 and kept: ADM then puts
    # points 50 apart at distance 0, and so must we.
    u, v = np.array([[181, 0]], np.float32), np.array([[181, 50]], np.float32)
    assert _fid_dists16(u, v).item() == 0 and _fid_dists32(u, v).item() == 2500
    assert fid._distance_block(torch.from_numpy(u), torch.from_numpy(v)).item() == 0


def test_fid_sample_count_thresholds_follow_the_covariance_rank():
    # N samples in d dimensions give a covariance of rank min(N - 1, d): full rank needs N > d.
    rng = np.random.default_rng(8)
    assert [np.linalg.matrix_rank(np.cov(rng.standard_normal((n, 6)), rowvar=False)) for n in (6, 7)] == [5, 6]

    def side(n, stats=None):
        return f"{n}.npz", stats or {}, (n, None)

    def pick(n, metrics=None, ref=None):
        return fid.choose_metrics(metrics, [side(n), ref or side(n)])
    assert pick(2048)[0] == ["sfid", "is", "pr"] and pick(2049) == (["fid", "sfid", "is", "pr"], None)
    assert pick(2023)[0] == ["is", "pr"] and pick(2024)[0] == ["sfid", "is", "pr"]
    assert pick(3)[0] == ["is"] and pick(4)[0] == ["is", "pr"] and pick(1)[0] == ["is"]
    assert pick(2048)[1] == ("fid.py: skipping FID: FID needs more than 2048 samples per side (N samples give a "
                             "covariance of rank N-1 at most), 2048.npz has 2048 images. Computing sFID, IS, "
                             "precision/recall.")
    with pytest.raises(fid.InputError, match=r"FID needs more than 2048 .*, 2048.npz has 2048 images; these "
                                             r"inputs allow --metrics sfid,is,pr\.$"):
        pick(2048, ["fid", "is"])
    # precomputed mu/sigma (an ADM reference batch with 10 images) count as enough for their side
    adm_ref = ("ref.npz", {k: np.zeros(1) for k in ("mu", "sigma", "mu_s", "sigma_s")}, (10, None))
    assert pick(2049, ref=adm_ref)[0] == ["fid", "sfid", "is", "pr"] and pick(2048, ref=adm_ref)[0][0] == "sfid"
    with pytest.raises(fid.InputError, match="IS needs at least 1 sample image, stats.npz has no images; "):
        fid.choose_metrics(["is"], [("stats.npz", adm_ref[1], None), adm_ref])


def test_fid_bad_counts_and_devices_are_one_line_from_the_parser(capsys):
    for flags, message in ((["--batch-size", "-5"], "argument --batch-size: must be at least 1, got -5"),
                           (["--workers", "-1"], "argument --workers: must be at least 0, got -1"),
                           (["--batch-size", "x"], "argument --batch-size: invalid count value: 'x'"),
                           (["--device", "foo"], "argument --device: 'foo' is not a torch device"),
                           (["--device", "cuda"], "argument --device: CUDA is not available on this machine; use "
                                                  "--device cpu")):
        with pytest.raises(SystemExit) as e:
            fid.parse_args(["s.npz", "r.npz", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err == f"fid.py: error: {message} (see fid.py --help)\n"

# ---------------------------------------------------------------- bad input on the command line

_FID_BAD_INPUT = {  # case: what its one line must say
    "unknown_flag": ("unrecognized arguments: --foo (see fid.py --help)",),
    "batch_size_zero": ("argument --batch-size: must be at least 1, got 0",),
    "unknown_metric": ("argument --metrics: unknown metric(s) kid; choose from fid, sfid, is, pr",),
    "corrupt_ckpt": ("junk.pth is not a readable PyTorch checkpoint (UnpicklingError)", "--inception-ckpt."),
    "text_npz": ("samples.npz is not a valid .npz file",),
    "npz_wrong_dtype": ("floats.npz: arr_0 must be uint8 images of shape (N, H, W, 3), got float32",),
    "pickled_npz": ("pickled.npz: arr_0 holds Python objects",),
    "stat_dims": ("a.npz gives 5-d mu, ", "b.npz 6-d", "same Inception features"),
    "unreadable_png": ("b.png is not a readable image",),
    "truncated_png": ("c.png cannot be decoded (image file is truncated",),
    "damaged_npz_data": ("noisy.npz is damaged past its header (Bad CRC-32 for file 'arr_0.npy'); regenerate it.",),
    "damaged_npz_header": ("smooth.npz is not a valid .npz file: arr_0.npy is not a .npy array (Error -3 while",),
    "too_few_for_fid": ("FID needs more than 2048 samples per side", "good.npz has 10 images",
                        "these inputs allow --metrics is,pr."),
    "save_stats_bad_folder": ("--save-stats ", "must be a .npz path in an existing folder",),
}


@pytest.fixture(scope="module")
def _fid_bad_inputs(tmp_path_factory, _fid_ckpt):
    """Every bad-input case of the CLI: its argv and the --save-stats file it must not leave behind."""
    d = tmp_path_factory.mktemp("fid_bad")
    good = d / "good.npz"
    np.savez(good, arr_0=_fid_images(10, size=16))
    (d / "samples.npz").write_text("not a zip archive")
    (d / "junk.pth").write_text("not a checkpoint")
    np.savez(d / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(d / "pickled.npz", arr_0=np.array([{"a": 1}], dtype=object))
    a, b = _fid_write_stats(d / "a.npz", 5, seed=0), _fid_write_stats(d / "b.npz", 6, seed=1)
    # np.savez_compressed files damaged where only decompression can tell: in the images (random, so stored
    # as raw deflate blocks: the CRC catches it), and in the deflate code of the .npy header (smooth images)
    np.savez_compressed(d / "noisy.npz", arr_0=_fid_images(10, size=16))
    np.savez_compressed(d / "smooth.npz", arr_0=np.broadcast_to(np.arange(16, dtype=np.uint8)[:, None], (10, 16, 16, 3)))
    for name, at in (("noisy.npz", 0.5), ("smooth.npz", 80)):
        data = bytearray((d / name).read_bytes())
        start = int(at * len(data)) if at < 1 else at
        data[start:start + 10] = bytes(v ^ 0xFF for v in data[start:start + 10])
        (d / name).write_bytes(bytes(data))
    for folder, broken in (("unreadable", "b.png"), ("truncated", "c.png")):
        (d / folder).mkdir()
        for i, im in enumerate(_fid_images(4, size=16)):
            Image.fromarray(im).save(d / folder / f"{'abcd'[i]}.png")
        data = (d / folder / broken).read_bytes()
        (d / folder / broken).write_bytes(b"not an image" if folder == "unreadable" else data[:len(data) // 2])
    argv = {"unknown_flag": [good, good, "--foo"], "batch_size_zero": [good, good, "--batch-size", "0"],
            "unknown_metric": [good, good, "--metrics", "fid,kid"],
            "corrupt_ckpt": [good, good, "--inception-ckpt", d / "junk.pth"],
            "text_npz": [d / "samples.npz", good], "npz_wrong_dtype": [d / "floats.npz", good],
            "pickled_npz": [d / "pickled.npz", good], "stat_dims": [a, b],
            "unreadable_png": [d / "unreadable", good],
            "truncated_png": [d / "truncated", good, "--metrics", "is", "--workers", "2", "--batch-size", "4"],
            "damaged_npz_data": [d / "noisy.npz", good, "--metrics", "is", "--workers", "2", "--batch-size", "16"],
            "damaged_npz_header": [d / "smooth.npz", good],
            "too_few_for_fid": [good, good, "--metrics", "fid"],
            "save_stats_bad_folder": [good, good, "--save-stats", d / "missing" / "s.npz"]}
    save = {case: d / f"{case}_stats.npz" for case in argv}  # must not exist afterwards: a failed run leaves nothing
    return {case: (["--device", "cpu", "--inception-ckpt", str(_fid_ckpt), "--save-stats", str(save[case]),
                    *map(str, args)], save[case]) for case, args in argv.items()}


@pytest.mark.parametrize("case", list(_FID_BAD_INPUT))
def test_fid_bad_input_is_one_line_and_exit_status_2(case, _fid_bad_inputs, capsys, restore_determinism):
    """In this process: fid.py's __main__ is main(parse_args()), and an escaping exception fails the test."""
    argv, save = _fid_bad_inputs[case]
    with pytest.raises(SystemExit) as e:
        fid.main(fid.parse_args(argv))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("fid.py: error: "), err
    assert all(fragment in err for fragment in _FID_BAD_INPUT[case]), err
    assert not save.exists()


#################################################################################
#        fid.py's refusals of abbreviated flags and unreadable weights files       #
#################################################################################

# ---------------------------------------------------------------- abbreviated flags


def test_fid_parser_refuses_abbreviated_flags(capsys):
    # allow_abbrev=False, as repae.py and sample.py: --inception is not silently --inception-ckpt
    for flags in (["--inception", "w.pth"], ["--inception=w.pth"], ["--batch", "4"], ["--save", "s.npz"],
                  ["--metric", "is"], ["--dev", "cpu"], ["--work", "0"], ["--js"]):
        with pytest.raises(SystemExit) as e:
            fid.parse_args(["s.npz", "r.npz", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err == f"fid.py: error: unrecognized arguments: {' '.join(flags)} " \
                                            "(see fid.py --help)\n", err
    # the full names still work, in both spellings
    args = fid.parse_args(["s.npz", "r.npz", "--inception-ckpt=w.pth", "--batch-size", "4", "--save-stats", "s.npz",
                           "--metrics", "is", "--device", "cpu", "--workers", "0", "--json"])
    assert (args.inception_ckpt, args.batch_size, args.save_stats, args.metrics, args.workers, args.json) == \
        ("w.pth", 4, "s.npz", ["is"], 0, True)

# ---------------------------------------------------------------- unreadable --inception-ckpt files

# Files torch.load(..., weights_only=True) cannot read, each with the exception type it raises (checked below,
# so each type is proven covered). The short ones were found once, offline, among random byte strings
# r.randbytes(r.randint(1, 16)) with r = random.Random(seed), seed < 20000; the seed is given.


def _fid_truncated_zip():
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(8)}, buf)  # a real (zip) checkpoint, cut in half as by an interrupted copy
    return buf.getvalue()[:len(buf.getvalue()) // 2]


_FID_UNREADABLE_CKPT = {  # case: (file contents, what torch.load raises on it)
    "unpickling_error": (b"x", pickle.UnpicklingError),                          # seed 31: unsupported opcode
    "random_64_bytes": (random.Random(0).randbytes(64), pickle.UnpicklingError),
    "index_error_pop_from_empty_list": (b"a", IndexError),                       # seed 455
    "index_error_out_of_range": (b"q", IndexError),                              # seed 174
    "key_error": (b"hm", KeyError),                                              # seed 3113: a memo miss
    "unicode_decode_error": (b"c\xf9\x84", UnicodeDecodeError),                  # seed 1128
    "struct_error": (b"J", struct.error),                                        # seed 378
    "eof_error": (b"N", EOFError),                                               # seed 281
    "empty_file": (b"", EOFError),
    "bad_magic_number": (b").\x81\xe3\xfds%\xb9\x95*", RuntimeError),           # seed 18223
    "protocol_warning_then_index_error": (b"\x80\xe2\x86`\xb5)\xa7_", IndexError),  # seed 18786: warns first
    "type_error": (b"}]Ns", TypeError),                   # by hand: {}[[]] = None, an unhashable key
    "value_error": (b"ccollections\nOrderedDict\n)R]U\x03abcab", ValueError),   # by hand: a bad BUILD state
    "truncated_zip": (_fid_truncated_zip(), RuntimeError),
}


@pytest.mark.parametrize("case", list(_FID_UNREADABLE_CKPT))
def test_fid_unreadable_inception_ckpt_is_one_sentence(case, tmp_path, capsys, restore_determinism):
    data, raised = _FID_UNREADABLE_CKPT[case]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as e:
            torch.load(junk, map_location="cpu", weights_only=True)
    assert type(e.value) is raised, f"torch.load now raises {type(e.value).__name__} on {case}"
    if raised is pickle.UnpicklingError:  # torch's advice, which must not reach the user of a corrupt file
        assert "weights_only" in str(e.value)
    np.savez(tmp_path / "good.npz", arr_0=_fid_images(10, size=16))
    argv = [str(tmp_path / "good.npz")] * 2 + ["--metrics", "is", "--device", "cpu", "--inception-ckpt", str(junk)]
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as e:
        warnings.simplefilter("always")   # a warning would be one more stderr line in the CLI
        fid.main(fid.parse_args(argv))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("fid.py: error: "), err
    kind = "struct.error" if raised is struct.error else raised.__name__
    assert f"{junk} is not a readable PyTorch checkpoint ({kind}): the file is corrupt or not a checkpoint" in err
    assert err.rstrip().endswith("with --inception-ckpt.") and "weights_only" not in err and "Traceback" not in err
    assert not caught, [str(w.message) for w in caught]


def test_fid_cli_unreadable_inception_ckpt_stderr_is_one_line(tmp_path):
    """The real CLI: torch's protocol warning for these bytes would be a second stderr line, a traceback more."""
    junk = tmp_path / "junk.pth"
    junk.write_bytes(_FID_UNREADABLE_CKPT["protocol_warning_then_index_error"][0])
    np.savez(tmp_path / "good.npz", arr_0=_fid_images(10, size=16))
    r = _fid_cli(str(tmp_path / "good.npz"), str(tmp_path / "good.npz"), "--metrics", "is", "--device", "cpu",
                 "--inception-ckpt", str(junk))
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"fid.py: error: {junk} is not a readable PyTorch checkpoint (IndexError)")
    assert "--inception-ckpt" in r.stderr and "weights_only" not in r.stderr


def test_fid_unreadable_cached_weights_say_delete_or_pass_the_flag(tmp_path, monkeypatch, capsys,
                                                                  restore_determinism):
    np.savez(tmp_path / "s.npz", arr_0=_fid_images(4))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # a download would fail at once (port 9 refuses); the damaged cached file must be reported, not re-fetched
    monkeypatch.setattr(fid, "WEIGHTS_URL", "http://127.0.0.1:9/pt_inception.pth")
    cached = tmp_path / "torch_home/hub/checkpoints/pt_inception.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(_fid_truncated_zip())   # an interrupted download
    with pytest.raises(SystemExit) as e:
        fid.main(fid.parse_args([str(tmp_path / "s.npz")] * 2 + ["--metrics", "is", "--device", "cpu"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"the cached Inception weights {cached} are not a readable PyTorch checkpoint (RuntimeError)" in err
    assert "delete it to download it again, or pass" in err and err.rstrip().endswith("--inception-ckpt.")


def test_fid_inception_ckpt_without_read_permission_is_not_called_corrupt(tmp_path, monkeypatch, capsys,
                                                                          restore_determinism):
    # tests may run as root, which reads a chmod 000 file: the refusal is simulated at torch.load
    def refuse(path, **kw):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(fid.torch, "load", refuse)
    np.savez(tmp_path / "s.npz", arr_0=_fid_images(4))
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        fid.main(fid.parse_args([str(tmp_path / "s.npz")] * 2 + ["--metrics", "is", "--device", "cpu",
                                                                 "--inception-ckpt", str(tmp_path / "w.pth")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'w.pth'} is not readable (Permission denied); pass" in err and "corrupt" not in err
    assert err.rstrip().endswith("--inception-ckpt.")


#################################################################################
#                sample.py's .npz: streamed, in flat memory                      #
#################################################################################

def _pngs(folder, n, h=32, w=32, seed=0):
    os.makedirs(folder)
    arr = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(f"{folder}/{i:06d}.png")
    return arr


def test_write_npz_is_the_pngs_in_np_savez_layout_and_fid_memory_maps_it(tmp_path):
    folder = str(tmp_path / "s")
    arr = _pngs(folder, 5, 24, 40)                          # H != W: rows and columns not swapped
    logged = []
    assert sample.write_npz(folder, 5, logged.append) is None
    assert logged == [f"saved {folder}.npz (5, 24, 40, 3)"] and not os.path.lexists(f"{folder}.npz.tmp")
    with np.load(f"{folder}.npz", allow_pickle=False) as f:
        assert list(f.keys()) == ["arr_0"]
        got = f["arr_0"]
    assert got.shape == (5, 24, 40, 3) and got.dtype == np.uint8 and np.array_equal(got, arr)
    savez = io.BytesIO()                                    # the member's bytes are np.savez's: header, padding, rows
    np.savez(savez, arr_0=arr)
    with zipfile.ZipFile(f"{folder}.npz") as ours, zipfile.ZipFile(savez) as ref:
        (info,) = ours.infolist()
        assert info.compress_type == zipfile.ZIP_STORED == ref.getinfo("arr_0.npy").compress_type
        assert ours.read("arr_0.npy") == ref.read("arr_0.npy")
    # fid.py's reader: a stored member has a file offset (start), so it is read through the memory map
    shape, dtype, fortran, offset, start = fid._npz_headers(f"{folder}.npz")["arr_0"]
    assert (shape, dtype, fortran) == ((5, 24, 40, 3), np.uint8, False) and start is not None
    stats, (count, read) = fid.load_side(f"{folder}.npz")
    assert stats == {} and count == 5
    batches = list(read(2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert np.array_equal(np.concatenate([b.numpy() for b in batches]), arr)
    mapped = np.memmap(f"{folder}.npz", np.uint8, "r", offset=start, shape=shape)
    assert np.array_equal(mapped, arr)


def test_write_npz_an_unreadable_png_raises_its_own_error_and_leaves_no_npz(tmp_path):
    folder = str(tmp_path / "s")
    _pngs(folder, 4)
    with open(f"{folder}/000002.png", "r+b") as f:          # cut mid-data: PIL's "image file is truncated"
        f.truncate(200)
    with pytest.raises(OSError, match="truncated"):
        sample.write_npz(folder, 4, print)
    os.remove(f"{folder}/000002.png")
    with pytest.raises(FileNotFoundError, match="000002.png"):  # the PNG's error, not save's "could not write"
        sample.write_npz(folder, 4, print)
    assert not os.path.lexists(f"{folder}.npz") and not os.path.lexists(f"{folder}.npz.tmp")


def test_write_npz_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    h = w = 64                                              # one image 12 KiB, PIL reads PNGs in 64 KiB blocks
    peaks = {}
    for n in (8, 64):
        folder = str(tmp_path / f"n{n}")
        arr = _pngs(folder, n, h, w, seed=n)
        tracemalloc.start()
        try:
            assert sample.write_npz(folder, n, lambda msg: None) is None
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        with np.load(f"{folder}.npz") as f:
            assert np.array_equal(f["arr_0"], arr)
    print(f"tracemalloc peaks: {peaks}")
    # the whole array (64 x 12 KiB = 768 KiB, twice over with np.savez's copy) was in memory at once; now one image
    # and PIL's and zipfile's buffers are
    assert peaks[64] < 2 * peaks[8] and peaks[64] < 64 * h * w * 3 / 4, peaks


SHORT = ("--smoke", "--max-train-steps", "2", "--log-every", "1")


def not_notes(stderr):
    """stderr's lines other than repae.py's own notes ("repae.py: note: ..."): a warning is one of them."""
    return [line for line in stderr.splitlines() if not line.startswith("repae.py: note: ")]


#################################################################################
#                    Clean output: no warnings, LPIPS >= 0                       #
#################################################################################

def test_smoke_run_prints_no_warning_and_logs_non_negative_lpips(tmp_path):
    """PYTHONWARNINGS=default shows what Python hides by default (ResourceWarning: an unclosed log file)."""
    r = run_cli("repae.py", *SHORT, "--output-dir", str(tmp_path), env={"PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr and not_notes(r.stderr) == [], r.stderr
    rows = [json.loads(line) for line in (tmp_path / "smoke/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["lpips"] >= 0 for row in rows), [row["lpips"] for row in rows]   # a distance: heads >= 0


def test_two_processes_of_two_threads_print_no_grad_strides_warning(tmp_path):
    """With 2 threads a process, a non-contiguous attention output gave proj_out a weight gradient whose strides
    are not the parameter's, which DDP reports as "Grad strides do not match bucket view strides"."""
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", "repae.py", *SHORT, "--output-dir", str(tmp_path),
                env={"OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Grad strides do not match" not in r.stderr and "Warning" not in r.stderr, r.stderr[-3000:]
    assert not_notes(r.stderr) == [], r.stderr[-3000:]
    assert "2 processes on cpu" in r.stdout and "done: steps 0 to 2" in r.stdout


def test_attn_block_gradients_have_their_parameters_strides():
    """DDP's gradient layout contract: each grad strided as its parameter. is_contiguous() is not enough: a
    (64, 64, 1, 1) weight's grad with strides (64, 1, 64, 64) is contiguous too (its size-1 dims' strides)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                                # the layout of the channels-last grad depends on it
    try:
        torch.manual_seed(0)
        block = repae.AttnBlock(64)
        block(torch.randn(4, 64, 8, 8)).square().sum().backward()
    finally:
        torch.set_num_threads(threads)
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())


#################################################################################
#                 Multi-node: two torchrun nodes = one node of two               #
#################################################################################

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_bitwise_as_one_node_of_two_processes(tmp_path):
    flags = ("repae.py", "--smoke", "--max-train-steps", "3", "--batch-size", "4",
             "--log-every", "1", "--checkpointing-steps", "3")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", *flags, "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *flags, "--output-dir", str(tmp_path / "two")], cwd=HERE, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) for i in (0, 1)]
    try:
        outs = [node.communicate(timeout=300) for node in nodes]
    finally:                                    # a node left waiting for its peer is stopped, with its worker
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    assert "2 processes on cpu" in outs[0][0] and "done: steps 0 to 3" in outs[0][0]
    a, b = (load_ckpt(tmp_path / f"{run}/smoke/checkpoints/0000003.pt") for run in ("one", "two"))
    assert a["steps"] == b["steps"] == 3
    for key in ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "rng", "scaler"):
        assert_same(a[key], b[key], key)                    # torch.equal on every tensor
    assert not torch.equal(a["model"]["x_embedder.proj.weight"], a["ema"]["x_embedder.proj.weight"])   # it trained
    assert {k for k in vars(a["args"]) if vars(a["args"])[k] != vars(b["args"])[k]} == {"output_dir"}


#################################################################################
#          The released discriminator beside --vae-ckpt is the default           #
#################################################################################

def released_vae_folder(d):
    """vae.pt (smoke size) with its vae-latents-stats.pt and vae-discriminator-ckpt.pt, as the REPA-E release."""
    vae = repae.build_vae(smoke_args())
    torch.save(vae.state_dict(), d / "vae.pt")
    c = vae.z_channels
    torch.save(dict(latents_scale=torch.linspace(0.2, 0.3, c).view(1, c, 1, 1),
                    latents_bias=torch.linspace(-0.1, 0.1, c).view(1, c, 1, 1)), d / "vae-latents-stats.pt")
    torch.manual_seed(1)
    disc = repae.NLayerDiscriminator()
    for p in disc.parameters():
        nn.init.uniform_(p, -0.05, 0.05)                   # not its initialisation
    torch.save(disc.state_dict(), d / "vae-discriminator-ckpt.pt")
    return d / "vae.pt", d / "vae-discriminator-ckpt.pt"


def test_the_discriminator_beside_vae_ckpt_is_loaded_by_default(tmp_path):
    vae, disc = released_vae_folder(tmp_path)
    args = smoke_args("--vae-ckpt", str(vae))
    assert args.disc_pretrained_ckpt == str(disc)
    saved = torch.load(disc, weights_only=True)
    got = repae.build(args, CPU.device).disc.state_dict()
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    assert not torch.equal(repae.NLayerDiscriminator().state_dict()["main.0.weight"], saved["main.0.weight"])
    run = train(tmp_path / "with", "--vae-ckpt", str(vae), "--max-train-steps", "1")
    assert f"discriminator: from {disc};" in (run / "log.txt").read_text()
    os.remove(disc)
    assert smoke_args("--vae-ckpt", str(vae)).disc_pretrained_ckpt is None
    run = train(tmp_path / "without", "--vae-ckpt", str(vae), "--max-train-steps", "1")
    assert f"discriminator: random: no {disc} beside --vae-ckpt;" in (run / "log.txt").read_text()
    # a frozen VAE computes no GAN loss: it picks no discriminator file, and builds none
    released_vae_folder(tmp_path)
    frozen = smoke_args("--vae-ckpt", str(vae), "--freeze-vae")
    assert frozen.disc_pretrained_ckpt is None and repae.build(frozen, CPU.device).disc is None


#################################################################################
#             Unreadable weights files: one sentence naming the flag             #
#################################################################################

def write_junk(path, case):
    """The bytes of `case` at path; returns the exception type torch.load (weights_only) raises on them."""
    data, raised = _FID_UNREADABLE_CKPT[case]
    path.write_bytes(data)
    return raised


def load_raises(path, mmap=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as e:
            torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    return type(e.value)


def one_sentence(err, path, flag, program):
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "weights_only" not in err, err
    assert err == f"{program}: error: '{path}' is unreadable: it is corrupt or not a weights file; replace it or " \
                  f"pass another with {flag}\n", err


@pytest.mark.parametrize("case", list(_FID_UNREADABLE_CKPT))
def test_unreadable_weights_are_one_sentence_naming_the_flag(case, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    raised = write_junk(junk, case)
    assert load_raises(junk) is raised, f"torch.load now raises {load_raises(junk).__name__} on {case}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # the CLI test below checks the warning of one case
        err = error(capsys, repae.load_file, str(junk), "--vae-ckpt")
    one_sentence(err, junk, "--vae-ckpt", os.path.basename(sys.argv[0]))


def test_sample_py_unreadable_ckpt_or_vae_ckpt_is_one_sentence(tmp_path, capsys, restore_determinism):
    """--ckpt is memory-mapped (torch.load says RuntimeError on any non-zip file); --vae-ckpt is unpickled, so
    each exception type of the unpickler reaches sample.py there."""
    ckpt = train(tmp_path / "run", "--max-train-steps", "1") / "checkpoints/0000001.pt"
    capsys.readouterr()
    program = os.path.basename(sys.argv[0])
    for case in _FID_UNREADABLE_CKPT:
        junk = tmp_path / f"{case}.pt"
        raised = write_junk(junk, case)
        assert load_raises(junk, mmap=True) is RuntimeError and load_raises(junk) is raised, case
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for argv, flag in ((["--ckpt", str(junk)], "--ckpt"), (["--ckpt", str(ckpt), "--vae-ckpt", str(junk)],
                                                                  "--vae-ckpt")):
                one_sentence(error(capsys, sample.main, sample.parse_args(argv + ["--sample-dir", str(tmp_path)])),
                             junk, flag, program)
    assert set(os.listdir(tmp_path)) == {"run", *(f"{case}.pt" for case in _FID_UNREADABLE_CKPT)}   # no folder


def test_sample_py_cli_unreadable_ckpt_stderr_is_one_line(tmp_path):
    for case in ("truncated_zip", "protocol_warning_then_index_error"):
        junk = tmp_path / f"{case}.pt"
        write_junk(junk, case)
        r = run_cli("sample.py", "--ckpt", str(junk), "--sample-dir", str(tmp_path), env={"PYTHONWARNINGS": "default"})
        assert r.returncode == 2 and r.stdout == "", r.stderr
        one_sentence(r.stderr, junk, "--ckpt", "sample.py")


def test_repae_py_cli_unreadable_vae_ckpt_stderr_is_one_line(tmp_path):
    """These bytes make torch warn before it raises; the warning is not for the user of a corrupt file."""
    junk = tmp_path / "vae.pt"
    assert write_junk(junk, "protocol_warning_then_index_error") is IndexError
    r = run_cli("repae.py", "--smoke", "--vae-ckpt", str(junk), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2 and not (tmp_path / "out").exists(), r.stderr
    one_sentence(r.stderr, junk, "--vae-ckpt", "repae.py")


#################################################################################
#                   --help: option groups and every default                      #
#################################################################################

def help_entries(text):
    """{'--flag': its help, whitespace collapsed} of an argparse --help text."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"  -", line):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_repae_help_shows_option_groups_and_defaults():
    r = run_cli("repae.py", "--help", env={"COLUMNS": "100"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    titles = ["data", "models and their weights", "losses", "optimisation", "run folder", "speed and distributed",
              "tools"]
    lines = r.stdout.splitlines()
    assert all(f"{t}:" in lines for t in titles)
    assert [lines.index(f"{t}:") for t in titles] == sorted(lines.index(f"{t}:") for t in titles)
    entries = help_entries(r.stdout)
    assert entries["--resolution"].endswith("(default: 256)") and entries["--model"].endswith("(default: SiT-XL/2)")
    assert entries["--batch-size"].endswith("(default: 256)") and entries["--proj-coeff"].endswith("(default: 0.5)")
    # the --disc-pretrained-ckpt help says where its default comes from
    assert "<vae-ckpt stem>-discriminator-ckpt.pt" in entries["--disc-pretrained-ckpt"]
    data = lines[lines.index("data:") + 1:lines.index("models and their weights:")]
    assert any(line.startswith("  --resolution") for line in data)


def test_sample_help_groups_the_checkpoint_overrides_and_shows_every_default():
    r = run_cli("sample.py", "--help", env={"COLUMNS": "100"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    title = "overrides of the checkpoint's settings:"
    assert title in lines
    group = "\n".join(lines[lines.index(title) + 1:])
    assert "defaults to the checkpoint's own args" in " ".join(group.split())
    entries = help_entries(r.stdout)
    overrides = ["--model", "--vae", "--resolution", "--num-classes", "--encoder-depth"]
    assert [f for f in entries if f in overrides] == overrides
    assert all(re.search(rf"^  {f}\b", group, re.M) for f in overrides)                 # in the group, not above it
    assert all(entries[f].endswith("(default: the checkpoint's)") for f in overrides)
    assert all("(default: " in text for f, text in entries.items() if f != "-h"), \
        [f for f, text in entries.items() if f != "-h" and "(default: " not in text]
    assert entries["--num-steps"].endswith("(default: 250)") and entries["--mode"].endswith("(default: sde)")
    assert entries["--num-fid-samples"].endswith("(default: 50000)")
    # the overrides still parse to None (the checkpoint's value) or to the value given
    args = sample.parse_args(["--ckpt", "c.pt", "--resolution", "64"])
    assert [getattr(args, k) for k in sample.MODEL_FLAGS] == [None, None, 64, None, None]
