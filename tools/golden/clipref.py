"""Shared float64 reference math for the golden-data generator and reference_step.py.

What lives here:
  * building a transformers CLIP vision tower from an HF directory or an OpenAI/open_clip
    state dict (name mapping in both directions, see shared/CLIP-FORMATS.md);
  * the residual-stream features F_0..F_L (F_0 = pre_layrnorm output, F_l = block l output),
    computed through transformers with `output_hidden_states=True` and
    `interpolate_pos_encoding=True` so that non-square / non-native sizes work;
  * an independent hand-written forward (plain torch ops, no transformers) used to cross-check;
  * the attack losses of DESIGN.md section 2 (prm, nrd, dr, embed) and torch's bicubic resize.

Everything is meant to run in float64 on the CPU. Images are planar [3, H, W] in [0, 1];
normalisation (x - mean) / std happens inside `features`.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# Name mapping HF <-> OpenAI (vision tower only)
# ----------------------------------------------------------------------------------------------

_HF_BLOCK = "vision_model.encoder.layers.{i}."
_OA_BLOCK = "visual.transformer.resblocks.{i}."
_BLOCK_PAIRS = [
    ("layer_norm1.weight", "ln_1.weight"),
    ("layer_norm1.bias", "ln_1.bias"),
    ("self_attn.out_proj.weight", "attn.out_proj.weight"),
    ("self_attn.out_proj.bias", "attn.out_proj.bias"),
    ("layer_norm2.weight", "ln_2.weight"),
    ("layer_norm2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"),
    ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"),
    ("mlp.fc2.bias", "mlp.c_proj.bias"),
]
_TOP_PAIRS = [
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
    ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
    ("vision_model.post_layernorm.weight", "visual.ln_post.weight"),
    ("vision_model.post_layernorm.bias", "visual.ln_post.bias"),
]


def hf_vision_to_openai(sd: dict, num_layers: int) -> dict:
    """HF CLIPVisionModelWithProjection state dict -> OpenAI `visual.*` names."""
    out = {}
    for hf, oa in _TOP_PAIRS:
        out[oa] = sd[hf]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    for i in range(num_layers):
        h, o = _HF_BLOCK.format(i=i), _OA_BLOCK.format(i=i)
        for a, b in _BLOCK_PAIRS:
            out[o + b] = sd[h + a]
        out[o + "attn.in_proj_weight"] = torch.cat(
            [sd[h + f"self_attn.{n}_proj.weight"] for n in "qkv"], 0).contiguous()
        out[o + "attn.in_proj_bias"] = torch.cat(
            [sd[h + f"self_attn.{n}_proj.bias"] for n in "qkv"], 0).contiguous()
    return out


def openai_to_hf_vision(sd: dict) -> tuple[dict, dict]:
    """OpenAI/open_clip state dict -> (HF vision state dict, inferred dims)."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    conv = sd["visual.conv1.weight"]
    width, _, patch, _ = conv.shape
    pos = sd["visual.positional_embedding"]
    grid = int(round(math.sqrt(pos.shape[0] - 1)))
    assert grid * grid + 1 == pos.shape[0], "position table is not g*g+1 rows"
    layers = 1 + max(int(m.group(1)) for k in sd
                     for m in [re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k)] if m)
    mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    embed = sd["visual.proj"].shape[1]
    out = {}
    for hf, oa in _TOP_PAIRS:
        out[hf] = sd[oa]
    out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    for i in range(layers):
        h, o = _HF_BLOCK.format(i=i), _OA_BLOCK.format(i=i)
        for a, b in _BLOCK_PAIRS:
            out[h + a] = sd[o + b]
        w = sd[o + "attn.in_proj_weight"]
        b = sd[o + "attn.in_proj_bias"]
        for j, n in enumerate("qkv"):
            out[h + f"self_attn.{n}_proj.weight"] = w[j * width:(j + 1) * width].contiguous()
            out[h + f"self_attn.{n}_proj.bias"] = b[j * width:(j + 1) * width].contiguous()
    dims = dict(width=width, patch=patch, grid=grid, layers=layers, mlp=mlp, embed=embed,
                heads=width // 64, image=grid * patch)
    return out, dims


def hf_vision_config(width, heads, layers, mlp, patch, image, embed, act, eps=1e-5):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers,
                            intermediate_size=mlp, patch_size=patch, image_size=image,
                            projection_dim=embed, hidden_act=act, layer_norm_eps=eps)


def _vision_with_projection(config):
    from transformers import CLIPVisionModelWithProjection
    try:
        model = CLIPVisionModelWithProjection._from_config(config, attn_implementation="sdpa")
    except Exception:  # older/newer signatures
        model = CLIPVisionModelWithProjection(config)
    return model


def model_from_openai_state_dict(sd: dict, act: str = "quick_gelu"):
    """Build a float64 transformers CLIPVisionModelWithProjection from OpenAI-format weights."""
    hf_sd, d = openai_to_hf_vision(sd)
    cfg = hf_vision_config(d["width"], d["heads"], d["layers"], d["mlp"], d["patch"], d["image"],
                           d["embed"], act)
    model = _vision_with_projection(cfg).double().eval()
    hf_sd = {k: v.to(torch.float64) for k, v in hf_sd.items()}
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def model_from_hf_dir(path: str):
    """Float64 CLIPVisionModelWithProjection from an HF directory (CLIPModel or vision-only)."""
    from transformers import CLIPVisionModelWithProjection
    model = CLIPVisionModelWithProjection.from_pretrained(path, attn_implementation="sdpa")
    return model.double().eval()


def load_model(path: str, act: str = "quick_gelu"):
    """HF directory -> transformers; a .safetensors / .pt file with `visual.*` names -> OpenAI."""
    if os.path.isdir(path):
        return model_from_hf_dir(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return model_from_openai_state_dict(sd, act=act)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

def normalise(x: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


def features(model, x: torch.Tensor, with_embed: bool = False):
    """Residual-stream features F_0..F_L of one planar image x [3,H,W] in [0,1].

    Returns a list of [T, D] tensors (and the image embedding [E] when with_embed).
    """
    pv = normalise(x).unsqueeze(0)
    out = model(pixel_values=pv, output_hidden_states=True, interpolate_pos_encoding=True)
    feats = [h[0] for h in out.hidden_states]
    if with_embed:
        return feats, out.image_embeds[0]
    return feats


def interp_pos_embed(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Position table [1+g*g, D] -> [1+gh*gw, D]: CLS row kept, patch part bicubic
    (align_corners=False, no antialias) from g x g to (gh, gw)."""
    g = int(round(math.sqrt(pos.shape[0] - 1)))
    if gh == g and gw == g:
        return pos
    d = pos.shape[1]
    patch = pos[1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(gh * gw, d)
    return torch.cat([pos[:1], patch], 0)


def manual_features(sd: dict, x: torch.Tensor, heads: int, act: str, eps: float = 1e-5):
    """Independent forward from an HF-named vision state dict with plain torch ops."""
    g = lambda k: sd[k].to(torch.float64)  # noqa: E731
    conv = g("vision_model.embeddings.patch_embedding.weight")
    dmodel, _, p, _ = conv.shape
    z = normalise(x)
    H, W = z.shape[1] // p, z.shape[2] // p
    z = z[:, :H * p, :W * p]
    # im2col: patch vector flattened as (channel, row, column); tokens row-major over the grid
    cols = z.reshape(3, H, p, W, p).permute(1, 3, 0, 2, 4).reshape(H * W, 3 * p * p)
    tok = cols @ conv.reshape(dmodel, -1).t()
    h = torch.cat([g("vision_model.embeddings.class_embedding")[None], tok], 0)
    h = h + interp_pos_embed(g("vision_model.embeddings.position_embedding.weight"), H, W)
    ln = lambda t, pre: F.layer_norm(t, (dmodel,), g(pre + ".weight"), g(pre + ".bias"), eps)  # noqa
    h = ln(h, "vision_model.pre_layrnorm")
    feats = [h]
    i = 0
    T = h.shape[0]
    hd = dmodel // heads
    while f"vision_model.encoder.layers.{i}.layer_norm1.weight" in sd:
        b = f"vision_model.encoder.layers.{i}."
        lin = lambda t, n: t @ g(b + n + ".weight").t() + g(b + n + ".bias")  # noqa: E731
        a = ln(h, b + "layer_norm1")
        q = lin(a, "self_attn.q_proj").reshape(T, heads, hd).transpose(0, 1)
        k = lin(a, "self_attn.k_proj").reshape(T, heads, hd).transpose(0, 1)
        v = lin(a, "self_attn.v_proj").reshape(T, heads, hd).transpose(0, 1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1)
        o = (att @ v).transpose(0, 1).reshape(T, dmodel)
        h = h + lin(o, "self_attn.out_proj")
        m = lin(ln(h, b + "layer_norm2"), "mlp.fc1")
        if act == "quick_gelu":
            m = m * torch.sigmoid(1.702 * m)
        elif act == "gelu":
            m = F.gelu(m)
        else:
            raise ValueError(act)
        h = h + lin(m, "mlp.fc2")
        feats.append(h)
        i += 1
    pooled = F.layer_norm(h[0], (dmodel,), g("vision_model.post_layernorm.weight"),
                          g("vision_model.post_layernorm.bias"), eps)
    embed = pooled @ g("visual_projection.weight").t()
    return feats, embed


# ----------------------------------------------------------------------------------------------
# Losses (all minimised by the attack), DESIGN.md section 2
# ----------------------------------------------------------------------------------------------

def loss_prm(fa, fc, layers=None, tokens="all"):
    layers = range(len(fa)) if layers is None else layers
    t0 = 0 if tokens == "all" else 1
    return sum(F.cosine_similarity(fa[l][t0:], fc[l][t0:].detach(), dim=-1).mean() for l in layers)


def per_layer_cos(fa, fc):
    return [float(F.cosine_similarity(a, c, dim=-1).mean()) for a, c in zip(fa, fc)]


def loss_nrd(fa, fc, layers=None):
    layers = range(len(fa)) if layers is None else layers
    return -sum(((fa[l] - fc[l].detach()) ** 2).mean() for l in layers)


def loss_dr(fa, layers=None):
    layers = range(len(fa)) if layers is None else layers
    return sum(fa[l].std() for l in layers)  # torch default: unbiased, over all T*D elements


def loss_embed(ea, ec):
    return F.cosine_similarity(ea, ec.detach(), dim=0)


def resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torch bicubic resize of a planar [3,H,W] image (align_corners=False, no antialias)."""
    return F.interpolate(x.unsqueeze(0), size=(h, w), mode="bicubic", align_corners=False)[0]


# ----------------------------------------------------------------------------------------------
# PNG helpers
# ----------------------------------------------------------------------------------------------

def read_png(path: str) -> torch.Tensor:
    from PIL import Image
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def write_png(path: str, x: torch.Tensor) -> None:
    from PIL import Image
    a = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(a), "RGB").save(path)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
