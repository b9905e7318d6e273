"""
Sampling from a REPA-E (or frozen-VAE) SiT: Euler ODE / Euler-Maruyama SDE with interval CFG.

  torchrun --nproc_per_node=8 sample.py --ckpt exps/run/checkpoints/0400000.pt --num-fid-samples 50000 \
      --mode sde --num-steps 250 --cfg-scale 2.2 --guidance-low 0 --guidance-high 0.65
"""
import torch

from repae import interpolant


#################################################################################
#                  Samplers: time runs from t = 1 (noise) to t = 0 (data)        #
#################################################################################
# The SiT predicts a velocity v(x_t, t, y). Classifier-free guidance mixes the conditional and the
# null-label (index num_classes) predictions, only for guidance_low <= t <= guidance_high.

def guided(model, x, t, y, cfg_scale, guidance_low, guidance_high, fn=lambda v, x, t: v):
    """fn(v, x, t) of the model's velocity at (x, t), guided where CFG applies. The unconditional pass
    runs only inside the interval, batched with the conditional one."""
    use_cfg = cfg_scale > 1.0 and guidance_low <= t <= guidance_high
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
def euler_sampler(model, noise, y, num_steps=50, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                  heun=False):
    """Euler ODE on linspace(1, 0, N+1), optional Heun correction on all but the last step; in float64."""
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = noise.to(torch.float64)
    cfg = dict(cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1].tolist(), t_steps[1:].tolist())):
        d = guided(model, x, t_cur, y, **cfg)
        x_next = x + (t_next - t_cur) * d
        if heun and i < num_steps - 1:
            d_next = guided(model, x_next, t_next, y, **cfg)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


def score_from_velocity(v, x, t, path_type):
    """Score of x_t from the predicted velocity: for the linear path
    ((1-t)/(-1) * v - x) / (t^2 - ((1-t)/(-1)) * t)."""
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


@torch.no_grad()
def euler_maruyama_sampler(model, noise, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                           path_type="linear"):
    """Euler-Maruyama on linspace(1, 0.04, N) then 0, diffusion w(t) = 2t, drift v - w/2 * score;
    the last step to 0 takes the mean (no noise). Noise is drawn before each model call, in float64."""
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = noise.to(torch.float64)
    cfg = dict(cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1].tolist(), t_steps[1:].tolist())):
        dt, w = t_next - t_cur, 2.0 * t_cur
        last = i == len(t_steps) - 2
        deps = None if last else torch.randn_like(x) * abs(dt) ** 0.5
        drift = guided(model, x, t_cur, y, **cfg,
                       fn=lambda v, x_in, t: v - 0.5 * w * score_from_velocity(v, x_in, t, path_type))
        x = x + drift * dt if last else x + drift * dt + w ** 0.5 * deps
    return x
