#!/usr/bin/env python3
"""Convert a PyTorch CLIP checkpoint (.pt / .pth / .bin / .ckpt) into a .safetensors file prm reads.

prm reads safetensors only: a pickle can run code when it is loaded. This runs once, on a
machine with PyTorch, and writes every tensor of the checkpoint under its own name:

    python tools/to_safetensors.py ViT-B-16.pt ViT-B-16.safetensors
    python tools/to_safetensors.py open_clip_pytorch_model.bin open_clip_model.safetensors

It reads
  - TorchScript archives (OpenAI's original CLIP `.pt` files), through torch.jit.load;
  - torch.save files holding a state dict (Hugging Face `pytorch_model.bin`, open_clip's
    `open_clip_pytorch_model.bin`), with `weights_only=True`, so no code in the file runs; a
    dict that wraps the state dict under `state_dict` (training checkpoints) is unwrapped.
Tensors keep their dtype (prm reads F32, F16, BF16 and F64); entries that are not tensors
(an epoch count, optimiser settings) are left out and listed.

The activation is not in the tensors: prm takes it from the JSON files beside the checkpoint.
OpenAI naming (`visual.*`) means QuickGELU unless an `open_clip_config.json` says otherwise, and
most open_clip models not trained by OpenAI use GELU, so copy the model's `open_clip_config.json`
(or `config.json` for Hugging Face) next to the output. `prm info --model OUT` shows what was
understood.

The output is written to a temporary file beside it and renamed, so an interrupted conversion
never leaves a partial file under the name asked for.
"""

import argparse
import os
import sys
import tempfile
import zipfile


def is_torchscript(path):
    """TorchScript archives hold code/ and constants.pkl; torch.save archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def load_state_dict(path):
    import torch

    if is_torchscript(path):
        return torch.jit.load(path, map_location="cpu").state_dict(), "TorchScript archive"
    obj = torch.load(path, map_location="cpu", weights_only=True)
    kind = "torch.save file"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, kind = obj["state_dict"], "torch.save file (under `state_dict`)"
    if not isinstance(obj, dict):
        sys.exit(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return obj, kind


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="a PyTorch checkpoint: .pt, .pth, .bin or .ckpt")
    p.add_argument("output", help="the .safetensors file to write")
    args = p.parse_args()

    import torch
    from safetensors.torch import save_file

    state, kind = load_state_dict(args.input)
    tensors, skipped = {}, []
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            # save_file refuses tensors that share storage (tied or sliced weights): give every
            # tensor its own contiguous copy.
            tensors[name] = value.detach().contiguous().clone()
        else:
            skipped.append(name)
    if not tensors:
        sys.exit(f"{args.input}: no tensors found")

    out_dir = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".to_safetensors-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "converted_from": os.path.basename(args.input)})
        os.replace(tmp, args.output)
    except BaseException:
        os.unlink(tmp)
        raise

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    print(f"{args.output}: {len(tensors)} tensors ({', '.join(dtypes)}) from a {kind}")
    if skipped:
        print(f"left out {len(skipped)} entries that are not tensors: {', '.join(skipped[:8])}"
              + (" ..." if len(skipped) > 8 else ""))
    names = list(tensors)
    if any(n.startswith("visual.") or ".visual." in n for n in names):
        print("OpenAI/open_clip naming (visual.*): prm assumes QuickGELU unless an "
              "open_clip_config.json beside the file says otherwise; copy the model's own "
              "open_clip_config.json there for open_clip models not trained by OpenAI")
    elif not any("vision_model." in n for n in names):
        print("warning: no vision tower names (visual.* or vision_model.*) found; prm will not "
              "recognise this checkpoint", file=sys.stderr)


if __name__ == "__main__":
    main()
