#!/usr/bin/env python3
"""Every open_clip model config through prm's loader: loaded and exact, or refused with a reason.

For each config open_clip knows (`open_clip.list_models()`), this builds the vision tower with
open_clip's own code (`_build_vision_tower`), shrunk to 2 blocks of width 64 (heads of 32 where
the config sets a head width) and a 3×3 patch grid, keeping every option that changes what the
tower computes (activation, LayerScale, pooling, norms, position embeddings, timm trunks). Its
LayerNorm parameters and biases are perturbed so they are not trivial. It saves the tower as
`visual.*` safetensors beside an `open_clip_config.json` holding the shrunk config, and then:

  - when `prm info` refuses the model, records prm's reason;
  - when prm loads it, runs `prm attack --preset pgd --steps 1 --init from:START --device cpu`
    with `--loss dr` and with `--loss prm`, and compares each manifest's `loss_initial` with
    the same quantity from open_clip's tower in float64 (features F_0 = ln_pre's output and
    every block's): dr, Σ_l std(F_l(start)), reads the features themselves (gate 1e-6
    relative; prm's fp32 agrees to about 1e-8, and the exact GELU in place of its tanh
    approximation, at most 4.7e-4 apart, moves it by 6e-6); prm, Σ_l mean_t cos(F_l(start),
    F_l(clean)), is gated on its cosine deficit (layers + 1 − loss, 1e-4), since the loss itself
    is within 1e-7 of a wrong model's; and with a projection, `--loss embed`, cos(embedding(start),
    embedding(clean)) through the tower's own pooling (class token, CLIPA's average), gated on
    its deficit 1 − cos in the same way.

`--variants` adds ViT-B-16 with each vision activation option open_clip has that no shipped
config combines with its own ViT (`act_kwargs` go only to open_clip's ViT; the configs that set
them have timm trunks): `approximate` "tanh" and "none", and "tanh" with `quick_gelu`, which
open_clip cannot build (its QuickGELU takes no options).

Exit status 1 when a loaded model misses the gate. `--self-test` also loads ViT-B-16 with the
wrong activation in its config, a tower with GELU's tanh approximation whose config says exact
GELU, and CLIPA's ViT-L/14 whose config puts the post-LayerNorm before the average, and fails
unless the gates catch all three.

Needs torch, open_clip_torch and pillow (tools/golden/requirements.txt) and a built prm:
  cargo build --release
  tools/.venv/bin/python tools/golden/open_clip_audit.py [--prm target/release/prm] \
      [--work /tmp/open_clip_audit] [--self-test] [--variants] [--only ViT-B-16,ViT-H-14]
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

import open_clip  # noqa: E402
from open_clip.factory import get_model_config  # noqa: E402
from open_clip.model import _build_vision_tower  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DR_GATE = 1e-6  # was 1e-5, which the exact GELU passed for the tanh GELU (6.3e-6, --self-test)
DEFICIT_GATE = 1e-4


def _act_kwargs(**kwargs):
    return lambda cfg: cfg["vision_cfg"].update(act_kwargs=kwargs)


# `--variants`: ViT-B-16 with one vision activation option changed.
VARIANTS = [
    ("act_kwargs-tanh", _act_kwargs(approximate="tanh")),
    ("act_kwargs-none", _act_kwargs(approximate="none")),
    ("quick_gelu-act_kwargs-tanh",
     lambda cfg: (cfg.update(quick_gelu=True), _act_kwargs(approximate="tanh")(cfg))),
]


def shrink(cfg):
    """The config with a small tower of the same kind (options untouched)."""
    cfg = copy.deepcopy(cfg)
    v = cfg["vision_cfg"]
    if "timm_model_name" not in v:
        if isinstance(v.get("layers"), int):
            v["layers"] = 2
        if isinstance(v.get("width"), int):
            v["width"] = 64
        if "head_width" in v:
            v["head_width"] = 32
        v["image_size"] = (v.get("patch_size") or 16) * 3
    return cfg


def build_tower(cfg, meta):
    v = cfg["vision_cfg"]
    quick_gelu = cfg.get("quick_gelu", False)
    if meta:
        with torch.device("meta"):
            return _build_vision_tower(32, v, quick_gelu=quick_gelu)
    torch.manual_seed(0)
    tower = _build_vision_tower(32, v, quick_gelu=quick_gelu).double().eval()
    with torch.no_grad():
        for _, p in tower.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return tower


def features(tower, img):
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = (torch.tensor(img, dtype=torch.float64).permute(2, 0, 1)[None] / 255.0 - mean) / std
    fs = []
    hooks = [tower.ln_pre.register_forward_hook(lambda m, i, o: fs.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: fs.append(o)) for b in tower.transformer.resblocks]
    with torch.no_grad():
        pooled = tower(x)
    for h in hooks:
        h.remove()
    if isinstance(pooled, tuple):  # (pooled, tokens) for towers that output their tokens
        pooled = pooled[0]
    return fs, pooled.reshape(-1)


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def audit(name, cfg, prm, work, photo, rng, config_edit=None):
    """('loaded', within the gates, detail), ('refused', reason) or ('skipped', why)."""
    cfg = shrink(cfg)
    d = os.path.join(work, name)
    for sub in ["clean", "start"]:
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    timm = "timm_model_name" in cfg["vision_cfg"]
    try:
        tower = build_tower(cfg, meta=timm)
    except Exception as e:  # open_clip itself cannot build it without downloads
        return ("skipped", f"open_clip cannot build it here: {type(e).__name__}: {str(e)[:80]}")
    state = {f"visual.{k}": (torch.zeros(1) if timm else t.float().contiguous().clone())
             for k, t in tower.state_dict().items()}
    save_file(state, os.path.join(d, "open_clip_model.safetensors"))
    saved_cfg = copy.deepcopy(cfg)
    if config_edit:
        config_edit(saved_cfg)
    with open(os.path.join(d, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": saved_cfg, "preprocess_cfg": {}}, f)
    info = run([prm, "info", "--model", d])
    if info.returncode != 0:
        # "error: cannot load model 'D': PATH: reason": the reason alone, to group models by it.
        reason = info.stderr.strip().splitlines()[-1].split(": ", 3)[-1]
        return ("refused", reason)
    side = (cfg["vision_cfg"].get("patch_size") or 16) * 3
    clean = photo[40:40 + side, 60:60 + side].astype(np.int32)
    start = np.clip(clean + rng.integers(-4, 5, clean.shape), 0, 255)
    Image.fromarray(clean.astype(np.uint8)).save(os.path.join(d, "clean", "a.png"))
    Image.fromarray(start.astype(np.uint8)).save(os.path.join(d, "start", "a.png"))
    def loss_initial(loss):
        out = os.path.join(d, "out-" + loss)
        subprocess.run(["rm", "-rf", out])
        attack = run([prm, "attack", "--model", d, "--input", os.path.join(d, "clean"), "--output",
                      out, "--preset", "pgd", "--loss", loss, "--steps", "1",
                      "--init", "from:" + os.path.join(d, "start"), "--device", "cpu", "--quiet"])
        if attack.returncode != 0:
            return None, "prm attack failed: " + attack.stderr.strip()[-200:]
        with open(os.path.join(out, "manifest.jsonl")) as f:
            return json.loads(f.readline())["loss_initial"], None

    (fc, ec), (fa, ea) = features(tower, clean), features(tower, start)
    # dr: Σ_l std(F_l(start)) (unbiased, over every token and channel): the features themselves.
    got_dr, failure = loss_initial("dr")
    if failure:
        return ("loaded", float("inf"), failure)
    ref_dr = sum(f[0].std() for f in fa).item()
    err_dr = abs(got_dr - ref_dr) / abs(ref_dr)
    # prm: the cosine deficit (layers + 1 − loss) against the clean image's features.
    got, failure = loss_initial("prm")
    if failure:
        return ("loaded", float("inf"), failure)
    ref = sum(torch.nn.functional.cosine_similarity(a[0], c[0], dim=-1).mean()
              for a, c in zip(fa, fc)).item()
    layers = len(fc)
    err_prm = abs((layers - got) - (layers - ref)) / abs(layers - ref)
    ok = err_dr < DR_GATE and err_prm < DEFICIT_GATE
    detail = f"dr rel. error {err_dr:.1e}, prm deficit rel. error {err_prm:.1e}"
    # embed: cos(embedding(start), embedding(clean)) through the tower's own pooling (class
    # token, or CLIPA's average) and projection, gated on its deficit 1 − cos like prm's.
    if getattr(tower, "proj", None) is not None:
        got, failure = loss_initial("embed")
        if failure:
            return ("loaded", False, detail + "; embed: " + failure)
        ref = torch.nn.functional.cosine_similarity(ea, ec, dim=0).item()
        err_embed = abs((1 - got) - (1 - ref)) / abs(1 - ref)
        ok = ok and err_embed < DEFICIT_GATE
        detail += f", embed deficit rel. error {err_embed:.1e}"
    return ("loaded", ok, detail)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prm", default=os.path.join(ROOT, "target", "release", "prm"))
    p.add_argument("--work", default="/tmp/open_clip_audit")
    p.add_argument("--only", help="comma-separated model names")
    p.add_argument("--self-test", action="store_true")
    p.add_argument("--variants", action="store_true",
                   help="also ViT-B-16 with each vision activation option of open_clip")
    args = p.parse_args()
    photo = np.asarray(Image.open(os.path.join(ROOT, "samples", "astronaut.png")).convert("RGB"))
    rng = np.random.default_rng(0)
    names = args.only.split(",") if args.only else open_clip.list_models()
    jobs = [(name, get_model_config(name)) for name in names]
    if args.variants:
        for label, edit in VARIANTS:
            cfg = copy.deepcopy(get_model_config("ViT-B-16"))
            edit(cfg)
            jobs.append((f"variant-ViT-B-16-{label}", cfg))
    loaded, refused, skipped, failed = [], {}, [], []
    for name, cfg in jobs:
        if cfg is None:
            continue
        r = audit(name, cfg, args.prm, args.work, photo, rng)
        if r[0] == "refused":
            refused.setdefault(r[1], []).append(name)
        elif r[0] == "skipped":
            skipped.append(f"{name}: {r[1]}")
        else:
            ok = r[1] is True
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {r[2]}")
            (loaded if ok else failed).append(name)
    for reason, models in sorted(refused.items(), key=lambda kv: -len(kv[1])):
        print(f"refused ({len(models)}): {reason}\n    {' '.join(models)}")
    for s in skipped:
        print("skipped", s)
    print(f"open_clip {open_clip.__version__}: {len(loaded)} loaded and exact, {len(failed)} "
          f"loaded and wrong, {sum(len(m) for m in refused.values())} refused, {len(skipped)} skipped")
    status = 1 if failed else 0
    if args.self_test:
        def wrong_activation(cfg):
            cfg["quick_gelu"] = not cfg.get("quick_gelu", False)

        def exact_gelu(cfg):
            del cfg["vision_cfg"]["act_kwargs"]

        def norm_before_average(cfg):
            del cfg["vision_cfg"]["final_ln_after_pool"]
        vit_b_16 = get_model_config("ViT-B-16")
        tanh_gelu = copy.deepcopy(vit_b_16)
        _act_kwargs(approximate="tanh")(tanh_gelu)
        # The second: the two GELUs differ by at most 4.7e-4, the smallest change of activation.
        for name, what, cfg, edit in [
                ("self-test-ViT-B-16", "wrong activation", vit_b_16, wrong_activation),
                ("self-test-tanh-ViT-B-16", "exact GELU for the tanh GELU", tanh_gelu, exact_gelu),
                # The embed check alone can catch it: no feature reads the pooling.
                ("self-test-ViT-L-14-CLIPA", "post-LayerNorm before CLIPA's average",
                 get_model_config("ViT-L-14-CLIPA"), norm_before_average)]:
            r = audit(name, cfg, args.prm, args.work, photo, rng, config_edit=edit)
            caught = r[0] == "loaded" and r[1] is not True
            print(f"self-test ({what} in the config): "
                  f"{'caught' if caught else 'NOT CAUGHT'} ({r[-1]})")
            status |= 0 if caught else 1
    sys.exit(status)


if __name__ == "__main__":
    main()
