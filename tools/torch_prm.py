#!/usr/bin/env python3
"""The PRM attack loop in PyTorch, for timing against `prm bench` (issue 4).

It runs the same work as `prm bench`: an HF `CLIPVisionModel` (`SiglipVisionModel` for the
siglip-* architectures, without its pooling head, which the attack does not read) with random
weights at a built-in architecture, the PRM loss (mean token cosine between adversarial and clean features, summed over
F_0..F_L, all tokens), its input gradient (weights are frozen, so autograd forms no weight
gradient, like prm), and the optimiser update. Modes:

  eager-fp32   eager, fp32, SDPA attention
  eager-bf16   eager, bf16 autocast, SDPA attention
  compile      torch.compile of the step (bf16 autocast, SDPA)
  paper        the paper loop the way the official code runs it: batch 1, fp32, native size,
               AdamW on delta, dynamic scale U[0.5, 1) redrawn every step (so shapes change
               every step), clean features recomputed at each step's scale
  gemm         only the bf16 GEMM ceiling (8192^3 by default)
  cpu-fp32     eager fp32 on the CPU (the reference engine's comparison: batch 1, one step by
               default); timed with the host clock, ceiling = an f32 1024^3 product on the CPU

Every mode prints one JSON object with the fields `prm bench --json` prints:
image_steps_per_s, images_per_s, tflops (analytic FLOP count, the same formula as prm), and
ceiling_tflops (a bf16 GEMM measured in this process), peak_memory_bytes (max allocated), plus what was run.

--kernels FILE (GPU modes) profiles one more whole attack after the timed ones and writes every
CUDA kernel, copy and fill of it to FILE as {"kernels": [{"name", "calls", "us"}, ...]}, the
input of tools/kernel_groups.py, which sets it beside prm's device timeline by kind of work.

Timing: CUDA events around whole attacks (clean forward + all steps, and the final images
copied to host memory) after warm-up attacks; the median of --repeats. Inputs are random, never
zeros. `prm bench` times the same: its attack ends when the adversarial images are in host
memory (what `prm attack` saves from). --deliver device leaves them on the GPU instead (this
script's definition before 2026-12-05 afternoon; every torch figure measured before then).

Example (on a GPU machine):
  python3 tools/torch_prm.py --mode eager-bf16 --arch vit-b-16 --image-size 224 \
      --batch-size 64 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ARCHS = {
    # name: (width, layers, heads, mlp, patch, image, projection)
    "tiny": (64, 2, 4, 256, 16, 64, 32),
    "vit-b-32": (768, 12, 12, 3072, 32, 224, 512),
    "vit-b-16": (768, 12, 12, 3072, 16, 224, 512),
    "vit-l-14": (1024, 24, 16, 4096, 14, 224, 768),
    "vit-l-14-336": (1024, 24, 16, 4096, 14, 336, 768),
    "vit-h-14": (1280, 32, 16, 5120, 14, 224, 1024),
    "siglip-b-16": (768, 12, 12, 3072, 16, 224, 0),
    "siglip-so400m-14-384": (1152, 27, 16, 4304, 14, 384, 0),
}
# open_clip's LAION ViT-H/14 uses the exact GELU (prm's random:vit-h-14 too); OpenAI's QuickGELU.
ACTIVATION = {"vit-h-14": "gelu"}
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def is_siglip(arch: str) -> bool:
    """SigLIP towers: no class token (an image's tokens are its patches), mean and std 0.5."""
    return arch.startswith("siglip")


def class_tokens(arch: str) -> int:
    return 0 if is_siglip(arch) else 1


def step_flops(arch: str, h: int, w: int) -> float:
    """FLOPs of one attack step on one image: forward plus input-gradient backward.

    The same formula as `prm bench` (src/bench/flops.rs): linear layers 2·T·(4D² + 2DM) forward
    and the same again for dX; attention 4·T²·D forward and 8·T²·D backward; the patch embedding
    forward 2·P·3p²·D and its dX the same. LayerNorm, activations and the loss are ignored.
    """
    d, layers, _, m, p, _, _ = ARCHS[arch]
    patches = (h // p) * (w // p)
    t = patches + class_tokens(arch)
    linear = 2.0 * t * (4 * d * d + 2 * d * m)
    attn_fwd = 4.0 * t * t * d
    attn_bwd = 8.0 * t * t * d
    embed = 2.0 * patches * 3 * p * p * d
    return layers * (2 * linear + attn_fwd + attn_bwd) + 2 * embed


def forward_flops(arch: str, h: int, w: int) -> float:
    """FLOPs of one forward pass (the clean features), as `prm bench` counts them."""
    d, layers, _, m, p, _, _ = ARCHS[arch]
    patches = (h // p) * (w // p)
    t = patches + class_tokens(arch)
    return layers * (2.0 * t * (4 * d * d + 2 * d * m) + 4.0 * t * t * d) + 2.0 * patches * 3 * p * p * d


def build_model(arch: str, dtype=torch.float32, device="cuda"):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    d, layers, heads, m, p, image, proj = ARCHS[arch]
    if is_siglip(arch):
        return build_siglip(arch, dtype, device)
    cfg = CLIPVisionConfig(
        hidden_size=d, intermediate_size=m, num_hidden_layers=layers, num_attention_heads=heads,
        patch_size=p, image_size=image, projection_dim=proj, hidden_act=ACTIVATION.get(arch, "quick_gelu"),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = CLIPVisionModel(cfg).to(device, dtype).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def build_siglip(arch: str, dtype, device):
    """SigLIP's vision tower without its attention-pooling head (the attack reads F_0..F_L)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    d, layers, heads, m, p, image, _ = ARCHS[arch]
    cfg = SiglipVisionConfig(
        hidden_size=d, intermediate_size=m, num_hidden_layers=layers, num_attention_heads=heads,
        patch_size=p, image_size=image, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        vision_use_head=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = SiglipVisionModel(cfg).to(device, dtype).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def normalise(x, siglip=False):
    mean = torch.tensor((0.5,) * 3 if siglip else MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor((0.5,) * 3 if siglip else STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def features(model, x, interpolate=False):
    siglip = model.config.model_type == "siglip_vision_model"
    out = model(pixel_values=normalise(x, siglip), output_hidden_states=True,
                interpolate_pos_encoding=interpolate)
    return out.hidden_states


def prm_loss(fa, fc):
    """Sum over layers of the mean token cosine (the value the attack minimises)."""
    total = 0.0
    for a, c in zip(fa, fc):
        total = total + F.cosine_similarity(a.float(), c.float(), dim=-1).mean()
    return total


def gemm_ceiling(n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2.0 * n ** 3 / statistics.median(times) / 1e12


def pgd_attack(model, clean, steps, eps, alpha, autocast, compiled_grad=None):
    """One whole PGD attack on a batch: clean features, random start, `steps` sign steps."""
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    with torch.no_grad(), ctx:
        fc = [f.detach() for f in features(model, clean)]
    x = (clean + torch.empty_like(clean).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        if compiled_grad is not None:
            g = compiled_grad(x, fc)
        else:
            xr = x.detach().requires_grad_(True)
            with ctx:
                loss = prm_loss(features(model, xr), fc)
            (g,) = torch.autograd.grad(loss, xr)
        x = torch.minimum(torch.maximum(x - alpha * g.sign(), clean - eps), clean + eps).clamp(0, 1)
    return x


def paper_attack(model, clean, steps, eps, lr, wd, scale=(0.5, 1.0)):
    """The official-style loop at batch 1: AdamW on delta, dynamic scale every step."""
    h, w = clean.shape[-2:]
    delta = torch.zeros_like(clean, requires_grad=True)
    opt = torch.optim.AdamW([delta], lr=lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        s = scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item()
        size = (max(int(h * s), 16), max(int(w * s), 16))
        with torch.no_grad():
            cs = F.interpolate(clean, size=size, mode="bicubic", align_corners=False)
            fc = [f.detach() for f in features(model, cs, interpolate=True)]
        adv = (clean + delta).clamp(0, 1)
        xs = F.interpolate(adv, size=size, mode="bicubic", align_corners=False)
        loss = prm_loss(features(model, xs, interpolate=True), fc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta.clamp_(-eps, eps)
    return (clean + delta.detach()).clamp(0, 1)


def time_attacks_cpu(run, warmup, repeats):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def cpu_ceiling(n: int = 1024) -> float:
    a = torch.rand(n, n)
    for _ in range(2):
        a @ a
    times = []
    for _ in range(6):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / statistics.median(times) / 1e12


def time_attacks(run, warmup, repeats):
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times), times


def write_kernel_table(run, path: str, mode: str) -> dict:
    """Profiles one whole attack (CUDA activity only) and writes its device operations, summed
    by name, to `path` (atomically). Returns what the JSON row reports of it."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    # The Chrome trace is the profiler's most stable form across versions: device kernels,
    # copies and fills are complete events of these categories.
    fd, trace_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(trace_path)
        with open(trace_path) as f:
            trace = json.load(f)
    finally:
        os.unlink(trace_path)
    return kernel_table_of(trace, path, mode)


def kernel_table_of(trace: dict, path: str, mode: str) -> dict:
    table: dict[str, list] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            row = table.setdefault(e["name"], [0, 0.0])
            row[0] += 1
            row[1] += float(e.get("dur", 0.0))
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])
    doc = {"engine": "torch", "mode": mode,
           "kernels": [{"name": n, "calls": c, "us": us} for n, (c, us) in rows]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return {"kernels_file": path, "kernels_device_ms": sum(us for _, (_, us) in rows) / 1e3,
            "kernels_launches": sum(c for _, (c, _) in rows)}


def parse_size(s: str):
    if "x" in s:
        w, h = s.lower().split("x")
        return int(h), int(w)
    return int(s), int(s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", required=True,
                    choices=["eager-fp32", "eager-bf16", "compile", "paper", "gemm", "cpu-fp32"])
    ap.add_argument("--arch", default="vit-b-16", choices=sorted(ARCHS))
    ap.add_argument("--image-size", default=None, help="N or WxH (default 224; paper: 640x480)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64; paper: 1")
    ap.add_argument("--steps", type=int, default=None, help="default 10; paper: 250")
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--step-size", type=float, default=2 / 255)
    ap.add_argument("--warmup", type=int, default=2, help="untimed whole attacks first")
    ap.add_argument("--repeats", type=int, default=5, help="timed whole attacks (median)")
    ap.add_argument("--deliver", choices=("host", "device"), default="host",
                    help="where a timed attack leaves its final images: copied to host memory "
                         "(the default, as prm bench), or on the GPU (GPU modes)")
    ap.add_argument("--kernels", metavar="FILE", default=None,
                    help="after timing, profile one more attack and write its kernels to FILE "
                         "(for tools/kernel_groups.py; GPU modes)")
    a = ap.parse_args(argv)
    if a.mode == "cpu-fp32":
        if a.kernels:
            raise SystemExit("--kernels profiles CUDA kernels: not with --mode cpu-fp32")
        return main_cpu(a)
    if not torch.cuda.is_available():
        raise SystemExit("torch_prm.py needs a CUDA device (or --mode cpu-fp32)")

    paper = a.mode == "paper"
    h, w = parse_size(a.image_size or ("640x480" if paper else "224"))
    batch = a.batch_size or (1 if paper else 64)
    steps = a.steps or (250 if paper else 10)
    ceiling = gemm_ceiling()
    res = {
        "engine": "torch", "mode": a.mode, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(), "arch": a.arch, "image_size": [h, w],
        "batch_size": batch, "steps": steps, "ceiling_tflops": ceiling,
    }
    if a.mode == "gemm":
        print(json.dumps(res))
        return

    model = build_model(a.arch)
    gen = torch.Generator(device="cuda").manual_seed(1)
    clean = torch.rand(batch, 3, h, w, device="cuda", generator=gen)
    if paper:
        run = lambda: paper_attack(model, clean, steps, a.eps, 0.5 / 255, 0.01)  # noqa: E731
        # Dynamic scale makes each step's size a draw: count at the scales over [0.5, 1) evenly;
        # each step also recomputes the clean features at its scale.
        scales = [0.5 + i / 100 for i in range(50)]
        per_step = sum(step_flops(a.arch, int(h * s), int(w * s))
                       + forward_flops(a.arch, int(h * s), int(w * s)) for s in scales) / 50
        flops_per_attack = batch * steps * per_step
    else:
        compiled = None
        if a.mode == "compile":
            def grad_fn(x, fc):
                xr = x.detach().requires_grad_(True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = prm_loss(features(model, xr), fc)
                (g,) = torch.autograd.grad(loss, xr)
                return g
            compiled = torch.compile(grad_fn)
        autocast = a.mode in ("eager-bf16", "compile")
        run = lambda: pgd_attack(model, clean, steps, a.eps, a.step_size, autocast, compiled)  # noqa: E731
        flops_per_attack = batch * (forward_flops(a.arch, h, w) + steps * step_flops(a.arch, h, w))

    if a.deliver == "host":
        attack = run
        run = lambda: attack().cpu()  # noqa: E731
    res["deliver"] = a.deliver
    t0 = time.time()
    median, times = time_attacks(run, a.warmup, a.repeats)
    res.update({
        "attack_seconds": median,
        "attack_seconds_all": times,
        "warmup_wall_s": time.time() - t0 - sum(times),
        "image_steps_per_s": batch * steps / median,
        "images_per_s": batch / median,
        "flops_per_attack": flops_per_attack,
        "tflops": flops_per_attack / median / 1e12,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
    })
    res["ceiling_fraction"] = res["tflops"] / ceiling
    if a.kernels:
        # After the timing, so the profiler's own cost is in no timed attack.
        res.update(write_kernel_table(run, a.kernels, a.mode))
    print(json.dumps(res))
    sys.stdout.flush()


def main_cpu(a):
    """The same PGD attack on the CPU in fp32 (batch 1 and 1 step by default)."""
    h, w = parse_size(a.image_size or "224")
    batch, steps = a.batch_size or 1, a.steps or 1
    ceiling = cpu_ceiling()
    model = build_model(a.arch, device="cpu")
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(batch, 3, h, w, generator=gen)
    run = lambda: pgd_attack(model, clean, steps, a.eps, a.step_size, False)  # noqa: E731
    median, times = time_attacks_cpu(run, a.warmup, a.repeats)
    flops = batch * (forward_flops(a.arch, h, w) + steps * step_flops(a.arch, h, w))
    print(json.dumps({
        "engine": "torch", "mode": "cpu-fp32", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "arch": a.arch, "image_size": [h, w],
        "batch_size": batch, "steps": steps, "ceiling_tflops": ceiling,
        "attack_seconds": median, "attack_seconds_all": times,
        "image_steps_per_s": batch * steps / median, "images_per_s": batch / median,
        "flops_per_attack": flops, "tflops": flops / median / 1e12,
        "ceiling_fraction": flops / median / 1e12 / ceiling, "peak_memory_bytes": None,
    }))


if __name__ == "__main__":
    main()
