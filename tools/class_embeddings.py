#!/usr/bin/env python3
"""Class embeddings for `prm eval --classes FILE.safetensors` from a text tower prm does not build.

`prm classes` embeds class names with CLIP's text tower. SigLIP's text tower (and CLIPA's, which
is BERT-style) is not built in prm, but prm builds their image embeddings, so their zero-shot
target needs the class embeddings from elsewhere. This script computes them with transformers
(`get_text_features` of a `SiglipModel`, `CLIPModel`, or any model that has it) and writes the
file `prm eval --target zeroshot --classes` reads:

  - tensor `class_embeddings` [C, E] f32, each row the L2-normalised mean of the L2-normalised
    embeddings of the class's prompts (the prompt ensemble `prm classes` forms);
  - metadata `names` (a JSON array, in the order of the names file) and `source` (what made it).

SigLIP's text tower was trained on text padded to its full length (64 tokens) and reads the
last position, so SigLIP prompts are padded to `max_length`, as its processor does; other models
pad to the longest prompt with an attention mask. prm compares a file's embeddings with the image
embedding by cosine, so SigLIP's logit scale and bias, which change no ranking, are not applied.

Usage (from the repository root, in the tools venv: tools/golden/requirements.txt):
  tools/.venv/bin/python tools/class_embeddings.py --model google/siglip-base-patch16-224 \\
      --names names.txt --output classes.safetensors [--templates assets/prompt_templates.txt |
      --single-template] [--tokenizer DIR] [--batch 256]
`--model` is a local directory or a hub id in the local cache (HF_HUB_OFFLINE=1 works).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def prompts_for(name: str, templates: list[str]) -> list[str]:
    return [t.replace("{}", name) for t in templates]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="transformers model directory or hub id")
    ap.add_argument("--names", required=True, help="one class name per line")
    ap.add_argument("--output", required=True, help="the .safetensors file to write")
    ap.add_argument("--templates", default=os.path.join(ROOT, "assets", "prompt_templates.txt"),
                    help="prompt templates, `{}` standing for the name (default: prm's 80)")
    ap.add_argument("--single-template", action="store_true",
                    help='one prompt per class, "a photo of a {}."')
    ap.add_argument("--tokenizer", help="tokenizer directory, when the model's has none")
    ap.add_argument("--batch", type=int, default=256, help="prompts per forward")
    args = ap.parse_args()
    if not args.output.endswith(".safetensors"):
        ap.error("--output must end in .safetensors (prm reads --classes files by extension)")

    from transformers import AutoModel, AutoTokenizer

    names = read_lines(args.names)
    if not names:
        ap.error(f"{args.names} names no class")
    if len(set(names)) != len(names):
        ap.error(f"{args.names} names a class twice; give each class its own name")
    templates = ["a photo of a {}."] if args.single_template else read_lines(args.templates)
    if not templates or any("{}" not in t for t in templates):
        ap.error("every template must hold `{}`, where the class name goes")

    model = AutoModel.from_pretrained(args.model).eval()
    if not hasattr(model, "get_text_features"):
        ap.error(f"{type(model).__name__} has no text tower (`get_text_features`)")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    siglip = getattr(model.config, "model_type", "").startswith("siglip")
    if siglip:
        length = model.config.text_config.max_position_embeddings
        pad = dict(padding="max_length", max_length=length, truncation=True)
    else:
        pad = dict(padding=True, truncation=True)

    rows = []
    with torch.no_grad():
        for name in names:
            prompts = prompts_for(name, templates)
            parts = []
            for i in range(0, len(prompts), args.batch):
                tokens = tokenizer(prompts[i:i + args.batch], return_tensors="pt", **pad)
                if siglip:  # SigLIP attends to every position, padding included
                    tokens.pop("attention_mask", None)
                out = model.get_text_features(**tokens)
                out = getattr(out, "pooler_output", out)  # transformers 5 returns an output object
                parts.append(out.double())
            e = torch.nn.functional.normalize(torch.cat(parts), dim=-1).mean(0)
            rows.append(torch.nn.functional.normalize(e, dim=0))
    emb = torch.stack(rows).float().contiguous()

    source = (f"tools/class_embeddings.py --model {args.model}, {len(templates)} template(s), "
              f"{type(model).__name__}")
    meta = {"names": json.dumps(names), "source": source}
    # Written beside the output, then renamed: an interrupted run leaves no half-written file.
    out_dir = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(suffix=".safetensors.tmp", dir=out_dir)
    os.close(fd)
    try:
        save_file({"class_embeddings": emb}, tmp, metadata=meta)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.output}: {emb.shape[0]} classes of dimension {emb.shape[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
