"""Tests of the REPA-E reference implementation: CPU only, tiny shapes, random weights, no network."""
import argparse
import copy
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.models.inception import Inception3

import fid
import repae
import sample

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"), device_ids=None, ctrl=None, is_main=True)


def smoke_args(*extra):
    return repae.parse_args(["--smoke", *extra])


def tiny_run(*extra, seed=0):
    """The smoke models, optimisers and a batch, ready for repae_step."""
    torch.manual_seed(seed)
    args = smoke_args(*extra)
    m = repae.wrap_distributed(repae.build(args, CPU.device), CPU)
    repae.update_ema(m.ema, m.sit, 0.0)
    ds = repae.SmokeImages(8, args.resolution, args.num_classes)
    x = torch.stack([ds[i][0] for i in range(4)])
    y = torch.tensor([ds[i][1] for i in range(4)])
    return args, m, x, y


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
    scale, bias = torch.tensor([0.18215, 0.5, 2.0, 1.0]), torch.tensor([0.1, -0.2, 0.3, 0.0])
    sit.init_bn(scale, bias)
    s, b = sit.latent_stats()
    assert torch.allclose(s, scale) and torch.equal(b, bias)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 4
    var = scale.pow(-2).view(1, -1, 1, 1)
    assert torch.allclose(sit.eval().bn(z), (z - bias.view(1, -1, 1, 1)) / torch.sqrt(var + 1e-4), atol=1e-5)


def test_interpolant_and_velocity_target():
    z_n, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.0, 0.3, 1.0])
    x_t, v = repae.noisy_input(z_n, t, eps, "linear")
    assert torch.allclose(v, eps - z_n) and torch.allclose(x_t[0], z_n[0]) and torch.allclose(x_t[2], eps[2])
    x_t, v = repae.noisy_input(z_n, t, eps, "cosine")
    assert torch.allclose(x_t[2], eps[2], atol=1e-6) and torch.allclose(v[0], math.pi / 2 * eps[0])
    t = repae.sample_t(10_000, "lognormal", "linear", "cpu")
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.03   # sigma = 1 at the median


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
    logs = repae.repae_step(x, y, m, args)
    assert seen["sit_grads"] == [] and seen["vae_grads"] == len(list(m.vae.parameters()))
    assert not seen["sit_training"]
    assert all(torch.equal(a, b) for a, b in zip(seen["bn"], bn_before))          # VAE pass: running stats kept
    assert not torch.equal(m.sit.bn.running_mean, bn_before[0])                     # SiT pass: updated
    assert all(p.requires_grad for p in m.sit_params) and not m.sit.pos_embed.requires_grad
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
    repae.repae_step(x, y, m, args)
    return grads["g"]


def test_stop_gradient_keeps_l_diff_out_of_the_vae():
    same = [torch.equal(a, b) for a, b in zip(_vae_grads(True, 1), _vae_grads(True, 2))]
    assert all(same)                                        # VAE gradient does not depend on L_DIFF
    differ = [torch.equal(a, b) for a, b in zip(_vae_grads(False, 1), _vae_grads(False, 2))]
    assert not all(differ)                                  # --no-stop-grad: L_DIFF reaches the VAE


def test_t_and_noise_are_reused(monkeypatch):
    calls, original = [], repae.noisy_input
    monkeypatch.setattr(repae, "noisy_input", lambda z_n, t, eps, path: calls.append((t, eps)) or original(z_n, t, eps, path))
    args, m, x, y = tiny_run()
    repae.repae_step(x, y, m, args)
    (t1, e1), (t2, e2) = calls
    assert torch.equal(t1, t2) and torch.equal(e1, e2)


def test_ema_of_parameters_and_buffers():
    args, m, x, y = tiny_run("--ema-decay", "0.9")
    ema0 = {k: v.clone() for k, v in m.ema.state_dict().items()}
    repae.repae_step(x, y, m, args)
    model, ema = m.sit.state_dict(), m.ema.state_dict()
    for k in ("bn.running_mean", "bn.running_var", "blocks.0.attn.qkv.weight"):
        assert torch.allclose(ema[k], 0.9 * ema0[k] + 0.1 * model[k], atol=1e-6), k
    assert ema["bn.num_batches_tracked"] == model["bn.num_batches_tracked"] == 1


def test_frozen_vae_baselines_build_nothing_they_do_not_need():
    args, m, x, y = tiny_run("--freeze-vae")
    vae0 = copy.deepcopy(m.vae.state_dict())
    logs = repae.repae_step(x, y, m, args)
    assert not hasattr(m, "disc") and not hasattr(m, "lpips") and "loss_vae" not in logs
    assert all(torch.equal(v, vae0[k]) for k, v in m.vae.state_dict().items())
    assert torch.equal(m.sit.bn.running_var, torch.ones(4)) and m.sit.bn.num_batches_tracked == 0   # fixed stats
    args, m, x, y = tiny_run("--freeze-vae", "--proj-coeff", "0")              # vanilla SiT
    assert m.encoders == [] and len(m.sit.projectors) == 0
    assert repae.repae_step(x, y, m, args)["l_repa"] == 0


#################################################################################
#                       Weights and bad input: one clear sentence                #
#################################################################################

def test_missing_and_mismatched_weights(tmp_path):
    with pytest.raises(SystemExit, match="--vae-ckpt"):
        repae.build(repae.parse_args(["--vae-ckpt", str(tmp_path / "nope.pt"), "--model", "SiT-S/2"]), CPU.device)
    torch.save(repae.AutoencoderKL(ch=32, ch_mult=(1, 2), z_channels=4, num_res_blocks=1).state_dict(), tmp_path / "v.pt")
    with pytest.raises(SystemExit, match=r"does not match the model .*missing keys.*shape mismatches.*--vae"):
        repae.load_state(repae.vae_models["f8d4"](), torch.load(tmp_path / "v.pt"), "--vae-ckpt", "--vae-ckpt/--vae")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt"):
        repae.load_file(str(tmp_path / "bad.pt"), "--resume")


def test_dinov2_offline_fails_fast_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="--enc-ckpt"):
        repae.load_encoder("dinov2-vit-b", 256)
    with pytest.raises(SystemExit, match="--enc-ckpt"):
        repae.load_encoder("dinov2-vit-b", 256, ckpt=str(tmp_path / "missing.safetensors"))
    with pytest.raises(SystemExit, match="dinov2-vit"):
        repae.dinov2_timm_name("mocov3-vit-b")
    assert repae.dinov2_timm_name("dinov2-vit-l-reg") == "vit_large_patch14_reg4_dinov2.lvd142m"


def test_contradictory_flags_are_refused(monkeypatch, capsys):
    for argv, msg in [(["--freeze-vae", "--no-stop-grad"], "--no-stop-grad"), (["--proj-coeff", "0"], "projector"),
                      (["--resolution", "100"], "multiple of 32")]:
        with pytest.raises(SystemExit):
            repae.parse_args(argv)
        assert msg in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        repae.parse_args(["--batch-size", "3"])
    assert "not divisible" in capsys.readouterr().err


#################################################################################
#            Training run: DDP, exact resume, preemption, data errors            #
#################################################################################

def train(tmp_path, *extra):
    """An in-process smoke training run; returns its run folder."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    repae.main(smoke_args("--output-dir", str(tmp_path), "--sample-every", "0", "--log-every", "2", *extra))
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
    one = train(tmp_path / "one", "--max-train-steps", "4", "--checkpointing-steps", "4", "--max-images", "16")
    two = train(tmp_path / "two", "--max-train-steps", "2", "--checkpointing-steps", "2", "--max-images", "16")
    two = train(tmp_path / "two", "--max-train-steps", "4", "--checkpointing-steps", "2", "--max-images", "16",
                "--resume", "auto")                         # 16 images, batch 8: the resume crosses an epoch
    a, b = load_ckpt(one / "checkpoints/0000004.pt"), load_ckpt(two / "checkpoints/0000004.pt")
    for k in ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "rng", "steps"):
        assert_same(a[k], b[k], k)
    assert "resumed from" in (two / "log.txt").read_text()
    metrics = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [2, 4] and {"l_diff", "img_per_s", "eta_s", "latent_tv", "bn_var"} <= set(metrics[0])


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


def test_corrupt_checkpoint_is_detected_on_resume(tmp_path):
    run = train(tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "2")
    path = run / "checkpoints/0000002.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SystemExit, match="0000002.pt.*corrupt"):
        train(tmp_path, "--max-train-steps", "4", "--resume", "auto")


def test_non_finite_loss_stops_without_overwriting_checkpoints(tmp_path, monkeypatch):
    step = repae.repae_step
    calls = []

    def nan_at_step_3(*a):
        logs = step(*a)
        calls.append(1)
        return {**logs, "l_diff": logs["l_diff"] * float("nan")} if len(calls) == 3 else logs
    monkeypatch.setattr(repae, "repae_step", nan_at_step_3)
    with pytest.raises(SystemExit, match=r"non-finite loss or gradient at step 3: l_diff=nan"):
        train(tmp_path, "--max-train-steps", "6", "--checkpointing-steps", "2", "--log-every", "5")
    assert sorted(os.listdir(tmp_path / "smoke/checkpoints")) == ["0000002.pt"]


def make_images(folder, classes=2, per_class=4, size=(80, 70)):
    for c in range(classes):
        os.makedirs(folder / f"class{c}", exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * c, 10 * i, 90)).save(folder / f"class{c}" / f"{i}.png")


def test_data_errors(tmp_path):
    for setup, msg in [(lambda d: None, "is not a folder"), (lambda d: d.mkdir(), "no class sub-folders"),
                       (lambda d: (d / "a").mkdir(parents=True), "holds no images"),
                       (lambda d: make_images(d, 1, 3), "fewer than one global batch")]:
        d = tmp_path / f"data{len(msg)}"
        setup(d)
        with pytest.raises(SystemExit, match=msg):
            repae.main(smoke_args("--data-dir", str(d), "--output-dir", str(tmp_path)))
    d = tmp_path / "broken"
    make_images(d, 2, 4)
    (d / "class1" / "bad.png").write_bytes(b"no png")
    with pytest.raises(RuntimeError, match="bad.png"):
        train(tmp_path, "--data-dir", str(d), "--max-train-steps", "3")


def test_image_folder_adm_crop(tmp_path):
    make_images(tmp_path / "d", 2, 4, size=(300, 200))
    ds = repae.build_dataset(smoke_args("--data-dir", str(tmp_path / "d"), "--max-images", "4"))
    x, y = ds[3]
    assert len(ds) == 4 and x.dtype == torch.uint8 and x.shape == (3, 64, 64) and y == 1
    assert repae.center_crop_arr(Image.new("RGB", (1000, 600)), 64).shape == (64, 64, 3)


def test_two_process_gloo_run_keeps_replicas_identical(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys, torch, repae\n"
        "save = repae.save_checkpoint\n"
        "def per_rank(path, m, args, step, d):\n"
        "    torch.save(dict(sit=m.sit.state_dict(), vae=list(m.vae.parameters()), disc=list(m.disc.parameters()),\n"
        "                    ema=m.ema.state_dict()), f'{path}.rank{d.rank}')\n"
        "    save(path, m, args, step, d)\n"
        "repae.save_checkpoint = per_rank\n"
        "repae.main(repae.parse_args(sys.argv[1:]))\n")
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", str(driver), "--smoke", "--output-dir",
                str(tmp_path), "--max-train-steps", "3", "--checkpointing-steps", "3", "--sample-every", "0",
                env={"PYTHONPATH": HERE})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"smoke/checkpoints/0000003.pt.rank{i}", weights_only=True) for i in (0, 1))
    assert_same(a, b)
    assert "2 processes on cpu" in (tmp_path / "smoke/log.txt").read_text()


def test_smoke_cli_end_to_end(tmp_path):
    r = run_cli("repae.py", "--smoke", "--output-dir", str(tmp_path), "--max-train-steps", "4",
                "--checkpointing-steps", "4", "--sample-every", "4", "--log-every", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "smoke"
    assert "random weights" in r.stdout and "done: 4 steps" in r.stdout
    assert {"0000004-samples.png", "0000004-recon.png"} <= set(os.listdir(run / "samples"))
    assert Image.open(run / "samples/0000004-samples.png").size == (4 * 66 + 2, 4 * 66 + 2)
    assert json.loads((run / "args.json").read_text())["smoke"] is True
    assert load_ckpt(run / "checkpoints/0000004.pt")["steps"] == 4


#################################################################################
#                 Speed tooling and the E2E-VAE export                           #
#################################################################################

def test_benchmark_prints_every_figure():
    r = run_cli("repae.py", "--benchmark", "2", "--smoke", "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    median = lambda k: float(lines[k].split()[1])
    phases = [median(f"time_{p}_ms") for p in ("dinov2", "vae", "discriminator", "sit")]
    assert all(v > 0 for v in phases) and float(lines["images_per_s"]) > 0
    assert abs(sum(phases) - median("step_time_ms")) < 0.2 * median("step_time_ms")
    assert float(lines["peak_memory_gb"].split()[0]) > 0 and "2 timed steps" in lines["benchmark"]


def test_compiled_step_matches_eager(monkeypatch):
    """--compile's graph capture (dynamo + AOT autograd) gives the eager losses. The CPU code generator
    (inductor) takes minutes to build on two cores, so the test compiles with the aot_eager backend."""
    torch._dynamo.reset()
    args, m, x, y = tiny_run(seed=3)
    torch.manual_seed(7)
    eager = repae.repae_step(x, y, m, args)
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_(self, backend="aot_eager"))
    args, m, x, y = tiny_run("--compile", seed=3)
    torch.manual_seed(7)
    compiled = repae.repae_step(x, y, m, args)
    for k in eager:
        assert torch.allclose(eager[k], compiled[k], rtol=1e-4, atol=1e-5), k
    torch._dynamo.reset()


def test_vae_checkpointing_gives_the_same_gradients():
    vae = repae.AutoencoderKL(**repae.SMOKE["vae"])
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for on in (False, True):
        vae.zero_grad()
        vae.decoder.checkpointing = on
        vae.decode(vae.encode(x).mode()).square().mean().backward()
        grads.append([p.grad.clone() for p in vae.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_export_vae_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = repae.vae_models["f8d4"]()
    sit = repae.SiT_models["SiT-S/2"](input_size=8, z_dims=(16,), encoder_depth=2)
    sit.init_bn(torch.tensor([0.18215, 0.2, 0.3, 0.4]), torch.tensor([0.1, 0.0, -0.1, 0.2]))
    official = dict(model=sit.state_dict(), ema=sit.state_dict(), vae=vae.state_dict(), steps=400_000,
                    args=argparse.Namespace(vae="f8d4", model="SiT-S/2"))        # released REPA-E layout
    torch.save(official, tmp_path / "0400000.pt")
    r = run_cli("repae.py", "--export-vae", str(tmp_path / "0400000.pt"), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = repae.vae_models["f8d4"]()
    fresh.load_state_dict(torch.load(tmp_path / "out/e2e-f8d4-0400000.pt", weights_only=True), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), vae.state_dict().values()))
    scale, bias = repae.load_latent_stats(str(tmp_path / "out/e2e-f8d4-0400000-latents-stats.pt"))
    assert torch.equal(scale, sit.bn.running_var.rsqrt()) and torch.equal(bias, sit.bn.running_mean)
    del official["vae"]
    torch.save(official, tmp_path / "ldm.pt")
    r = run_cli("repae.py", "--export-vae", str(tmp_path / "ldm.pt"))
    assert r.returncode != 0 and "end-to-end" in r.stderr


def test_frozen_training_on_an_exported_vae(tmp_path, monkeypatch):
    run = train(tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "2")
    r = run_cli("repae.py", "--export-vae", str(run / "checkpoints/0000002.pt"), "--output-dir", str(tmp_path / "e2e"))
    assert r.returncode == 0, r.stderr[-3000:]
    vae_path = tmp_path / "e2e/e2e-f8d4-0000002.pt"
    scale, bias = repae.load_latent_stats(str(vae_path).replace(".pt", "-latents-stats.pt"))
    args = smoke_args("--freeze-vae", "--vae-ckpt", str(vae_path))
    args.random_weights = False                             # load the exported VAE and its stats ...
    load_encoder = repae.load_encoder                       # ... but keep DINOv2 random (offline)
    monkeypatch.setattr(repae, "load_encoder", lambda enc, res, ckpt, random, **k: load_encoder(enc, res, None, True, **k))
    m = repae.wrap_distributed(repae.build(args, CPU.device), CPU)
    assert torch.allclose(m.sit.latent_stats()[0], scale) and torch.equal(m.sit.latent_stats()[1], bias)
    exported = torch.load(vae_path, weights_only=True)
    x, y = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), torch.arange(4)
    repae.repae_step(x, y, m, args)
    assert all(torch.equal(v, exported[k]) for k, v in m.vae.state_dict().items())
    assert not hasattr(m, "disc") and not hasattr(m, "lpips") and not hasattr(m, "opt_vae")


#################################################################################
#              README: every command parses, every line anchor holds             #
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


def test_readme_commands_match_the_argument_parsers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parsers = {"repae.py": repae.parse_args, "sample.py": sample.parse_args, "fid.py": fid.parse_args}
    seen = {name: 0 for name in parsers}
    for script, argv in readme_commands():
        parsers[script](argv)                               # exits with the parser's message on a bad flag
        seen[script] += 1
    assert seen["repae.py"] >= 10 and seen["sample.py"] >= 3 and seen["fid.py"] >= 1


def test_readme_line_anchors_point_at_their_code():
    import re
    lines = open(os.path.join(HERE, "repae.py")).read().splitlines()
    anchors = re.findall(r"repae\.py:(\d+)(?:-(\d+))? \(`([^`]+)`\)", open(os.path.join(HERE, "README.md")).read())
    assert len(anchors) >= 8
    for a, b, marker in anchors:
        span = lines[int(a) - 1:int(b or a)]
        assert len(span) <= 70 and any(marker in line for line in span), (a, b, marker)


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
    euler = {n: (sample.euler_sampler(model, noise, y, num_steps=n) - exact).abs().max().item() for n in (50, 200)}
    heun = {n: (sample.euler_sampler(model, noise, y, num_steps=n, heun=True) - exact).abs().max().item()
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
    ours = sample.euler_sampler(model, noise, y, num_steps=10, cfg_scale=3.0, guidance_low=0.45, heun=True)
    ref = _sample_reference_heun(model, noise, y, 10, 3.0, 0.45, 1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_sample_cfg_scale_one_is_the_unguided_sampler():
    model, noise, y = _SampleGaussianModel([1.0, -1.0], 0.5), torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 1, 0])
    x = noise.double()
    for t_cur, t_next in zip(torch.linspace(1, 0, 9, dtype=torch.float64).tolist()[:-1],
                             torch.linspace(1, 0, 9, dtype=torch.float64).tolist()[1:]):
        x = x + (t_next - t_cur) * model(x.float(), torch.full((4,), t_cur), y, mode="sample")[0].double()
    model.calls.clear()
    assert torch.equal(sample.euler_sampler(model, noise, y, num_steps=8, cfg_scale=1.0), x)
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


def test_sample_inputs_and_sde_noise_do_not_depend_on_the_batch():
    shape = (1, 2, 2)
    noise, y, gens = sample.draw_inputs(range(6), 7, shape, 5)
    parts = [sample.draw_inputs(range(a, b), 7, shape, 5) for a, b in ((0, 2), (2, 6))]
    assert torch.equal(noise, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert not torch.equal(noise, sample.draw_inputs(range(6), 8, shape, 5)[0])
    model = _SampleGaussianModel([0.0, 1.0, 2.0, 3.0, 4.0], 0.5)
    whole = sample.euler_maruyama_sampler(model, noise, y, num_steps=6, generators=gens)
    split = torch.cat([sample.euler_maruyama_sampler(model, p[0], p[1], num_steps=6, generators=p[2]) for p in parts])
    assert torch.equal(whole, split)


def test_sample_balanced_labels():
    args = sample.parse_args(["--ckpt", "x", "--balanced", "--num-fid-samples", "20"])
    labels = sample.label_schedule(args, 5)
    assert labels.bincount().tolist() == [4] * 5 and not torch.equal(labels, labels.sort().values)
    with pytest.raises(SystemExit, match="divisible"):
        sample.label_schedule(args, 6)


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


def _sample_run(ckpt, out, *flags):
    sample.main(sample.parse_args(["--ckpt", ckpt, "--sample-dir", str(out), "--num-fid-samples", "6",
                                   "--pproc-batch-size", "4", "--num-steps", "4", "--cfg-scale", "2",
                                   "--guidance-high", "0.7", *flags]))
    return np.load(f"{out}.npz")["arr_0"]


def test_sample_folder_npz_and_resume_regenerates_exactly_the_missing_pngs(tmp_path):
    ckpt, _, _ = _sample_tiny(tmp_path)
    out = tmp_path / "s"
    arr = _sample_run(ckpt, out)
    assert arr.shape == (6, 64, 64, 3) and arr.dtype == np.uint8 and len({a.tobytes() for a in arr}) == 6
    names = [f"{i:06d}.png" for i in range(6)]
    data = {n: (out / n).read_bytes() for n in names}
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}
    for n in (names[1], names[4]):
        (out / n).unlink()
    os.remove(f"{out}.npz")
    again = _sample_run(ckpt, out)
    assert all((out / n).read_bytes() == data[n] for n in names) and np.array_equal(again, arr)
    assert all((out / n).stat().st_mtime_ns == mtimes[n] for n in names if n not in (names[1], names[4]))
    with pytest.raises(SystemExit, match="other settings"):      # never mix samples of two settings
        _sample_run(ckpt, out, "--global-seed", "1")


def test_sample_one_and_two_processes_give_identical_npz(tmp_path):
    # batches are fixed index ranges drawn from per-sample seeds, so 2 processes (gloo) redraw the same
    # floats as 1; both single-threaded, as torchrun sets OMP_NUM_THREADS=1 for its workers
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
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "sample.py", *flags, "--sample-dir", str(tmp_path / "two")], cwd=HERE,
                       env=dict(env, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "with 2 process(es)" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    one, two = np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"]
    assert one.shape == (6, 64, 64, 3) and np.array_equal(one, two)


def test_sample_frozen_vae_checkpoint_equals_the_end_to_end_layout(tmp_path):
    e2e, _, _ = _sample_tiny(tmp_path)
    frozen, _, _ = _sample_tiny(tmp_path, frozen=True)     # same seed: the same SiT, BN stats and VAE
    ref = _sample_run(e2e, tmp_path / "e2e")
    assert np.array_equal(_sample_run(frozen, tmp_path / "from_args"), ref)             # run's vae_ckpt
    os.rename(tmp_path / "vae.pt", tmp_path / "moved.pt")
    assert np.array_equal(_sample_run(frozen, tmp_path / "from_flag", "--vae-ckpt", str(tmp_path / "moved.pt")), ref)
    with pytest.raises(SystemExit, match="holds no VAE.*--vae-ckpt"):
        _sample_run(frozen, tmp_path / "none")
    # a fixed statistics file replaces the EMA BatchNorm buffers (checkpoints that normalised with one)
    stats = dict(latents_scale=torch.full((1, 4, 1, 1), 3.0), latents_bias=torch.zeros(1, 4, 1, 1))
    torch.save(stats, tmp_path / "st.pt")
    assert not np.array_equal(_sample_run(e2e, tmp_path / "stats", "--latents-stats", str(tmp_path / "st.pt")), ref)


def test_sample_official_repae_checkpoint_layout(tmp_path, monkeypatch):
    # Released checkpoints: official train_repae.py args (no `smoke`), SiT `ema` + tuned `vae` in one file.
    # The registries are shrunk so the real-name path (SiT-XL/2, f8d4) runs at smoke size.
    monkeypatch.setitem(repae.SiT_models, "SiT-XL/2", functools.partial(repae.SiT, depth=8, hidden_size=32, num_heads=2,
                                                                         patch_size=2, projector_dim=64))
    monkeypatch.setitem(repae.vae_models, "f8d4", lambda: repae.AutoencoderKL(**repae.SMOKE["vae"]))
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
    with pytest.raises(SystemExit, match="does not match"):                    # a mismatch names itself
        _sample_run(str(tmp_path / "0400000.pt"), tmp_path / "bad", "--num-classes", "7")


def test_sample_grid_and_refusals(tmp_path):
    ckpt, _, _ = _sample_tiny(tmp_path)
    args = lambda labels: sample.parse_args(["--ckpt", ckpt, "--grid", "--class-labels", labels, "--num-steps", "4",
                                             "--mode", "ode", "--sample-dir", str(tmp_path / labels)])
    sample.main(args("1,3,5"))
    sample.main(args("1,4,5"))
    a, b = (np.asarray(Image.open(tmp_path / f"{s}.png")) for s in ("1,3,5", "1,4,5"))
    assert a.shape == (134, 134, 3)                         # 2 x 2 tiles of 64 px, padding 2
    # tile k depends on its own label and seed only: changing label 1 changes tile 1, not tile 0
    assert np.array_equal(a[2:66, 2:66], b[2:66, 2:66]) and not np.array_equal(a[2:66, 68:132], b[2:66, 68:132])
    with pytest.raises(SystemExit, match="lie in"):
        sample.main(args("1,10"))
    no_ema = tmp_path / "no_ema.pt"
    torch.save(dict(model=torch.load(ckpt, weights_only=False)["model"]), no_ema)
    with pytest.raises(SystemExit, match="no 'ema'"):
        _sample_run(str(no_ema), tmp_path / "x")


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


def test_fid_build_inception_loads_checkpoint_strictly(tmp_path, _fid_ckpt):
    net = fid.build_inception(str(_fid_ckpt))
    expected = _fid_random_net().state_dict()
    assert not net.training and all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    torch.save({"fc.weight": torch.zeros(1008, 2048), "extra": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(fid.InputError, match="does not hold the pytorch-fid Inception weights"):
        fid.build_inception(str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="does not exist"):
        fid.build_inception(str(tmp_path / "missing.pth"))


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
])
def test_fid_bad_npz_images(tmp_path, array, message):
    np.savez(tmp_path / "x.npz", arr_0=array)
    with pytest.raises(ValueError, match=message):
        fid.load_side(str(tmp_path / "x.npz"))


def test_fid_bad_folders(tmp_path):
    empty, one, mixed = (tmp_path / n for n in ("empty", "one", "mixed"))
    for d in (empty, one, mixed):
        d.mkdir()
    with pytest.raises(ValueError, match="no png/jpg/jpeg/webp"):
        fid.load_side(str(empty))
    Image.fromarray(_fid_images(1)[0]).save(one / "a.png")
    assert fid.load_side(str(one))[1][0] == 1  # enough for IS; the other metrics are decided by choose_metrics
    Image.fromarray(_fid_images(1, size=8)[0]).save(mixed / "a.png")
    Image.fromarray(_fid_images(1, size=16)[0]).save(mixed / "b.jpg")
    with pytest.raises(ValueError, match="differ in resolution"):
        fid.load_side(str(mixed))


def test_fid_bad_paths_and_statistics_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        fid.load_side(str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "junk.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="neither images"):
        fid.load_side(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "half.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="mu without sigma"):
        fid.load_side(str(tmp_path / "half.npz"))
    np.savez(tmp_path / "fidonly.npz", mu=np.zeros(3), sigma=np.eye(3))
    side = ("fidonly.npz", *fid.load_side(str(tmp_path / "fidonly.npz")))
    with pytest.raises(ValueError, match="fidonly.npz has no images and no mu_s/sigma_s"):
        fid.choose_metrics(["sfid"], [side, side])  # sFID asked of a file that only has FID stats
    assert fid.choose_metrics(None, [side, side])[0] == ["fid"]


def test_fid_main_reports_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fid.main(fid.parse_args([str(tmp_path / "nope"), str(tmp_path / "nope2"), "--device", "cpu"]))
    assert e.value.code == 2
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
    assert float(lines["FID"]) == pytest.approx(result["FID"], abs=1e-4)


def test_fid_cli_missing_weights_fails_fast_naming_the_flag(tmp_path, monkeypatch, capsys):
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
                           (["--device", "foo"], "argument --device: 'foo' is not a torch device")):
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
    "too_few_for_fid": ("FID needs more than 2048 samples per side", "good.npz has 10 images",
                        "these inputs allow --metrics is,pr."),
    "save_stats_bad_folder": ("--save-stats ", "must be a .npz path in an existing folder",),
}


@pytest.fixture(scope="module")
def _fid_bad_runs(tmp_path_factory, _fid_ckpt):
    """Every bad-input case of the CLI as a subprocess, all started at once: each spends ~4 s importing torch."""
    d = tmp_path_factory.mktemp("fid_bad")
    good = d / "good.npz"
    np.savez(good, arr_0=_fid_images(10, size=16))
    (d / "samples.npz").write_text("not a zip archive")
    (d / "junk.pth").write_text("not a checkpoint")
    np.savez(d / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(d / "pickled.npz", arr_0=np.array([{"a": 1}], dtype=object))
    a, b = _fid_write_stats(d / "a.npz", 5, seed=0), _fid_write_stats(d / "b.npz", 6, seed=1)
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
            "too_few_for_fid": [good, good, "--metrics", "fid"],
            "save_stats_bad_folder": [good, good, "--save-stats", d / "missing" / "s.npz"]}
    runs = {}
    for case, args in argv.items():
        save = d / f"{case}_stats.npz"  # must not exist afterwards: a failed run leaves nothing behind
        cmd = [sys.executable, os.path.join(HERE, "fid.py"), "--device", "cpu", "--inception-ckpt", str(_fid_ckpt),
               "--save-stats", str(save), *map(str, args)]
        runs[case] = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), save
    return runs


@pytest.mark.parametrize("case", list(_FID_BAD_INPUT))
def test_fid_bad_input_is_one_line_and_exit_status_2(case, _fid_bad_runs):
    proc, save = _fid_bad_runs[case]
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and out == "" and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("fid.py: error: "), err
    assert all(fragment in err for fragment in _FID_BAD_INPUT[case]), err
    assert not save.exists()
