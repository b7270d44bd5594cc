#!/usr/bin/env python3
"""How well router keys separate an edit's rephrasings from its neighbours (exploration behind
`route_threshold`; see the README's "Routed edits").

A GPT-2 forward in numpy over the sample model (float64, no torch needed) gives the stream a site reads
(the MLP input `ln2` or attention input `ln1` of a block). For meta-training edits (never the held-out
ones) it takes each edit's keys — the subject's last token in its prompt, plus optional contexts of the
subject alone — whitens them with the key statistics of the module that reads the site, and reports for
a grid of cosine thresholds: the share of rephrasings that reach one of their edit's keys, the share of
locality prompts that reach any edit's key, and the share of held-out text lines that do.

    pip install numpy safetensors tokenizers
    python3 scripts/analysis/route_keys.py --keys prompt,alone,space --edits 300
"""
import argparse, json, random, pathlib
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2] / "samples"
ap = argparse.ArgumentParser()
ap.add_argument("--keys", default="prompt,alone,space", help="prompt, alone (subject as a text starts), space (' ' + subject)")
ap.add_argument("--edits", type=int, default=300, help="edits whose keys are stored (the first 300 are also probed)")
ap.add_argument("--layer", type=int, default=1)
ap.add_argument("--thresholds", default="0.6,0.65,0.7,0.75,0.8")
args = ap.parse_args()

W = load_file(str(ROOT / "model/model.safetensors"))
cfg = json.load(open(ROOT / "model/config.json"))
H, NH = cfg["n_embd"], cfg["n_head"]
tok = Tokenizer.from_file(str(ROOT / "model/tokenizer.json"))
enc = lambda t: tok.encode(t).ids

def g(n):
    return W[n] if n in W else W["transformer." + n]

def ln(x, w, b, eps=cfg["layer_norm_epsilon"]):
    m = x.mean(-1, keepdims=True); v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b

def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

def site(text):
    """The MLP input of block `layer` at every position of `text`."""
    ids = enc(text); T = len(ids)
    x = g("wte.weight")[ids].astype(np.float64) + g("wpe.weight")[:T]
    for l in range(args.layer + 1):
        p = f"h.{l}."
        a = ln(x, g(p + "ln_1.weight"), g(p + "ln_1.bias"))
        q, k, v = np.split(a @ g(p + "attn.c_attn.weight") + g(p + "attn.c_attn.bias"), 3, -1)
        hs = H // NH
        q, k, v = (t.reshape(T, NH, hs).transpose(1, 0, 2) for t in (q, k, v))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hs) + np.triu(np.full((T, T), -1e9), 1)
        s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
        x = x + (s @ v).transpose(1, 0, 2).reshape(T, H) @ g(p + "attn.c_proj.weight") + g(p + "attn.c_proj.bias")
        a2 = ln(x, g(p + "ln_2.weight"), g(p + "ln_2.bias"))
        if l == args.layer:
            return a2
        x = x + gelu(a2 @ g(p + "mlp.c_fc.weight") + g(p + "mlp.c_fc.bias")) @ g(p + "mlp.c_proj.weight") + g(p + "mlp.c_proj.bias")

C = load_file(str(ROOT / "editor/editor.safetensors"))[f"key_stats.transformer.h.{args.layer}.mlp.c_fc"].astype(np.float64)
ev, U = np.linalg.eigh(C + 1e-3 * np.trace(C) / len(C) * np.eye(len(C)))
white = (U / np.sqrt(ev)) @ U.T
unit = lambda x: (lambda y: y / np.linalg.norm(y, axis=-1, keepdims=True))(x @ white)

rows = [json.loads(l) for l in open(ROOT / "dafset/train.jsonl")]
random.seed(0); random.shuffle(rows)
keys, owner, rephrase, locality = [], [], [], []
for r in rows[:args.edits]:
    at = r["prompt"].find(r["subject"])
    if at < 0:
        continue
    probe = len(rephrase) if len(rephrase) < 300 else -1
    contexts = {"prompt": (r["prompt"], len(enc(r["prompt"][:at + len(r["subject"])])) - 1),
                "alone": (r["subject"], -1), "space": (" " + r["subject"], -1)}
    for name in args.keys.split(","):
        text, pos = contexts[name]
        keys.append(site(text)[pos]); owner.append(probe)
    if probe >= 0:
        rephrase.append(site(r["rephrase_prompt"][0])); locality.append(site(r["locality_prompt"]))
lines = [l for l in open(ROOT / "world/heldout_text.txt").read().splitlines() if l.strip()][:100]
K, owner = unit(np.stack(keys)), np.array(owner)
hit = np.array([(unit(x) @ K[owner == i].T).max() for i, x in enumerate(rephrase)])
false = np.array([(unit(x) @ K.T).max() for x in locality])
text = np.array([(unit(site(l)) @ K.T).max() for l in lines])
print(f"keys {args.keys}: {len(K)} keys of {args.edits} edits, {len(hit)} probed")
for t in map(float, args.thresholds.split(",")):
    print(f"  cosine {t:.2f}: rephrasings routed {np.mean(hit >= t):.2f}  neighbours routed {np.mean(false >= t):.2f}  "
          f"text lines routed {np.mean(text >= t):.2f}")
