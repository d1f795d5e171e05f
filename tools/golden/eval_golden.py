#!/usr/bin/env python3
"""Golden data and an independent float64 check for `prm eval` (the transfer-evaluation targets).

    tools/.venv/bin/python tools/golden/eval_golden.py generate        # writes tests/golden/eval/
    tools/.venv/bin/python tools/golden/eval_golden.py compare [--prm target/release/prm]

`generate` builds a tiny random HF CLIPModel (vision D=128, 2 heads, 3 layers, MLP 256, patch 8,
pretrained grid 4x4, exact GELU; text W=128, 2 heads, 2 layers, QuickGELU, vocabulary = prm's
bundled tokenizer, context 77, projection 64), two 45x61 images (non-square, not a multiple of
the patch: grid 5x7 with pixels dropped, position embedding interpolated), five random class
embeddings, and writes in float64:
  - for maskclip, sclip, clearclip and each image: the patch logits [35, 5], the label map
    [45, 61] and the top-1 minus top-2 margin of the upsampled logits (to tell ties from bugs);
  - miou_adv_vs_clean per target;
  - token ids and text embeddings for a few prompts, and the 80-template class embeddings of
    three names.
Every dense result is computed twice, by plain torch ops from the state dict (`dense_manual`)
and through transformers' own modules (`dense_hf`), and the two must agree to 1e-12.

`compare` is the acceptance check of the issue: it builds held-out random models (new seeds,
other sizes, HF and OpenAI formats, GELU and QuickGELU), held-out images (odd sizes) and
held-out classes (names embedded with the text tower, or a class-embedding file), runs
`prm eval --target maskclip --device cpu` (fp32), and compares its label maps
(--save-predictions) and miou_adv_vs_clean with this float64 MaskCLIP.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clipref as R  # noqa: E402
from generate import randomise  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "golden", "eval")
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer", "tiny-clip-tokenizer.json")
TEMPLATES = [l.strip() for l in open(os.path.join(ROOT, "assets", "prompt_templates.txt")) if l.strip()]
HEADS = ("maskclip", "sclip", "clearclip")


# ---------------------------------------------------------------------------------------------
# Float64 MaskCLIP family from an HF-named state dict (plain torch ops)
# ---------------------------------------------------------------------------------------------

def act_fn(act):
    if act == "quick_gelu":
        return lambda m: m * torch.sigmoid(1.702 * m)
    return F.gelu


def dense_manual(sd, x, heads, act, head, classes, eps=1e-5):
    """Patch logits [gh*gw, C] of a dense head; x planar [3,H,W] in [0,1]; classes normalised."""
    g = lambda k: sd[k].to(torch.float64)  # noqa: E731
    feats, _ = R.manual_features(sd, x, heads, act, eps)
    L = len(feats) - 1
    xin = feats[L - 1]
    T, D = xin.shape
    hd = D // heads
    b = f"vision_model.encoder.layers.{L - 1}."
    lin = lambda t, n, bias=True: t @ g(b + n + ".weight").t() + (g(b + n + ".bias") if bias else 0)  # noqa
    ln = lambda t, pre: F.layer_norm(t, (D,), g(pre + ".weight"), g(pre + ".bias"), eps)  # noqa
    a = ln(xin, b + "layer_norm1")
    q = lin(a, "self_attn.q_proj").reshape(T, heads, hd).transpose(0, 1)
    k = lin(a, "self_attn.k_proj").reshape(T, heads, hd).transpose(0, 1)
    v = lin(a, "self_attn.v_proj").reshape(T, heads, hd).transpose(0, 1)
    s = 1.0 / math.sqrt(hd)
    if head == "maskclip":
        o = v
    elif head == "sclip":
        o = torch.softmax(q @ q.transpose(1, 2) * s, -1) @ v + torch.softmax(k @ k.transpose(1, 2) * s, -1) @ v
    else:
        o = torch.softmax(q @ q.transpose(1, 2) * s, -1) @ v
    o = lin(o.transpose(0, 1).reshape(T, D), "self_attn.out_proj")
    if head == "clearclip":
        z = o
    else:
        z = xin + o
        z = z + lin(act_fn(act)(lin(ln(z, b + "layer_norm2"), "mlp.fc1")), "mlp.fc2")
    z = F.layer_norm(z, (D,), g("vision_model.post_layernorm.weight"), g("vision_model.post_layernorm.bias"), eps)
    e = z @ g("visual_projection.weight").t()
    e = e / e.norm(dim=-1, keepdim=True)
    return (e @ classes.t())[1:]


def dense_hf(model, x, head, classes):
    """The same through transformers' modules (CLIPVisionModelWithProjection, float64)."""
    vm = model.vision_model
    pv = R.normalise(x).unsqueeze(0)
    out = vm(pixel_values=pv, output_hidden_states=True, interpolate_pos_encoding=True)
    L = len(vm.encoder.layers)
    xin = out.hidden_states[L - 1]
    layer = vm.encoder.layers[L - 1]
    at = layer.self_attn
    a = layer.layer_norm1(xin)
    T = a.shape[1]
    H, hd = at.num_heads, at.head_dim
    sh = lambda t: t.reshape(1, T, H, hd).transpose(1, 2)  # noqa: E731
    q, k, v = sh(at.q_proj(a)), sh(at.k_proj(a)), sh(at.v_proj(a))
    s = hd ** -0.5
    if head == "maskclip":
        o = v
    elif head == "sclip":
        o = torch.softmax(q @ q.transpose(-1, -2) * s, -1) @ v + torch.softmax(k @ k.transpose(-1, -2) * s, -1) @ v
    else:
        o = torch.softmax(q @ q.transpose(-1, -2) * s, -1) @ v
    o = at.out_proj(o.transpose(1, 2).reshape(1, T, H * hd))
    if head == "clearclip":
        z = o
    else:
        z = xin + o
        z = z + layer.mlp(layer.layer_norm2(z))
    e = model.visual_projection(vm.post_layernorm(z))[0]
    e = e / e.norm(dim=-1, keepdim=True)
    return (e @ classes.t())[1:]


def upsample(logits, gh, gw, H, W):
    """[gh*gw, C] -> upsampled [C, H, W] (bilinear, align_corners=False), label map, margin."""
    C = logits.shape[1]
    up = F.interpolate(logits.t().reshape(1, C, gh, gw), size=(H, W), mode="bilinear", align_corners=False)[0]
    top = torch.topk(up, 2, dim=0).values if C > 1 else torch.cat([up, up - 1])
    return up, up.argmax(0), top[0] - top[1]


def confusion(ref, pred, C):
    return np.bincount(ref.reshape(-1) * C + pred.reshape(-1), minlength=C * C).reshape(C, C)


def miou(m):
    tp = np.diag(m).astype(np.float64)
    union = m.sum(0) + m.sum(1) - tp
    ok = union > 0
    return float((tp[ok] / union[ok]).mean())


# ---------------------------------------------------------------------------------------------
# Text tower
# ---------------------------------------------------------------------------------------------

def text_manual(sd, ids, heads, act, eps=1e-5):
    """Float64 CLIP text embedding of one id sequence from an HF-named state dict."""
    g = lambda k: sd[k].to(torch.float64)  # noqa: E731
    n = len(ids)
    h = g("text_model.embeddings.token_embedding.weight")[ids] + g("text_model.embeddings.position_embedding.weight")[:n]
    D = h.shape[1]
    hd = D // heads
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    i = 0
    ln = lambda t, pre: F.layer_norm(t, (D,), g(pre + ".weight"), g(pre + ".bias"), eps)  # noqa
    while f"text_model.encoder.layers.{i}.layer_norm1.weight" in sd:
        b = f"text_model.encoder.layers.{i}."
        lin = lambda t, nm: t @ g(b + nm + ".weight").t() + g(b + nm + ".bias")  # noqa
        a = ln(h, b + "layer_norm1")
        q, k, v = (lin(a, f"self_attn.{p}_proj").reshape(n, heads, hd).transpose(0, 1) for p in "qkv")
        o = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v
        h = h + lin(o.transpose(0, 1).reshape(n, D), "self_attn.out_proj")
        h = h + lin(act_fn(act)(lin(ln(h, b + "layer_norm2"), "mlp.fc1")), "mlp.fc2")
        i += 1
    e = int(np.argmax(ids))
    pooled = ln(h[e:e + 1], "text_model.final_layer_norm")
    return (pooled @ g("text_projection.weight").t())[0]


def encode(tok, text, ctx=77):
    sot, eot = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    ids = [sot] + tok.encode(text, add_special_tokens=False).ids + [eot]
    if len(ids) > ctx:
        ids = ids[:ctx]
        ids[-1] = eot
    return ids


def class_text_embeddings(sd, names, tok, heads, act, model=None):
    out = []
    for name in names:
        embs = []
        for t in TEMPLATES:
            ids = encode(tok, t.replace("{}", name))
            e = text_manual(sd, ids, heads, act)
            if model is not None:
                e2 = model.get_text_features(input_ids=torch.tensor([ids]))
                e2 = getattr(e2, "pooler_output", e2)[0]
                assert torch.allclose(e, e2, rtol=1e-10, atol=1e-12), (e - e2).abs().max()
            embs.append(e / e.norm())
        m = torch.stack(embs).mean(0)
        out.append(m / m.norm())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Models and images
# ---------------------------------------------------------------------------------------------

def clip_model(seed, width, heads, layers, mlp, patch, image, act, text_act, embed=64, text_layers=2):
    from transformers import CLIPConfig, CLIPModel
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(TOKENIZER).get_vocab_size(with_added_tokens=True)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=text_layers,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=text_act,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=embed),
        vision_config=dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                           patch_size=patch, image_size=image, hidden_act=act, projection_dim=embed),
        projection_dim=embed)
    model = CLIPModel(cfg)
    randomise(model, seed)
    model = model.float().double().eval()  # weights exactly the f32 values that get saved
    return model


def save_hf(model, d):
    os.makedirs(d, exist_ok=True)
    model.float().save_pretrained(d)
    model.double()
    shutil.copy(TOKENIZER, os.path.join(d, "tokenizer.json"))


def save_openai(model, path):
    """OpenAI naming (visual.*, transformer.*, token_embedding, ...), F16 -> weights re-read."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    out = {}
    nl = model.config.vision_config.num_hidden_layers
    vis = {k: v for k, v in sd.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    out.update(R.hf_vision_to_openai(vis, nl))
    tl = model.config.text_config.num_hidden_layers
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    for i in range(tl):
        h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[o + "attn.in_proj_weight"] = torch.cat([sd[h + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[o + "attn.in_proj_bias"] = torch.cat([sd[h + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        for a, b in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
            out[o + b + ".weight"] = sd[h + a + ".weight"]
            out[o + b + ".bias"] = sd[h + a + ".bias"]
    out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out = {k: v.contiguous().to(torch.float32) for k, v in out.items()}
    save_file(out, path)


def random_image(rng, h, w):
    a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    # smooth it a little so segments are not pure noise
    t = torch.from_numpy(a).permute(2, 0, 1).double()[None] / 255.0
    t = F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]
    return torch.round(t * 255) / 255.0


def perturbed(rng, x, eps=8 / 255):
    d = torch.from_numpy(rng.uniform(-eps, eps, size=tuple(x.shape)))
    return torch.round((x + d).clamp(0, 1) * 255) / 255.0


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def generate():
    torch.manual_seed(0)
    rng = np.random.default_rng(505)
    model = clip_model(seed=501, width=128, heads=2, layers=3, mlp=256, patch=8, image=32, act="gelu",
                       text_act="quick_gelu")
    mdir = os.path.join(OUT, "clip_tiny")
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    save_hf(model, mdir)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    H, W, C = 45, 61, 5
    clean = random_image(rng, H, W)
    adv = perturbed(rng, clean)
    R.write_png(os.path.join(OUT, "clean.png"), clean)
    R.write_png(os.path.join(OUT, "adv.png"), adv)
    classes = torch.from_numpy(rng.standard_normal((C, 64)))
    classes = classes.float().double()
    classes = classes / classes.norm(dim=-1, keepdim=True)
    cases = {"class_embeddings": classes.float()}
    meta = {"names": ",".join(f"c{i}" for i in range(C))}
    gh, gw = H // 8, W // 8
    for head in HEADS:
        maps = {}
        for tag, x in [("clean", clean), ("adv", adv)]:
            lm = dense_manual(sd, x, 2, "gelu", head, classes)
            lh = dense_hf(model, x, head, classes)
            err = (lm - lh).abs().max().item()
            assert err < 1e-12, (head, tag, err)
            _, lab, margin = upsample(lm, gh, gw, H, W)
            cases[f"{head}_logits_{tag}"] = lm
            cases[f"{head}_labels_{tag}"] = lab.to(torch.int32)
            cases[f"{head}_margin_{tag}"] = margin
            maps[tag] = lab.numpy()
        m = miou(confusion(maps["clean"], maps["adv"], C))
        meta[f"{head}_miou_adv_vs_clean"] = repr(m)
        print(f"{head}: manual vs transformers max |diff| ok; miou_adv_vs_clean {m:.6f}")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(TOKENIZER)
    prompts = ["a photo of a cat.", "a photo of a potted plant.", "itap of my rocket.", "Graffiti of the SKY!"]
    for i, p in enumerate(prompts):
        ids = encode(tok, p)
        e = text_manual(sd, ids, 2, "quick_gelu")
        e2 = model.get_text_features(input_ids=torch.tensor([ids]))
        e2 = getattr(e2, "pooler_output", e2)[0]
        assert torch.allclose(e, e2, rtol=1e-10, atol=1e-12), (e - e2).abs().max()
        cases[f"text_ids_{i}"] = torch.tensor(ids, dtype=torch.int32)
        cases[f"text_embed_{i}"] = e
        meta[f"text_prompt_{i}"] = p
    names = ["cat", "rocket", "potted plant"]
    cases["class_text_embeddings"] = class_text_embeddings(sd, names, tok, 2, "quick_gelu", model)
    meta["class_text_names"] = ",".join(names)
    print("text tower: manual vs transformers get_text_features ok")
    save_file({k: v.contiguous() for k, v in cases.items()}, os.path.join(OUT, "cases.safetensors"), metadata=meta)
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("Generated by `tools/golden/eval_golden.py generate` (see its docstring). Do not edit.\n")
    print("wrote", OUT)


# ---------------------------------------------------------------------------------------------
# compare (acceptance check on held-out models, classes and images)
# ---------------------------------------------------------------------------------------------

def read_label_png(path):
    from PIL import Image
    return np.asarray(Image.open(path), dtype=np.int64)


def compare(prm, work, seed):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(TOKENIZER)
    rng = np.random.default_rng(seed)
    setups = [
        dict(name="hf_b16like_gelu", fmt="hf", width=128, heads=2, layers=4, mlp=512, patch=16, image=64,
             act="gelu", text_act="gelu", classes="names"),
        dict(name="openai_quickgelu", fmt="openai", width=192, heads=3, layers=3, mlp=384, patch=14, image=56,
             act="quick_gelu", text_act="quick_gelu", classes="names"),
        dict(name="hf_embfile", fmt="hf", width=128, heads=2, layers=2, mlp=256, patch=8, image=48,
             act="quick_gelu", text_act="quick_gelu", classes="file"),
    ]
    names_pool = ["cat", "dog", "rocket", "sky", "person", "tree", "road", "car", "bird", "water", "building",
                  "grass", "flower", "boat", "horse"]
    sizes = [(97, 131), (120, 89), (75, 75), (143, 61)]
    rows = []
    for k, s in enumerate(setups):
        d = os.path.join(work, s["name"])
        os.makedirs(d, exist_ok=True)
        model = clip_model(seed * 100 + k, s["width"], s["heads"], s["layers"], s["mlp"], s["patch"], s["image"],
                           s["act"], s["text_act"])
        if s["fmt"] == "hf":
            save_hf(model, os.path.join(d, "model"))
            spec = os.path.join(d, "model")
        else:
            os.makedirs(os.path.join(d, "model"), exist_ok=True)
            save_openai(model, os.path.join(d, "model", "clip.safetensors"))
            with open(os.path.join(d, "model", "open_clip_config.json"), "w") as f:
                json.dump({"model_cfg": {"quick_gelu": s["act"] == "quick_gelu",
                                         "text_cfg": {"heads": 2}}}, f)
            shutil.copy(TOKENIZER, os.path.join(d, "model", "tokenizer.json"))
            spec = os.path.join(d, "model", "clip.safetensors")
        sd = {k2: v.double() for k2, v in model.state_dict().items()}
        C = int(rng.integers(5, 9))
        names = list(rng.choice(names_pool, size=C, replace=False))
        if s["classes"] == "names":
            cls_path = os.path.join(d, "classes.txt")
            with open(cls_path, "w") as f:
                f.write("\n".join(names) + "\n")
            classes = class_text_embeddings(sd, names, tok, 2, s["text_act"])
        else:
            e = torch.from_numpy(rng.standard_normal((C, 64))).float()
            cls_path = os.path.join(d, "classes.safetensors")
            save_file({"class_embeddings": e}, cls_path, metadata={"names": ",".join(names)})
            classes = e.double() / e.double().norm(dim=-1, keepdim=True)
        for sub in ("clean", "adv"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        ref_maps = {}
        for i, (h, w) in enumerate(sizes):
            x = random_image(rng, h, w)
            xa = perturbed(rng, x, 16 / 255)
            R.write_png(os.path.join(d, "clean", f"img{i}.png"), x)
            R.write_png(os.path.join(d, "adv", f"img{i}.png"), xa)
            gh, gw = h // s["patch"], w // s["patch"]
            for tag, im in (("clean", x), ("adv", xa)):
                lg = dense_manual(sd, im, s["heads"], s["act"], "maskclip", classes)
                _, lab, margin = upsample(lg, gh, gw, h, w)
                ref_maps[(i, tag)] = (lab.numpy(), margin.numpy())
        report = os.path.join(d, "report.json")
        pred = os.path.join(d, "pred")
        cmd = [prm, "eval", "--model", spec, "--target", "maskclip", "--clean", os.path.join(d, "clean"),
               "--adv", os.path.join(d, "adv"), "--classes", cls_path, "--device", "cpu", "--report", report,
               "--save-predictions", pred, "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(" ".join(cmd))
            print(r.stdout, r.stderr)
            raise SystemExit(f"prm eval failed with exit code {r.returncode}")
        rep = json.load(open(report))
        total = agree = agree_clear = clear = 0
        conf = np.zeros((C, C), dtype=np.int64)
        for i in range(len(sizes)):
            for tag in ("clean", "adv"):
                ref, margin = ref_maps[(i, tag)]
                got = read_label_png(os.path.join(pred, tag, f"img{i}.png"))
                assert got.shape == ref.shape, (got.shape, ref.shape)
                total += ref.size
                agree += int((got == ref).sum())
                sel = margin > 1e-4
                clear += int(sel.sum())
                agree_clear += int((got[sel] == ref[sel]).sum())
            conf += confusion(ref_maps[(i, "clean")][0], ref_maps[(i, "adv")][0], C)
        m_ref = miou(conf)
        m_prm = rep["miou_adv_vs_clean"]
        row = dict(setup=s["name"], format=s["fmt"], classes=f"{C} {s['classes']}", pixels=total,
                   label_agreement=agree / total, agreement_where_margin_gt_1e4=agree_clear / max(clear, 1),
                   miou_ref_f64=m_ref, miou_prm_fp32=m_prm, miou_abs_diff=abs(m_ref - m_prm))
        rows.append(row)
        print(json.dumps(row))
    worst = max(r["miou_abs_diff"] for r in rows)
    min_agree = min(r["label_agreement"] for r in rows)
    print(f"\nworst |miou diff| {worst:.3e}, lowest label-map agreement {min_agree:.6f}")
    ok = worst < 1e-3 and min(r["agreement_where_margin_gt_1e4"] for r in rows) == 1.0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["generate", "compare"])
    ap.add_argument("--prm", default=os.path.join(ROOT, "target", "release", "prm"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if a.cmd == "generate":
        generate()
        return 0
    work = a.work or tempfile.mkdtemp(prefix="prm-eval-compare-")
    print("work dir", work)
    return compare(a.prm, work, a.seed)


if __name__ == "__main__":
    sys.exit(main())
