#!/usr/bin/env python3
"""Golden-data generator: writes tests/golden/{hf_tiny,openai_tiny}/ from transformers in float64.

Two tiny CLIP models with every parameter randomised from fixed seeds:
  hf_tiny      transformers CLIPModel (vision + tiny text tower), exact GELU, F32 safetensors
               written by save_pretrained; vision D=128, 2 heads, 3 layers, MLP 512, patch 8,
               image 32 (4x4 grid, 17 tokens), projection 64.
  openai_tiny  OpenAI/open_clip-format state dict in F16 (+ a few text-tower tensors the loader
               must skip); D=128, 2 heads, 2 layers, MLP 512, patch 16, image 48 (3x3, 10 tokens),
               embed 32, QuickGELU. Built as an HF CLIPVisionModelWithProjection, then renamed.

All reference math is float64 on the float32/float16-rounded weights and on float32-rounded
inputs, so the Rust side sees exactly the numbers the references were computed from.
Every result is cross-checked against an independent hand-written forward (clipref.manual_features)
and, for openai_tiny, against open_clip's VisionTransformer when open_clip is installed.

Run from the repository root:  tools/.venv/bin/python tools/golden/generate.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clipref as R  # noqa: E402

torch.set_grad_enabled(True)
torch.use_deterministic_algorithms(True)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "golden")


# ----------------------------------------------------------------------------------------------
# Deterministic randomisation
# ----------------------------------------------------------------------------------------------

def randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial random values from numpy's PCG64 (stable streams).

    LayerNorm weight 1 + 0.1 N, every bias 0.05 N, Linear/Conv weight N(0, 1/fan_in),
    class / position / token embeddings 0.5 N, logit_scale left alone.
    """
    rng = np.random.default_rng(seed)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            mod_name, _, leaf = name.rpartition(".")
            mod = mods[mod_name]
            n = rng.standard_normal(tuple(p.shape))
            if name.endswith("logit_scale"):
                continue
            if isinstance(mod, torch.nn.LayerNorm):
                v = 1.0 + 0.1 * n if leaf == "weight" else 0.05 * n
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                if leaf == "bias":
                    v = 0.05 * n
                else:
                    fan_in = int(np.prod(p.shape[1:]))
                    v = n / np.sqrt(fan_in)
            elif isinstance(mod, torch.nn.Embedding) or leaf == "class_embedding":
                v = 0.5 * n
            else:
                raise ValueError(f"unhandled parameter {name}")
            p.copy_(torch.from_numpy(v).to(p.dtype))


def f32(x: np.ndarray) -> torch.Tensor:
    """float64 array rounded to float32, returned as float64 tensor (the exact stored value)."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32).astype(np.float64))


def image(rng, h, w) -> torch.Tensor:
    """A smooth-plus-noise image quantised to k/255 (so it can also be written as PNG exactly)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([0.5 + 0.3 * np.sin(6 * xx + c + 3 * yy) for c in range(3)])
    x = np.clip(base + 0.25 * rng.standard_normal((3, h, w)), 0, 1)
    return f32(np.round(x * 255) / 255)


def grad_of(fn, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g.detach()


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

def add_loss_case(cases, check, rng, name, fn, adv, grid, patch):
    """`{name}.loss` (F64) and `{name}.grad` of the loss `fn` at `adv`, checked against a central
    finite difference along a random direction drawn from `rng`. At native resolution (every
    case but `prm_scaled`) the remainder pixels beyond the `grid` of patches get no gradient."""
    gh, gw = grid
    loss, g = grad_of(fn, adv)
    cases[f"{name}.loss"] = loss.reshape(1)  # F64
    cases[f"{name}.grad"] = g
    if name != "prm_scaled":
        assert g[:, gh * patch:, :].abs().max() == 0 and g[:, :, gw * patch:].abs().max() == 0
    d = torch.from_numpy(rng.standard_normal(adv.shape))
    d[:, gh * patch:, :] = 0
    d[:, :, gw * patch:] = 0
    h = 1e-6
    with torch.no_grad():
        fd = (fn(adv + h * d) - fn(adv - h * d)) / (2 * h)
    an = float((g * d).sum())
    check.append((f"{name}: finite difference rel err", abs(float(fd) - an) / abs(an)))
    assert abs(float(fd) - an) <= 1e-6 * abs(an) + 1e-9, (name, float(fd), an)


def model_cases(model, sd_hf, heads, act, rng, native, nonsq, patch, cases, check):
    """Fill `cases` for one model. `model` is a float64 transformers vision tower."""
    L = model.config.num_hidden_layers

    def feats(x):
        return R.features(model, x)

    def cross(x, fs, emb=None, tag=""):
        mf, me = R.manual_features(sd_hf, x, heads, act)
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(fs, mf))
        if emb is not None:
            err = max(err, float((emb - me).abs().max() / me.abs().max()))
        check.append((f"manual forward vs transformers {tag}", err))
        assert err < 1e-12, (tag, err)

    # native
    x = image(rng, native, native)
    with torch.no_grad():
        fs, emb = R.features(model, x, with_embed=True)
    cross(x, fs, emb, "native")
    cases["native.pixels"] = x
    for l, f in enumerate(fs):
        cases[f"native.F{l}"] = f
    cases["native.embed"] = emb

    # non-square, sides not multiples of the patch
    H, W = nonsq
    gh, gw = H // patch, W // patch
    clean = image(rng, H, W)
    with torch.no_grad():
        fc, ec = R.features(model, clean, with_embed=True)
    assert fc[0].shape[0] == 1 + gh * gw
    cross(clean, fc, ec, "nonsquare")
    cases["nonsquare.pixels"] = clean
    for l, f in enumerate(fc):
        cases[f"nonsquare.F{l}"] = f
    pos = model.vision_model.embeddings.interpolate_pos_encoding(
        torch.zeros(1, 1 + gh * gw, model.config.hidden_size, dtype=torch.float64), H, W)[0]
    mine = R.interp_pos_embed(sd_hf["vision_model.embeddings.position_embedding.weight"].double(),
                              gh, gw)
    check.append(("pos-embed: transformers vs own interpolate(size=)",
                  float((pos - mine).abs().max())))
    assert torch.equal(pos, mine)
    cases["nonsquare.pos_embed"] = pos

    # losses at a perturbed point; clean = the non-square image
    noise = rng.uniform(-8 / 255, 8 / 255, size=clean.shape)
    adv = f32(np.clip(clean.numpy() + noise, 0, 1))
    cases["prm.clean"] = clean
    cases["prm.adv"] = adv

    def add(name, fn):
        add_loss_case(cases, check, rng, name, fn, adv, (gh, gw), patch)

    add("prm", lambda a: R.loss_prm(feats(a), fc))
    add("prm_patch", lambda a: R.loss_prm(feats(a), fc, tokens="patch"))
    add("prm_layers", lambda a: R.loss_prm(feats(a), fc, layers=[0, 2]))
    cases["prm_layers.layers"] = torch.tensor([0, 2], dtype=torch.int64)
    add("nrd", lambda a: R.loss_nrd(feats(a), fc))
    add("dr", lambda a: R.loss_dr(feats(a)))

    def embed_loss(a):
        return R.loss_embed(R.features(model, a, with_embed=True)[1], ec)
    add("embed", embed_loss)

    # dynamic scale: both images resized to floor(0.73 H), floor(0.73 W)
    sh, sw = int(np.floor(0.73 * H)), int(np.floor(0.73 * W))
    with torch.no_grad():
        fcs = feats(R.resize(clean, sh, sw))
    cases["prm_scaled.size"] = torch.tensor([sh, sw], dtype=torch.int64)
    add("prm_scaled", lambda a: R.loss_prm(feats(R.resize(a, sh, sw)), fcs))

    # sanity: the PRM loss at adv == clean is exactly L+1 and its gradient ~ 0
    with torch.no_grad():
        at_clean = float(R.loss_prm(fc, fc))
    check.append(("prm at adv==clean minus (L+1)", abs(at_clean - (L + 1))))


def resize_cases(rng, cases):
    for name, (h, w), (oh, ow) in [("resize_a", (13, 17), (9, 23)), ("resize_b", (43, 61), (30, 41))]:
        x = f32(rng.uniform(-0.5, 1.5, size=(3, h, w)))
        go = f32(rng.standard_normal((3, oh, ow)))
        xr = x.clone().requires_grad_(True)
        y = R.resize(xr, oh, ow)
        (gi,) = torch.autograd.grad((y * go).sum(), xr)
        cases[f"{name}.input"] = x
        cases[f"{name}.size"] = torch.tensor([oh, ow], dtype=torch.int64)
        cases[f"{name}.output"] = y.detach()
        cases[f"{name}.grad_out"] = go
        cases[f"{name}.grad_in"] = gi


def write_cases(path, cases):
    out = {}
    for k, v in cases.items():
        if v.dtype == torch.float64 and not k.endswith(".loss"):
            v = v.to(torch.float32)
        out[k] = v.contiguous()
    # a single metadata key: safetensors writes a multi-key map in random order (not reproducible)
    tag = (f"tools/golden/generate.py torch={torch.__version__} "
           f"transformers={__import__('transformers').__version__}")
    save_file(out, path, metadata={"generator": tag})


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def build_hf_tiny(check):
    from transformers import CLIPConfig, CLIPModel
    d = os.path.join(OUT, "hf_tiny")
    os.makedirs(d, exist_ok=True)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, vocab_size=64, max_position_embeddings=16,
                         hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=64),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                           num_attention_heads=2, patch_size=8, image_size=32,
                           hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=64),
        projection_dim=64,
    )
    model = CLIPModel(cfg).float()
    randomise(model, seed=1)
    model.save_pretrained(d, safe_serialization=True)
    # the golden model is whatever was written, reloaded and upcast
    sd = load_file(os.path.join(d, "model.safetensors"))
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    vm = R.model_from_hf_dir(d)
    sd_hf = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    # reload check: every vision weight identical to the file
    for k, v in vm.state_dict().items():
        if k in sd_hf:
            assert torch.equal(v, sd_hf[k].double()), k
    return vm, sd_hf


def build_openai_tiny(check):
    d = os.path.join(OUT, "openai_tiny")
    os.makedirs(d, exist_ok=True)
    cfg = R.hf_vision_config(128, 2, 2, 512, 16, 48, 32, "quick_gelu")
    m = R._vision_with_projection(cfg).float()
    randomise(m, seed=2)
    sd_hf = {k: v.to(torch.float16) for k, v in m.state_dict().items()
             if not k.endswith("position_ids")}
    sd_oa = R.hf_vision_to_openai(sd_hf, 2)
    # a few text-tower tensors (random, F16) that the loader must skip
    rng = np.random.default_rng(3)
    t = lambda *s: torch.from_numpy(0.1 * rng.standard_normal(s)).to(torch.float16)  # noqa: E731
    sd_oa.update({
        "token_embedding.weight": t(64, 64),
        "positional_embedding": t(16, 64),
        "transformer.resblocks.0.ln_1.weight": t(64),
        "transformer.resblocks.0.ln_1.bias": t(64),
        "ln_final.weight": t(64),
        "ln_final.bias": t(64),
        "text_projection": t(64, 32),
        "logit_scale": torch.tensor(np.log(1 / 0.07), dtype=torch.float16),
    })
    path = os.path.join(d, "model.safetensors")
    save_file({k: v.contiguous() for k, v in sorted(sd_oa.items())}, path)
    # the golden model is rebuilt from the file through the OpenAI -> HF mapping
    vm = R.load_model(path, act="quick_gelu")
    hf_back, dims = R.openai_to_hf_vision(load_file(path))
    assert dims == dict(width=128, patch=16, grid=3, layers=2, mlp=512, embed=32, heads=2,
                        image=48), dims
    for k, v in sd_hf.items():
        assert torch.equal(hf_back[k], v), k
    return vm, {k: v.double() for k, v in sd_hf.items()}, load_file(path)


def open_clip_check(sd_oa, x, fs, emb, check):
    """Independent validation of the OpenAI-format state dict with open_clip's VisionTransformer."""
    try:
        from open_clip.transformer import QuickGELU, VisionTransformer
    except Exception as e:  # pragma: no cover
        check.append(("open_clip unavailable: " + repr(e), float("nan")))
        return
    vt = VisionTransformer(image_size=48, patch_size=16, width=128, layers=2, heads=2,
                           mlp_ratio=4.0, output_dim=32, act_layer=QuickGELU)
    vsd = {k[len("visual."):]: v.double() for k, v in sd_oa.items() if k.startswith("visual.")}
    vt = vt.double().eval()
    missing, unexpected = vt.load_state_dict(vsd, strict=True)
    grabbed = []
    vt.ln_pre.register_forward_hook(lambda m, i, o: grabbed.append(o))
    for blk in vt.transformer.resblocks:
        blk.register_forward_hook(lambda m, i, o: grabbed.append(o))
    with torch.no_grad():
        e = vt(R.normalise(x).unsqueeze(0))
    err = max(float((a[0] - b).abs().max()) for a, b in zip(grabbed, fs))
    err = max(err, float((e[0] - emb).abs().max()))
    check.append(("open_clip VisionTransformer vs transformers (openai_tiny native)", err))
    assert err < 1e-10, err


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    check = []

    vm, sd_hf = build_hf_tiny(check)
    cases = {}
    model_cases(vm, sd_hf, 2, "gelu", np.random.default_rng(10), 32, (43, 61), 8, cases, check)
    resize_cases(np.random.default_rng(11), cases)
    write_cases(os.path.join(OUT, "hf_tiny", "cases.safetensors"), cases)

    vm, sd_hf, sd_oa = build_openai_tiny(check)
    cases = {}
    model_cases(vm, sd_hf, 2, "quick_gelu", np.random.default_rng(20), 48, (55, 70), 16, cases,
                check)
    open_clip_check(sd_oa, cases["native.pixels"],
                    [cases[f"native.F{l}"] for l in range(3)], cases["native.embed"], check)
    write_cases(os.path.join(OUT, "openai_tiny", "cases.safetensors"), cases)

    for name, v in check:
        print(f"  {v:10.3e}  {name}")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
