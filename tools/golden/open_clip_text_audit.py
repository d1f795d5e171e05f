#!/usr/bin/env python3
"""Every open_clip model config's text tower through `prm classes`: loaded and exact, or refused.

For each config open_clip knows (`open_clip.list_models()`), this builds the whole model with
open_clip's own classes, chosen as `open_clip.create_model` chooses them (CLIP; CustomTextCLIP
for `custom_text` and Hugging Face text towers; CoCa for a `multimodal_cfg`), with the text tower
shrunk to 2 blocks of width 64 (heads of 32), a vocabulary of 614 ids (prm's bundled tokenizer)
and an output of 32, keeping every text option (quick_gelu, act_kwargs, norm_kwargs, pool_type,
eos_id, embed_cls, no_causal_mask, proj_bias, proj_type, mlp_ratio, context_length, HF encoders
at a tiny size). The vision tower is a tiny standard ViT, since `prm classes` reads only the text
tower. LayerNorm parameters and biases are perturbed so they are not trivial. It saves the
model's own `state_dict()` (so a CustomTextCLIP's tower is under `text.*`, as in open_clip's
checkpoints) beside an `open_clip_config.json` holding the shrunk config, and then:

  - runs `prm classes --single-template --tokenizer assets/tokenizer/tiny-clip-tokenizer.json
    --device cpu` on a few class names (one makes a prompt longer than the context, so the
    truncation is tested too);
  - when prm refuses (exit status 2), records its reason;
  - when prm loads it, compares each row of `class_embeddings` with open_clip's
    `encode_text(..., normalize=True)` in float64 of the same prompt, tokenized in Python with
    the same tokenizer.json (`<|startoftext|> … <|endoftext|>`, cut to the context with the last
    kept id `<|endoftext|>`, padded with 0 as open_clip pads): max |difference| of the
    normalised vectors, gate 1e-5 (prm's fp32 agrees to about 1e-7).

The token ids themselves are checked once per context length with a probe text tower (1 block,
one attention head per position, each copying that position's token into its own channels)
whose embedding, decoded, is the sequence of ids prm fed it: they must equal Python's ids, and
the same decoding of open_clip's embedding must too (which checks the probe).

`--variants` adds (a) ViT-B-16 with each text option open_clip has changed alone (act_kwargs,
norm_kwargs, a config without `heads`, LayerScale, the custom block's norms and scales, every
pool_type, ...), the options no shipped config combines with an otherwise standard tower, and (b)
every CustomTextCLIP / CoCa tower again with `text.*` renamed to CLIP's names, which is what prm
would meet if it read `text.*`.

Exit status 1 when a loaded model misses the gate, prm fails otherwise (a crash, exit status
other than 0 and 2), or the ids differ. `--self-test` also loads ViT-B-16 with the wrong
activation and with the wrong LayerNorm eps in its config, and fails unless the gate catches
both.

Measured (open_clip 3.3.0, 144 configs, 12-20 s on CPU with --self-test), at the commit that
added this script, after the two fixes it found: 56 loaded and exact (worst max |difference|
2.7e-7), 0 loaded and wrong, 88 refused (75 keep their tower under `text.*`, which prm names; 7
pool_type "eos"; 6 pool_type "last"), 0 skipped; token ids equal; the self-test catches both
(7.7e-3, 1.2e-2). With --variants (233 configs): 93 loaded and exact (worst 3.4e-7), 140
refused, none wrong. Before the fixes, --variants found 2 loaded and WRONG: act_kwargs
{"approximate": "tanh"} (9.6e-5: prm ignored act_kwargs and computed exact GELU; then refused, on
the vision tower too, and since computed, below) and a text_cfg without `heads` (4.9e-1: prm
took width / 64 heads where open_clip's default is 8; now 8). The 29 standard `text.*` towers
(EVA, PE-Core, ViTamin, MobileCLIP(2)-B) agree once renamed; their vision towers are timm
trunks, which prm refuses.

Since prm computes GELU's tanh approximation (act_kwargs {"approximate": "tanh"}): the 144
configs as above; with --variants (235 configs): 95 loaded and exact (worst 3.0e-7; act_kwargs
"tanh" 2.7e-7, "none" 2.8e-7), 139 refused, 1 skipped (quick_gelu with act_kwargs, which open_clip
cannot build: its QuickGELU takes no options; prm refuses it), none wrong. The 15 configs that
set act_kwargs are SigLIP2's, whose text towers are CustomTextCLIP's `text.*` (and, renamed,
have no `text_projection`): still refused. The self-test also builds ViT-B-16's text tower with
the tanh GELU under a config that says exact GELU, and catches it (9.6e-5).

Needs torch, open_clip_torch, safetensors, tokenizers and transformers (HF text towers) and a
built prm:
  cargo build --release
  tools/.venv/bin/python tools/golden/open_clip_text_audit.py [--prm target/release/prm] \\
      [--work /tmp/open_clip_text_audit] [--self-test] [--variants] [--only ViT-B-16,EVA02-B-16]
"""

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

import open_clip  # noqa: E402
from open_clip.coca_model import CoCa  # noqa: E402
from open_clip.factory import get_model_config  # noqa: E402
from open_clip.model import CLIP, CustomTextCLIP  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer", "tiny-clip-tokenizer.json")
GATE = 1e-5
VOCAB = 614
EMBED_DIM = 32
TINY_VISION = {"layers": 2, "width": 64, "head_width": 32, "patch_size": 16, "image_size": 32}
CLASS_NAMES = [
    "cat",
    "potted plant",
    "Space  Ship",
    "tench, Tinca tinca",
    "Xylophone-playing quokka, juggling 17 kumquats & zucchini (très élégant!) beside a rocket "
    "and an astronaut riding a horse on the moon at night",  # longer than the context: truncated
]
TEMPLATE = "a photo of a {}."
# The Hugging Face configs open_clip names, as the model types transformers builds them from
# (no downloads: the tiny config is made here).
HF_TYPES = {"roberta-base": "roberta", "xlm-roberta": "xlm-roberta", "google/mt5": "mt5",
            "facebook/nllb": "m2m_100", "bert-base": "bert"}


def _text(**options):
    return lambda cfg: cfg["text_cfg"].update(options)


def _drop_heads(cfg):
    del cfg["text_cfg"]["heads"]


# `--variants`: ViT-B-16 with one text option changed, for the options open_clip supports that no
# shipped config combines with an otherwise standard tower (a future config, or a fine-tune's).
VARIANTS = [
    ("quick_gelu", lambda cfg: cfg.update(quick_gelu=True)),
    ("act_kwargs-tanh", _text(act_kwargs={"approximate": "tanh"})),
    ("act_kwargs-none", _text(act_kwargs={"approximate": "none"})),
    # open_clip's QuickGELU takes no options: open_clip cannot build this one (skipped), and prm
    # refuses it.
    ("quick_gelu-act_kwargs-tanh",
     lambda cfg: (cfg.update(quick_gelu=True), cfg["text_cfg"].update(act_kwargs={"approximate": "tanh"}))),
    ("norm_kwargs-eps-1e-6", _text(norm_kwargs={"eps": 1e-6})),
    ("mlp_ratio-3.7362", _text(mlp_ratio=3.7362)),
    ("context_length-32", _text(context_length=32)),
    ("final_ln_after_pool", _text(final_ln_after_pool=True)),
    ("pad_id-1", _text(pad_id=1)),
    ("heads-absent", _drop_heads),
    ("block_type-custom", _text(block_type="custom")),
    ("ls_init_value", _text(ls_init_value=0.1)),
    ("qk_norm", _text(qk_norm=True)),
    ("scaled_cosine_attn", _text(scaled_cosine_attn=True)),
    ("scale_heads", _text(scale_heads=True)),
    ("scale_attn_inner", _text(scale_attn_inner=True)),
    ("scale_attn", _text(scale_attn=True)),
    ("scale_fc", _text(scale_fc=True)),
    ("proj_bias", _text(proj_bias=True)),
    ("proj_type-none", _text(proj_type="none")),
    ("pool_type-first", _text(pool_type="first")),
    ("pool_type-last", _text(pool_type="last")),
    ("pool_type-eos", _text(pool_type="eos", eos_id=613)),
    ("embed_cls", _text(embed_cls=True)),
    ("no_causal_mask", _text(no_causal_mask=True)),
    ("custom_text", lambda cfg: cfg.update(custom_text=True)),
]


def shrink(cfg):
    """The config with a small text tower of the same kind (options untouched)."""
    cfg = copy.deepcopy(cfg)
    cfg["embed_dim"] = EMBED_DIM
    cfg["vision_cfg"] = dict(TINY_VISION)
    t = cfg["text_cfg"]
    if "hf_model_name" not in t:
        t.update(layers=2, width=64, **({"heads": 2} if "heads" in t else {}))
    t["vocab_size"] = VOCAB
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"].update(layers=1, width=64, heads=2, vocab_size=VOCAB,
                                     attn_pooler_heads=2, n_queries=4)
        cfg["multimodal_cfg"].pop("dim_head", None)
    return cfg


def tiny_hf_config(name):
    import transformers
    from open_clip.hf_configs import arch_dict

    kind = next((k for p, k in HF_TYPES.items() if name.startswith(p)), None)
    if kind is None:
        raise ValueError(f"no tiny config for HF model {name}")
    c = transformers.AutoConfig.for_model(kind)
    names = arch_dict[kind]["config_names"]
    setattr(c, names["width"], 64)
    setattr(c, names["heads"], 2)
    setattr(c, names["layers"], 2)
    c.vocab_size = VOCAB
    for k, v in [("intermediate_size", 128), ("d_ff", 128), ("d_kv", 32), ("encoder_ffn_dim", 128),
                 ("decoder_ffn_dim", 128), ("decoder_layers", 1), ("decoder_attention_heads", 2),
                 ("num_decoder_layers", 1), ("pad_token_id", 0)]:
        if hasattr(c, k):
            setattr(c, k, v)
    return c


def build_model(cfg):
    """open_clip's model for a (shrunk) config, in float64 with perturbed 1-D parameters."""
    cfg = copy.deepcopy(cfg)
    t = cfg["text_cfg"]
    hf = t.get("hf_model_name")
    custom = cfg.pop("custom_text", False) or bool(hf)
    cls = (CoCa if "multimodal_cfg" in cfg else CustomTextCLIP) if custom else CLIP
    torch.manual_seed(0)
    if hf:
        from open_clip import hf_model
        real = hf_model.HFTextEncoder.__init__
        hf_cfg = tiny_hf_config(hf)

        def tiny(self, name, output_dim, config=None, **kw):
            real(self, name, output_dim, config=hf_cfg, **kw)
            if getattr(hf_cfg, "is_encoder_decoder", False):  # as open_clip keeps only the encoder
                self.transformer = self.transformer.encoder
        hf_model.HFTextEncoder.__init__ = tiny
        try:
            model = cls(**cfg)
        finally:
            hf_model.HFTextEncoder.__init__ = real
    else:
        model = cls(**cfg)
    model = model.double().eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokenizer():
    tok = Tokenizer.from_file(TOKENIZER)
    tok.no_padding()
    tok.no_truncation()
    return tok


def token_ids(tok, text, context):
    """prm's sequence (src/eval/tokenizer.rs): <|startoftext|> ids <|endoftext|>, cut to context."""
    ids = [tok.token_to_id("<|startoftext|>")] + tok.encode(text, add_special_tokens=False).ids \
        + [tok.token_to_id("<|endoftext|>")]
    if len(ids) > context:
        ids = ids[:context]
        ids[-1] = tok.token_to_id("<|endoftext|>")
    return ids


def padded(seqs, context):
    """open_clip's token tensor: each sequence padded with 0 to the context length."""
    out = torch.zeros(len(seqs), context, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
    return out


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def prm_classes(prm, d, names):
    """(embeddings [C, E] or None, exit status, stderr) of `prm classes` on d/open_clip_model."""
    with open(os.path.join(d, "names.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    out = os.path.join(d, "classes.safetensors")
    if os.path.exists(out):
        os.remove(out)
    r = run([prm, "classes", "--model", os.path.join(d, "open_clip_model.safetensors"), "--names",
             os.path.join(d, "names.txt"), "--output", out, "--single-template", "--tokenizer",
             TOKENIZER, "--device", "cpu", "--quiet"])
    if r.returncode != 0:
        return None, r.returncode, r.stderr.strip()
    return load_file(out)["class_embeddings"].astype(np.float64), 0, r.stderr.strip()


def reason_of(stderr):
    # "Error: cannot load the text tower of 'F': F: reason" (or a context-free error): the reason
    # alone, without the paths, to group models by it.
    line = stderr.strip().splitlines()[-1] if stderr.strip() else "(no message)"
    for lead in ["Error: ", "error: "]:
        if line.startswith(lead):
            line = line[len(lead):]
    parts = line.split(": ")
    while len(parts) > 1 and ("/" in parts[0] or parts[0].startswith("cannot load the text")):
        parts = parts[1:]
    return ": ".join(parts)


def save(model, cfg, d, config_edit=None, flatten=False):
    os.makedirs(d, exist_ok=True)
    state = {k[len("text."):] if flatten and k.startswith("text.") else k:
             t.float().contiguous().clone() if t.is_floating_point() else t.contiguous().clone()
             for k, t in model.state_dict().items()}
    save_file(state, os.path.join(d, "open_clip_model.safetensors"))
    saved = copy.deepcopy(cfg)
    if config_edit:
        config_edit(saved)
    with open(os.path.join(d, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": saved, "preprocess_cfg": {}}, f)


def audit(name, cfg, prm, work, tok, config_edit=None, flatten=False):
    """('loaded', max |difference| or None, detail), ('refused', reason) or ('skipped', why).

    flatten: save a CustomTextCLIP's `text.*` under CLIP's names (`token_embedding.weight`, ...).
    """
    cfg = shrink(cfg)
    d = os.path.join(work, name)
    try:
        model = build_model(cfg)
    except Exception as e:  # open_clip itself cannot build it here
        return ("skipped", f"open_clip cannot build it here: {type(e).__name__}: {str(e)[:100]}")
    if flatten and not hasattr(model, "text"):
        return ("skipped", "no `text.*` tower to rename")
    save(model, cfg, d, config_edit, flatten)
    got, rc, err = prm_classes(prm, d, CLASS_NAMES)
    if rc == 2:
        return ("refused", reason_of(err))
    if rc != 0:
        return ("loaded", None, f"prm classes exited with status {rc}: {err[-300:]}")
    context = cfg["text_cfg"].get("context_length", 77)
    seqs = [token_ids(tok, TEMPLATE.format(n.strip()), context) for n in CLASS_NAMES]
    uncut = max(len(token_ids(tok, TEMPLATE.format(n.strip()), 10**6)) for n in CLASS_NAMES)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(padded(seqs, context)), dim=-1)
    ref = ref.numpy()
    if got.shape != ref.shape:
        return ("loaded", None, f"prm wrote {got.shape}, open_clip gives {ref.shape}")
    err_max = float(np.abs(got - ref).max())
    cos_min = float((got * ref).sum(-1).min())
    return ("loaded", err_max, f"max |difference| {err_max:.1e} (min cosine {cos_min:.9f}, "
            f"longest prompt {uncut} ids, cut to {context})")


def probe_ids(prm, work, tok, context):
    """The ids prm and open_clip feed their text towers, decoded from a probe tower's output.

    Residual stream of width W = 4c + 8 (c = context), one head of width 2 per position j < c:
      dims [0, c): the position, one-hot; dim W-1: −1 (so that every token has mean 0);
      dims 2c, 2c+1: cos θ, sin θ of the id (θ = 2π id / 1024), and 2c+2, 2c+3 their negatives;
      dims W-3, W-2: +1, −1 (two known values, to undo ln_final and the L2 normalisation).
    Every token has mean 0 and the same norm, so ln_1 is a constant scale. Head j's query is a
    constant, its key the position one-hot's dim j (logits 0 or ~500: it attends to position j
    alone when j is in the sequence), its value the id's (cos θ, sin θ), written by out_proj to
    dims 2c + 4 + 2j and the next. The MLP is zero; ln_final and the projection are the
    identity. Decoding: x_k = μ + u·z_k from the two known dims; the end-of-text position e is
    the one-hot of the pooled row; id_j = θ_j·1024/2π for j ≤ e.
    """
    c = context
    W = 4 * c + 8
    H = W // 2
    tokd, outd = 2 * c, lambda j: 2 * c + 4 + 2 * j  # noqa: E731
    assert outd(c - 1) + 1 < W - 3 and H >= c
    cfg = {"embed_dim": W, "vision_cfg": dict(TINY_VISION),
           "text_cfg": {"context_length": c, "vocab_size": VOCAB, "width": W, "heads": H,
                        "layers": 1, "mlp_ratio": 0.125}}
    torch.manual_seed(0)
    model = CLIP(**cfg).double().eval()
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    theta = 2 * math.pi * torch.arange(VOCAB, dtype=torch.float64) / 1024
    te = sd["token_embedding.weight"]
    te[:, tokd], te[:, tokd + 1], te[:, tokd + 2], te[:, tokd + 3] = (
        theta.cos(), theta.sin(), -theta.cos(), -theta.sin())
    te[:, W - 3], te[:, W - 2] = 1.0, -1.0
    pe = sd["positional_embedding"]
    pe[torch.arange(c), torch.arange(c)] = 1.0
    pe[:, W - 1] = -1.0
    for ln in ["transformer.resblocks.0.ln_1", "transformer.resblocks.0.ln_2", "ln_final"]:
        sd[ln + ".weight"] = torch.ones(W, dtype=torch.float64)
    b = "transformer.resblocks.0.attn."
    w, bias = sd[b + "in_proj_weight"], sd[b + "in_proj_bias"]
    out = sd[b + "out_proj.weight"]
    for j in range(c):
        bias[2 * j] = 100.0  # query
        w[W + 2 * j, j] = 1.0  # key: position j
        w[2 * W + 2 * j, tokd], w[2 * W + 2 * j + 1, tokd + 1] = 1.0, 1.0  # value: the id
        out[outd(j), 2 * j], out[outd(j) + 1, 2 * j + 1] = 1.0, 1.0
    sd["text_projection"] = torch.eye(W, dtype=torch.float64)
    model.load_state_dict(sd)
    d = os.path.join(work, f"probe-ids-{c}")
    save(model, cfg, d)

    def decode(z):
        u = 2.0 / (z[W - 3] - z[W - 2])
        x = 1.0 - u * z[W - 3] + u * z
        e = int(np.argmax(x[:c]))
        return [round(math.atan2(x[outd(j) + 1], x[outd(j)]) * 1024 / (2 * math.pi)) % 1024
                for j in range(e + 1)]

    seqs = [token_ids(tok, TEMPLATE.format(n.strip()), c) for n in CLASS_NAMES]
    got, rc, err = prm_classes(prm, d, CLASS_NAMES)
    if rc != 0:
        return False, f"prm classes failed on the probe (status {rc}): {err[-300:]}"
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(padded(seqs, c)), dim=-1).numpy()
    bad = []
    for n, s, g, r in zip(CLASS_NAMES, seqs, got, ref):
        if decode(r) != s:
            bad.append(f"probe decodes open_clip's ids wrongly for {n!r}: {decode(r)} vs {s}")
        if decode(g) != s:
            bad.append(f"prm's ids for {n!r}: {decode(g)}\n    Python's: {s}")
    lens = ", ".join(str(len(s)) for s in seqs)
    return not bad, ("\n  ".join(bad)
                     or f"ids equal ({len(seqs)} prompts of {lens} ids, context {c})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prm", default=os.path.join(ROOT, "target", "release", "prm"))
    p.add_argument("--work", default="/tmp/open_clip_text_audit")
    p.add_argument("--only", help="comma-separated model names")
    p.add_argument("--self-test", action="store_true")
    p.add_argument("--variants", action="store_true",
                   help="also ViT-B-16 with each text option of open_clip changed, one at a time")
    args = p.parse_args()
    tok = tokenizer()
    names = args.only.split(",") if args.only else open_clip.list_models()
    jobs = [(name, get_model_config(name)) for name in names]
    if args.variants:
        for label, edit in VARIANTS:
            cfg = copy.deepcopy(get_model_config("ViT-B-16"))
            edit(cfg)
            jobs.append((f"variant-ViT-B-16-{label}", cfg))
        # Every CustomTextCLIP / CoCa tower (stored as `text.*`, which prm does not look for)
        # once more under CLIP's names: what prm would do with it if it read `text.*`.
        for name in names:
            cfg = get_model_config(name)
            if cfg and (cfg.get("custom_text") or "multimodal_cfg" in cfg) \
                    and "hf_model_name" not in cfg["text_cfg"]:
                jobs.append((f"variant-{name}-text-renamed", cfg))
    loaded, refused, skipped, failed, worst = [], {}, [], [], (0.0, None)
    contexts = set()
    for name, cfg in jobs:
        if cfg is None:
            print(f"skipped {name}: open_clip has no such config")
            continue
        r = audit(name, cfg, args.prm, args.work, tok, flatten=name.endswith("-text-renamed"))
        if r[0] == "refused":
            refused.setdefault(r[1], []).append(name)
        elif r[0] == "skipped":
            skipped.append(f"{name}: {r[1]}")
        else:
            ok = r[1] is not None and r[1] < GATE
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {r[2]}", flush=True)
            (loaded if ok else failed).append(name)
            if ok and r[1] >= worst[0]:
                worst = (r[1], name)
            contexts.add(shrink(cfg)["text_cfg"].get("context_length", 77))
    for reason, models in sorted(refused.items(), key=lambda kv: -len(kv[1])):
        print(f"refused ({len(models)}): {reason}\n    {' '.join(models)}")
    for s in skipped:
        print("skipped", s)
    status = 1 if failed else 0
    for c in sorted(contexts or {77}):
        ok, detail = probe_ids(args.prm, args.work, tok, c)
        print(f"token ids {'ok' if ok else 'DIFFER'}: {detail}")
        status |= 0 if ok else 1
    variants = f" ({len(jobs) - len(names)} of them variants)" if args.variants else ""
    print(f"open_clip {open_clip.__version__}, {len(jobs)} configs{variants}: {len(loaded)} "
          f"loaded and exact (worst max "
          f"|difference| {worst[0]:.1e}{f', {worst[1]}' if worst[1] else ''}), {len(failed)} "
          f"loaded and wrong, {sum(len(m) for m in refused.values())} refused, "
          f"{len(skipped)} skipped")
    if failed:
        print("FAILED (prm loads these text towers and embeds the names differently from "
              "open_clip): " + " ".join(failed))
    if args.self_test:
        def wrong_activation(cfg):
            cfg["quick_gelu"] = not cfg.get("quick_gelu", False)

        def wrong_eps(cfg):
            cfg["text_cfg"]["norm_kwargs"] = {"eps": 1e-6}

        def exact_gelu(cfg):
            del cfg["text_cfg"]["act_kwargs"]
        vit_b_16 = get_model_config("ViT-B-16")
        tanh_gelu = copy.deepcopy(vit_b_16)
        tanh_gelu["text_cfg"]["act_kwargs"] = {"approximate": "tanh"}
        # The last: a tower with GELU's tanh approximation whose config says exact GELU (the two
        # GELUs differ by at most 4.7e-4, the smallest change of activation to catch).
        for what, cfg, edit in [("wrong activation", vit_b_16, wrong_activation),
                                ("wrong eps", vit_b_16, wrong_eps),
                                ("exact GELU for the tanh GELU", tanh_gelu, exact_gelu)]:
            r = audit(f"self-test-{what.replace(' ', '-')}-ViT-B-16", cfg,
                      args.prm, args.work, tok, config_edit=edit)
            caught = r[0] == "loaded" and (r[1] is None or r[1] >= GATE)
            print(f"self-test ({what} in the config): {'caught' if caught else 'NOT CAUGHT'} "
                  f"({r[-1]})")
            status |= 0 if caught else 1
    sys.exit(status)


if __name__ == "__main__":
    main()
