#!/usr/bin/env python3
"""Device time of one attack by kind of work, for prm and PyTorch side by side (issue 4).

Where prm's attack is slower or faster than PyTorch's, this says in which kind of work: the
products, attention's forward or backward, LayerNorm, the activation, the loss, and so on.

    python3 tools/kernel_groups.py LABEL=FILE [LABEL=FILE ...]

Each FILE is one whole attack's device work, in either form:
  - prm's device timeline (`prm bench --timeline FILE`, a Chrome trace: every device operation
    with its duration);
  - tools/torch_prm.py's kernel table (`--kernels FILE`: every CUDA kernel, copy and fill of one
    profiled attack, by name, with calls and total microseconds).

Prints one row per group and one column per LABEL, in milliseconds of device time per attack,
then each group's largest kernels per column, so an unexpected name in "other" shows itself.
Names are sorted into groups by the patterns in GROUPS (first match wins); PyTorch's fused
Triton kernels are sorted by the operations their names carry.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict

# (group, pattern on the lower-cased name). Attention before products: the memory-efficient
# kernels are named `fmha_cutlass...`. Order matters; the first match wins.
GROUPS = [
    ("attention backward", r"attention_bwd|attention_delta|flash_bwd|fmha_cutlassb|sdpa.*bprop|"
                           r"attention.*backward|dot_do_o"),
    ("attention forward", r"attention|flash|fmha|sdpa"),
    # Before the products: cuDNN's convolutions are `..._implicit_gemm` kernels.
    ("patch embedding", r"embed|conv(?!ert)|im2col|col2im|fprop_implicit|dgrad|wgrad"),
    ("products (GEMM)", r"^product|gemm|nvjet|xmma|cutlass|cublas|splitkreduce|\baddmm|\bmm_"),
    ("LayerNorm", r"layernorm|layer_norm"),
    ("activation (QuickGELU)", r"activation|sigmoid|gelu"),
    ("loss (cosine)", r"loss|cosine|vector_norm|clamp_min"),
    ("update and start", r"prm_update|\bsign|clamp|minimum|maximum|uniform|\brand|philox"),
    ("copies and fills", r"memcpy|memset|upload|download|copy|fill|\bcast|convert"),
]
OTHER = "other"


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return OTHER


def read(path: str) -> dict[str, tuple[int, float]]:
    """Kernel name → (calls, total µs) of one attack, from either file form."""
    with open(path) as f:
        doc = json.load(f)
    table: dict[str, list] = defaultdict(lambda: [0, 0.0])
    if isinstance(doc, dict) and "traceEvents" in doc:
        # prm's timeline: complete events ("X") are device operations; metadata is "M".
        for e in doc["traceEvents"]:
            if e.get("ph") == "X" and "dur" in e:
                row = table[e["name"]]
                row[0] += 1
                row[1] += float(e["dur"])
    elif isinstance(doc, dict) and "kernels" in doc:
        for k in doc["kernels"]:
            row = table[k["name"]]
            row[0] += int(k["calls"])
            row[1] += float(k["us"])
    else:
        raise SystemExit(f"{path}: neither a prm timeline nor a torch_prm.py kernel table")
    return {name: (calls, us) for name, (calls, us) in table.items()}


def short(name: str, width: int = 64) -> str:
    """A kernel name without its template arguments, cut to width. PyTorch's generic
    elementwise and reduction kernels keep the operation they run (their functor), in
    brackets, since it lives in the template arguments."""
    depth, out = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">" and depth > 0:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    text = "".join(out).strip() or name
    text = re.sub(r"^void |at::native::|\(anonymous namespace\)::|pytorch_flash::", "", text)
    if re.search(r"elementwise_kernel|reduce_kernel", text):
        ops = []
        for op in re.findall(r"(\w+_kernel_cuda|\w+Functor|\w+Ops)\b", name):
            if op not in ops:
                ops.append(op)
        if ops:
            text = f"{text.split('(')[0]} [{', '.join(ops[:2])}]"
    return text if len(text) <= width else text[: width - 1] + "…"


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    columns = []
    for arg in argv:
        label, path = arg.split("=", 1)
        try:
            columns.append((label, read(path)))
        except (OSError, ValueError) as e:
            print(f"{label}: cannot read {path}: {e}", file=sys.stderr)
    if not columns:
        return 1
    order = [g for g, _ in GROUPS] + [OTHER]
    sums = []
    for _, table in columns:
        per_group = defaultdict(float)
        for name, (_, us) in table.items():
            per_group[group_of(name)] += us
        sums.append(per_group)
    width = max(12, *(len(label) for label, _ in columns))
    print(f"{'ms of device time per attack':<26}" + "".join(f"{label:>{width + 2}}" for label, _ in columns))
    for group in order:
        if all(s.get(group, 0.0) == 0.0 for s in sums):
            continue
        print(f"{group:<26}" + "".join(f"{s.get(group, 0.0) / 1e3:>{width + 2}.2f}" for s in sums))
    print(f"{'total':<26}" + "".join(f"{sum(s.values()) / 1e3:>{width + 2}.2f}" for s in sums))
    print()
    print("largest kernels by group (ms, calls):")
    for (label, table), _ in zip(columns, sums):
        print(f"  {label}")
        by_group = defaultdict(list)
        for name, (calls, us) in table.items():
            by_group[group_of(name)].append((us, calls, name))
        for group in order:
            rows = sorted(by_group.get(group, []), reverse=True)[:3]
            for us, calls, name in rows:
                print(f"    {group:<24} {us / 1e3:8.2f} {calls:6d}  {short(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
