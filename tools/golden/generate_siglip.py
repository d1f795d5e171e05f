#!/usr/bin/env python3
"""Golden-data generator for SigLIP towers: writes tests/golden/siglip_tiny/ from transformers in float64.

A tiny transformers `SiglipModel` with every parameter randomised from a fixed seed (the text
tower, the MAP head `vision_model.head.*` and the patch-conv bias included):
  vision D=128, 2 heads (head dim 64), 3 layers, MLP 344 (not 4·D, like so400m's 4304 for 1152),
  patch 8, image 32 (4x4 grid, 16 tokens, no class token), `gelu_pytorch_tanh`, LayerNorm eps
  1e-6, no pre-LayerNorm; mean = std = 0.5 (`preprocessor_config.json`, as google/siglip-* ship).

F_0 is the embedded tokens (patch conv + bias + interpolated position embedding, no LayerNorm),
F_l the output of encoder layer l: transformers' `hidden_states` with `output_hidden_states=True,
interpolate_pos_encoding=True`. The cases have the names and meaning of the CLIP ones
(tests/golden/README.md), with T = the number of patches; `prm_patch.*` is computed over every
token (a tower without a class token has only patch tokens). `{native,nonsquare}.embed` is
the image embedding, transformers' `pooler_output` (the MAP head `head.*` over the
post-LayerNorm tokens, no projection), and the `embed` case's loss is the cosine of those.

Reuses generate.py's helpers (images, f32 rounding, gradients) and clipref.py's losses.
Run from the repository root:  tools/.venv/bin/python tools/golden/generate_siglip.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clipref as R  # noqa: E402
import generate as G  # noqa: E402  (also sets deterministic algorithms and grad mode)

DIR = os.path.join(G.OUT, "siglip_tiny")
MEAN = STD = (0.5, 0.5, 0.5)
EPS = 1e-6
HEADS = 2
PATCH = 8
SEED_WEIGHTS = 4  # hf_tiny 1, openai_tiny 2, OpenAI text tensors 3
SEED_CASES = 40


def randomise(model: torch.nn.Module, seed: int) -> None:
    """generate.py's rules, plus what a SiglipModel has that a CLIPModel has not.

    LayerNorm weight 1 + 0.1 N; every bias 0.05 N (the patch conv's and the MAP head's
    `in_proj_bias` included); Linear / Conv weight and the MAP head's `in_proj_weight`
    N(0, 1/fan_in); position / token embeddings and the MAP head's `probe` 0.5 N.
    `logit_scale` / `logit_bias` are set to SigLIP's initial log(10) / −10 (unused here).
    """
    rng = np.random.default_rng(seed)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            mod_name, _, leaf = name.rpartition(".")
            mod = mods[mod_name]
            n = rng.standard_normal(tuple(p.shape))
            if name == "logit_scale":
                v = np.full(p.shape, math.log(10.0))
            elif name == "logit_bias":
                v = np.full(p.shape, -10.0)
            elif isinstance(mod, torch.nn.LayerNorm):
                v = 1.0 + 0.1 * n if leaf == "weight" else 0.05 * n
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)):
                if leaf.endswith("bias"):
                    v = 0.05 * n
                else:
                    assert leaf.endswith("weight"), name
                    v = n / np.sqrt(int(np.prod(p.shape[1:])))
            elif isinstance(mod, torch.nn.Embedding) or leaf == "probe":
                v = 0.5 * n
            else:
                raise ValueError(f"unhandled parameter {name}")
            p.copy_(torch.from_numpy(v).to(p.dtype))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

def normalise(x: torch.Tensor) -> torch.Tensor:
    return R.normalise(x, MEAN, STD)


def features(model, x: torch.Tensor, with_embed: bool = False):
    """F_0..F_L ([T, D] each, no class token) of one planar image x [3,H,W] in [0,1], and with
    `with_embed` the image embedding [D] (`pooler_output`)."""
    out = model(pixel_values=normalise(x).unsqueeze(0), output_hidden_states=True,
                interpolate_pos_encoding=True)
    fs = [h[0] for h in out.hidden_states]
    return (fs, out.pooler_output[0]) if with_embed else fs


def embed(model, x: torch.Tensor) -> torch.Tensor:
    """The image embedding [D] of one planar image (`pooler_output`)."""
    return model(pixel_values=normalise(x).unsqueeze(0),
                 interpolate_pos_encoding=True).pooler_output[0]


def interp_pos_embed(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """[g*g, D] -> [gh*gw, D]: bicubic, align_corners=False, by size, no antialias (no CLS row)."""
    g = int(round(math.sqrt(pos.shape[0])))
    assert g * g == pos.shape[0]
    if gh == g and gw == g:
        return pos
    d = pos.shape[1]
    t = pos.reshape(1, g, g, d).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(gh, gw), mode="bicubic", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(gh * gw, d)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def manual_features(sd: dict, x: torch.Tensor, heads: int = HEADS, eps: float = EPS,
                    act=gelu_tanh):
    """Independent forward from the file's `vision_model.*` tensors with plain torch ops."""
    g = lambda k: sd["vision_model." + k].to(torch.float64)  # noqa: E731
    conv = g("embeddings.patch_embedding.weight")
    dmodel, _, p, _ = conv.shape
    z = normalise(x)
    H, W = z.shape[1] // p, z.shape[2] // p
    z = z[:, :H * p, :W * p]
    cols = z.reshape(3, H, p, W, p).permute(1, 3, 0, 2, 4).reshape(H * W, 3 * p * p)
    h = cols @ conv.reshape(dmodel, -1).t() + g("embeddings.patch_embedding.bias")
    h = h + interp_pos_embed(g("embeddings.position_embedding.weight"), H, W)
    feats = [h]
    T, hd = h.shape[0], dmodel // heads
    i = 0
    while f"vision_model.encoder.layers.{i}.layer_norm1.weight" in sd:
        b = f"encoder.layers.{i}."
        ln = lambda t, n: F.layer_norm(t, (dmodel,), g(b + n + ".weight"), g(b + n + ".bias"), eps)  # noqa
        lin = lambda t, n: t @ g(b + n + ".weight").t() + g(b + n + ".bias")  # noqa: E731
        a = ln(h, "layer_norm1")
        q, k, v = (lin(a, f"self_attn.{n}_proj").reshape(T, heads, hd).transpose(0, 1) for n in "qkv")
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1)
        h = h + lin((att @ v).transpose(0, 1).reshape(T, dmodel), "self_attn.out_proj")
        h = h + lin(act(lin(ln(h, "layer_norm2"), "mlp.fc1")), "mlp.fc2")
        feats.append(h)
        i += 1
    return feats


def manual_pool(sd: dict, f_last: torch.Tensor, heads: int = HEADS, eps: float = EPS,
                act=gelu_tanh) -> torch.Tensor:
    """Independent image embedding [D] from F_L [T, D] and the file's tensors with plain torch
    ops: post-LayerNorm, then torch.nn.MultiheadAttention's arithmetic with the probe as the one
    query (keys and values formed, unlike prm's folded form), then `a + MLP(LN(a))`."""
    g = lambda k: sd["vision_model." + k].to(torch.float64)  # noqa: E731
    D = f_last.shape[1]
    hd = D // heads
    y = F.layer_norm(f_last, (D,), g("post_layernorm.weight"), g("post_layernorm.bias"), eps)
    w, b = g("head.attention.in_proj_weight"), g("head.attention.in_proj_bias")
    q = g("head.probe").reshape(1, D) @ w[:D].t() + b[:D]
    k = y @ w[D:2 * D].t() + b[D:2 * D]
    v = y @ w[2 * D:].t() + b[2 * D:]
    q, k, v = (t.reshape(-1, heads, hd).transpose(0, 1) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1)
    a = ((att @ v).transpose(0, 1).reshape(1, D) @ g("head.attention.out_proj.weight").t()
         + g("head.attention.out_proj.bias"))
    n = F.layer_norm(a, (D,), g("head.layernorm.weight"), g("head.layernorm.bias"), eps)
    h = act(n @ g("head.mlp.fc1.weight").t() + g("head.mlp.fc1.bias"))
    return (a + h @ g("head.mlp.fc2.weight").t() + g("head.mlp.fc2.bias"))[0]


def rel(a: list, b: list) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# Model and cases
# ----------------------------------------------------------------------------------------------

def build(check):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel
    from transformers.utils import logging
    logging.set_verbosity_error()  # the vision-only load reports the text tensors it skips
    os.makedirs(DIR, exist_ok=True)
    cfg = SiglipConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, vocab_size=64, max_position_embeddings=16,
                         hidden_act="gelu_pytorch_tanh", layer_norm_eps=EPS, projection_size=128,
                         pad_token_id=1, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                           num_attention_heads=HEADS, patch_size=PATCH, image_size=32,
                           hidden_act="gelu_pytorch_tanh", layer_norm_eps=EPS),
    )
    model = SiglipModel(cfg).float()
    randomise(model, seed=SEED_WEIGHTS)
    model.save_pretrained(DIR, safe_serialization=True)
    with open(os.path.join(DIR, "preprocessor_config.json"), "w") as f:
        # what google/siglip-base-patch16-224 ships, at this model's size
        json.dump({"do_normalize": True, "do_rescale": True, "do_resize": True,
                   "image_mean": list(MEAN), "image_processor_type": "SiglipImageProcessor",
                   "image_std": list(STD), "processor_class": "SiglipProcessor", "resample": 3,
                   "rescale_factor": 1 / 255, "size": {"height": 32, "width": 32}},
                  f, indent=2, sort_keys=True)
        f.write("\n")
    sd = load_file(os.path.join(DIR, "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert not any(k.startswith("vision_model.embeddings.class") or "pre_layrnorm" in k for k in sd)
    # the golden model is whatever was written, reloaded as a vision tower and upcast
    vm = SiglipVisionModel.from_pretrained(DIR, attn_implementation="sdpa").double().eval()
    assert vm.config._attn_implementation == "sdpa"
    assert vm.config.hidden_act == "gelu_pytorch_tanh" and vm.config.layer_norm_eps == EPS
    vsd = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    mine = {k: v for k, v in vm.state_dict().items() if not k.endswith("position_ids")}
    assert len(mine) == len(vsd), (len(mine), len(vsd))
    for k, v in mine.items():
        assert torch.equal(v, vsd["vision_model." + k].double()), k
    check.append(("reload: every vision tensor of the file in SiglipVisionModel", 0.0))
    return vm, vsd


def cases_for(vm, sd, check):
    rng = np.random.default_rng(SEED_CASES)
    L = vm.config.num_hidden_layers
    cases = {}

    def feats(x):
        return features(vm, x)

    # native
    x = G.image(rng, 32, 32)
    with torch.no_grad():
        fs, es = features(vm, x, with_embed=True)
        err = rel(manual_features(sd, x), fs)
        err_e = rel([manual_pool(sd, fs[-1])], [es])
    check.append(("manual forward vs transformers native", err))
    check.append(("manual MAP head vs transformers pooler_output native", err_e))
    assert err < 1e-12 and err_e < 1e-12, (err, err_e)
    assert fs[0].shape == (16, 128) and len(fs) == L + 1 and es.shape == (128,)
    cases["native.pixels"] = x
    for l, f in enumerate(fs):
        cases[f"native.F{l}"] = f
    cases["native.embed"] = es

    # how far the features are from those of a tower with exact GELU, or LayerNorm eps 1e-5:
    # what a loader that took CLIP's defaults would compute (informative, no assertion on eps)
    with torch.no_grad():
        d_act = rel(manual_features(sd, x, act=F.gelu), fs)
        d_eps = rel(manual_features(sd, x, eps=1e-5), fs)
    check.append(("(info) features with exact GELU instead of tanh, rel diff", d_act))
    check.append(("(info) features with LN eps 1e-5 instead of 1e-6, rel diff", d_eps))
    assert d_act > 1e-4, d_act

    # non-square, sides not multiples of the patch
    H, W = 43, 61
    gh, gw = H // PATCH, W // PATCH
    clean = G.image(rng, H, W)
    with torch.no_grad():
        fc, ec = features(vm, clean, with_embed=True)
        err = rel(manual_features(sd, clean), fc)
        err_e = rel([manual_pool(sd, fc[-1])], [ec])
    check.append(("manual forward vs transformers nonsquare", err))
    check.append(("manual MAP head vs transformers pooler_output nonsquare", err_e))
    assert err < 1e-12 and err_e < 1e-12, (err, err_e)
    assert fc[0].shape[0] == gh * gw
    cases["nonsquare.pixels"] = clean
    for l, f in enumerate(fc):
        cases[f"nonsquare.F{l}"] = f
    cases["nonsquare.embed"] = ec
    with torch.no_grad():
        pos = vm.embeddings.interpolate_pos_encoding(
            torch.zeros(1, gh * gw, vm.config.hidden_size, dtype=torch.float64), H, W)[0]
    own = interp_pos_embed(sd["vision_model.embeddings.position_embedding.weight"].double(), gh, gw)
    check.append(("pos-embed: transformers vs own interpolate(size=)", float((pos - own).abs().max())))
    assert torch.equal(pos, own)
    cases["nonsquare.pos_embed"] = pos

    # losses at a perturbed point; clean = the non-square image
    noise = rng.uniform(-8 / 255, 8 / 255, size=clean.shape)
    adv = G.f32(np.clip(clean.numpy() + noise, 0, 1))
    cases["prm.clean"] = clean
    cases["prm.adv"] = adv

    def add(name, fn):
        G.add_loss_case(cases, check, rng, name, fn, adv, (gh, gw), PATCH)

    add("prm", lambda a: R.loss_prm(feats(a), fc))
    # no class token: the patch tokens are every token (R.loss_prm(tokens="patch") would drop row 0)
    add("prm_patch", lambda a: R.loss_prm(feats(a), fc))
    assert torch.equal(cases["prm_patch.grad"], cases["prm.grad"])
    assert torch.equal(cases["prm_patch.loss"], cases["prm.loss"])
    add("prm_layers", lambda a: R.loss_prm(feats(a), fc, layers=[0, 2]))
    cases["prm_layers.layers"] = torch.tensor([0, 2], dtype=torch.int64)
    add("nrd", lambda a: R.loss_nrd(feats(a), fc))
    add("dr", lambda a: R.loss_dr(feats(a)))

    sh, sw = int(np.floor(0.73 * H)), int(np.floor(0.73 * W))
    with torch.no_grad():
        fcs = feats(R.resize(clean, sh, sw))
    assert fcs[0].shape[0] == (sh // PATCH) * (sw // PATCH)
    cases["prm_scaled.size"] = torch.tensor([sh, sw], dtype=torch.int64)
    add("prm_scaled", lambda a: R.loss_prm(feats(R.resize(a, sh, sw)), fcs))
    # last, so that the cases above draw what they drew before it existed
    add("embed", lambda a: R.loss_embed(embed(vm, a), ec))

    with torch.no_grad():
        at_clean = float(R.loss_prm(fc, fc))
    check.append(("prm at adv==clean minus (L+1)", abs(at_clean - (L + 1))))
    return cases


def write_cases(path, cases):
    out = {}
    for k, v in cases.items():
        if v.dtype == torch.float64 and not k.endswith(".loss"):
            v = v.to(torch.float32)
        out[k] = v.contiguous()
    tag = (f"tools/golden/generate_siglip.py torch={torch.__version__} "
           f"transformers={__import__('transformers').__version__}")
    save_file(out, path, metadata={"generator": tag})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    check = []
    vm, sd = build(check)
    cases = cases_for(vm, sd, check)
    write_cases(os.path.join(DIR, "cases.safetensors"), cases)
    for name, v in check:
        print(f"  {v:10.3e}  {name}")
    for k in ("prm", "prm_layers", "nrd", "dr", "prm_scaled", "embed"):
        print(f"  {k}.loss = {float(cases[k + '.loss']):.8f}")
    print("wrote", DIR)


if __name__ == "__main__":
    main()
