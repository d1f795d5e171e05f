#!/usr/bin/env python3
"""Independent float64 checker for one attack step (transformers-based, CPU).

Loads a CLIP vision tower in float64 from an HF directory (transformers `from_pretrained`) or from
an OpenAI/open_clip-format state dict (`visual.*` names; .safetensors or a torch pickle), computes
the PRM loss (DESIGN.md section 2: native resolution, all layers F_0..F_L, all tokens including
CLS unless --tokens patch) at x = START with the clean features taken from CLEAN, its gradient
with respect to the [0,1] pixels of START, and one projected sign step

    x' = clip(x - step_size * sign(g), clean - eps, clean + eps), then clipped to [0, 1].

Prints a JSON object; `--out FILE.png` also writes x' rounded to 8 bits.

Example:
  tools/.venv/bin/python tools/golden/reference_step.py --model tests/golden/hf_tiny \
      --clean /tmp/clean.png --start /tmp/start.png --json --out /tmp/step.png
"""

from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clipref as R  # noqa: E402


def parse_value(s: str) -> float:
    """'8/255', '0.03' -> float (same syntax the prm CLI accepts)."""
    return float(Fraction(s.strip())) if "/" in s else float(s)


def parse_layers(s: str, n: int):
    if s == "all":
        return list(range(n))
    layers = [int(t) for t in s.split(",") if t.strip()]
    for l in layers:
        if not 0 <= l < n:
            raise SystemExit(f"layer {l} out of range 0..{n - 1}")
    return layers


def main(argv=None):
    ap = argparse.ArgumentParser(description="float64 PRM loss, input gradient and one PGD step")
    ap.add_argument("--model", required=True, help="HF directory, or OpenAI-format .safetensors/.pt")
    ap.add_argument("--clean", required=True, help="clean image (PNG, any size)")
    ap.add_argument("--start", required=True, help="current adversarial image x (PNG, same size)")
    ap.add_argument("--loss", default="prm", choices=["prm", "nrd", "dr", "dr-official", "embed"])
    ap.add_argument("--layers", default="all", help="'all' or a comma list, e.g. 0,2")
    ap.add_argument("--tokens", default="all", choices=["all", "patch"])
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--step-size", default="1/255")
    ap.add_argument("--act", default="quick_gelu", choices=["quick_gelu", "gelu"],
                    help="activation for OpenAI-format weights (HF dirs use config.json)")
    ap.add_argument("--out", help="write the stepped image here as an 8-bit PNG")
    ap.add_argument("--json", action="store_true", help="print JSON only (no summary line)")
    ap.add_argument("--grad-out", help="also save the float64 gradient as safetensors ('grad')")
    a = ap.parse_args(argv)

    torch.set_grad_enabled(True)
    eps, alpha = parse_value(a.eps), parse_value(a.step_size)
    model = R.load_model(a.model, act=a.act)
    clean = R.read_png(a.clean)
    x = R.read_png(a.start)
    if clean.shape != x.shape:
        raise SystemExit(f"size mismatch: clean {tuple(clean.shape)} vs start {tuple(x.shape)}")
    p = model.config.patch_size
    if clean.shape[1] < p or clean.shape[2] < p:
        raise SystemExit(f"image smaller than one patch ({p} px)")

    with torch.no_grad():
        fc, ec = R.features(model, clean, with_embed=True)
    layers = parse_layers(a.layers, len(fc))

    xr = x.clone().requires_grad_(True)
    fa, ea = R.features(model, xr, with_embed=True)
    if a.loss == "prm":
        loss = R.loss_prm(fa, fc, layers=layers, tokens=a.tokens)
    elif a.loss == "nrd":
        loss = R.loss_nrd(fa, fc, layers=layers)
    elif a.loss == "dr":
        loss = R.loss_dr(fa, layers=layers)
    elif a.loss == "dr-official":
        loss = -R.loss_dr(fa, layers=layers)
    else:
        loss = R.loss_embed(ea, ec)
    (g,) = torch.autograd.grad(loss, xr)
    s = torch.sign(g)
    x1 = torch.minimum(torch.maximum(x - alpha * s, clean - eps), clean + eps).clamp(0, 1)

    H, W = clean.shape[1:]
    res = {
        "model": a.model,
        "loss_name": a.loss,
        "loss": float(loss),
        "per_layer_cos": R.per_layer_cos([f.detach() for f in fa], fc),
        "layers": layers,
        "tokens": a.tokens,
        "size": [int(H), int(W)],
        "grid": [int(H) // p, int(W) // p],
        "grad_sign": {"pos": int((s > 0).sum()), "neg": int((s < 0).sum()),
                      "zero": int((s == 0).sum())},
        "grad_abs_sum": float(g.abs().sum()),
        "grad_abs_max": float(g.abs().max()),
        "eps": eps,
        "step_size": alpha,
        "linf_start": float((x - clean).abs().max()),
        "linf_step": float((x1 - clean).abs().max()),
    }
    if a.out:
        R.write_png(a.out, x1)
        x8 = R.read_png(a.out)
        res["out"] = a.out
        res["linf_out_8bit"] = float((x8 - clean).abs().max())
    if a.grad_out:
        from safetensors.torch import save_file
        save_file({"grad": g.contiguous(), "stepped": x1.contiguous()}, a.grad_out)
    print(R.dumps(res))
    if not a.json:
        print(f"loss {res['loss']:.12f}  sign +{res['grad_sign']['pos']} "
              f"-{res['grad_sign']['neg']} 0:{res['grad_sign']['zero']}", file=sys.stderr)


if __name__ == "__main__":
    main()
