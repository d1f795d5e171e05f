#!/usr/bin/env python3
"""Baselines side by side: attack the same images with prm, nrd, dr, embed and uniform random
noise of the same eps, evaluate every attack on one or more targets with `prm eval`, and write
one table (rows: attacks, columns: targets, cells: the metric drop) as Markdown and JSON.

Standard library only. Example (bundled samples, built-in random model: the numbers only
exercise the pipeline, random weights say nothing about real transfer):

    python3 scripts/compare.py --prm target/release/prm --surrogate random:tiny \
        --target-model random:tiny --classes names.txt --input samples --out out/compare \
        --targets maskclip,sclip,clearclip -- --preset pgd --steps 10

Everything after `--` is passed to every `prm attack` (preset, steps, eps, device, ...).
Uniform noise is `prm attack --preset pgd --init random --steps 1 --step-size 1e-9`: the
seeded signed-uniform start in the eps-ball, re-projected and quantised (the one 1e-9 step
vanishes in the 8-bit rounding). Its eps is taken from the passed arguments (default 8/255).

Cell value: 100 * (1 - miou_adv_vs_clean) for dense targets, 100 * (1 - top1_agreement) for
zeroshot, 100 * (1 - mean last-layer cosine) for features: how much the attack changed the
target's output relative to the clean image. Higher means stronger transfer.
"""

import argparse
import json
import os
import subprocess
import sys

ATTACKS = ["prm", "nrd", "dr", "embed", "uniform"]


def run(cmd):
    print("+", " ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd)
    if r.returncode not in (0, 1):
        sys.exit(f"command failed with exit code {r.returncode}")


def drop(report, target):
    if target in ("maskclip", "sclip", "clearclip"):
        v = report.get("miou_adv_vs_clean")
    elif target == "zeroshot":
        v = report.get("top1_agreement")
    else:
        layers = report.get("layers") or []
        v = layers[-1]["cosine"] if layers else None
    return None if v is None else 100.0 * (1.0 - v)


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prm", default="prm")
    ap.add_argument("--surrogate", required=True, help="model the attacks are crafted on")
    ap.add_argument("--target-model", action="append", required=True,
                    help="model(s) the targets are built on (repeat for several)")
    ap.add_argument("--classes", help="--classes for prm eval")
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--targets", default="maskclip")
    ap.add_argument("--eval-device", default="auto")
    a = ap.parse_args(argv)
    targets = a.targets.split(",")
    eps = "8/255"
    for i, x in enumerate(extra):
        if x == "--eps" and i + 1 < len(extra):
            eps = extra[i + 1]
    os.makedirs(a.out, exist_ok=True)
    table = {}
    for attack in ATTACKS:
        adv = os.path.join(a.out, "adv", attack)
        if attack == "uniform":
            cmd = [a.prm, "attack", "--model", a.surrogate, "--input", a.input, "--output", adv,
                   "--preset", "pgd", "--init", "random", "--steps", "1", "--step-size", "1e-9",
                   "--eps", eps, "-q"]
        else:
            cmd = [a.prm, "attack", "--model", a.surrogate, "--input", a.input, "--output", adv,
                   "--loss", attack, "-q"] + extra
        run(cmd)
        row = {}
        for m in a.target_model:
            for t in targets:
                rep = os.path.join(a.out, "reports", attack, f"{m.replace('/', '_').replace(':', '_')}-{t}.json")
                cmd = [a.prm, "eval", "--model", m, "--target", t, "--clean", a.input, "--adv", adv,
                       "--report", rep, "--device", a.eval_device, "-q"]
                if a.classes and t in ("maskclip", "sclip", "clearclip", "zeroshot"):
                    cmd += ["--classes", a.classes]
                run(cmd)
                with open(rep) as f:
                    row[f"{t} @ {m}"] = drop(json.load(f), t)
        table[attack] = row
    cols = list(next(iter(table.values())).keys())
    md = ["| attack | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for attack, row in table.items():
        md.append(f"| {attack} | " + " | ".join("–" if row[c] is None else f"{row[c]:.2f}" for c in cols) + " |")
    note = ("Cells: drop in %, 100·(1 − agreement of the adversarial with the clean output); "
            f"surrogate `{a.surrogate}`, eps {eps}.")
    with open(os.path.join(a.out, "compare.md"), "w") as f:
        f.write("\n".join(md) + "\n\n" + note + "\n")
    with open(os.path.join(a.out, "compare.json"), "w") as f:
        json.dump({"surrogate": a.surrogate, "eps": eps, "extra_attack_args": extra, "table": table}, f, indent=2)
    print("\n".join(md))
    print(note)


if __name__ == "__main__":
    main()
