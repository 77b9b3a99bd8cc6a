"""A bfloat16 cross-batch memory against a float32 one, on the digits retrieval task of train_digits.py.

Two trainings from the same initial weights on the same P x K batches, each with
`ms_fused.CrossBatchMemory(memory_size, 32, dtype=...)`: one with a float32 memory, one with a bfloat16 memory
(half the bytes). Reported: Recall@K on the unseen classes, the training loss curves, and, at every step of the
float32 run, the loss of the same embeddings against a bfloat16 copy of its memory (the memory's rounding
alone, apart from any divergence of the two trainings).

    python examples/xbm_digits.py --readme README.md   # examples/results/xbm_digits.md, and its summary in the README
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import KS, RESULTS_DIR, embedding_net, load_split, pk_batches, recall_at_k  # noqa: E402

import ms_fused  # noqa: E402

MARK_START, MARK_END = "<!-- xbm_digits -->", "<!-- /xbm_digits -->"


def train(net, xbm, x, y, batches, lr, shadow=None):
    """Adam on xbm(net(x), y); per step the loss and, with `shadow` (another memory fed the same rows), the
    shadow's loss on the very same embeddings."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    curve, shadow_curve = [], []
    for idx in batches:
        emb = net(x[idx])
        loss = xbm(emb, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
        if shadow is not None:
            with torch.no_grad():
                shadow_curve.append(float(shadow(emb.detach(), y[idx])))
    return curve, shadow_curve


def run_seed(seed, args, data):
    train_x, train_y, test_x, test_y = data
    batches = pk_batches(train_y, args.p, args.k, args.steps, seed)
    net32 = embedding_net(seed, torch.float32)
    net16 = copy.deepcopy(net32)
    memory = lambda dtype: ms_fused.CrossBatchMemory(args.memory, 32, dtype=dtype)  # noqa: E731
    curve32, same_emb16 = train(net32, memory(torch.float32), train_x, train_y, batches, args.lr,
                                shadow=memory(torch.bfloat16))
    curve16, _ = train(net16, memory(torch.bfloat16), train_x, train_y, batches, args.lr)
    with torch.no_grad():
        recall32, recall16 = recall_at_k(net32(test_x), test_y), recall_at_k(net16(test_x), test_y)
    a, b = np.asarray(curve32), np.asarray(same_emb16)
    return dict(seed=seed, recall32=recall32, recall16=recall16, curve32=curve32, curve16=curve16,
                same_emb_diff=float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30))))


def summary(runs, args, command):
    mean = lambda key: {k: float(np.mean([r[key][k] for r in runs])) for k in KS}  # noqa: E731
    r32, r16 = mean("recall32"), mean("recall16")
    seeds = "seed 0" if len(runs) == 1 else f"mean of seeds 0-{len(runs) - 1}"
    lines = [
        f"Produced by `{command}`: {args.steps} steps of {args.p}x{args.k} P×K batches on digits 0-4, float32 "
        f"network, `CrossBatchMemory({args.memory}, 32, dtype=...)`, Adam lr={args.lr}, {seeds}; Recall@K among "
        f"the unseen digits 5-9.",
        "",
        "| memory | bytes | " + " | ".join(f"R@{k}" for k in KS) + " |",
        "|---|---|" + "---|" * len(KS),
        f"| float32 | {args.memory * 32 * 4} | " + " | ".join(f"{r32[k]:.4f}" for k in KS) + " |",
        f"| bfloat16 | {args.memory * 32 * 2} | " + " | ".join(f"{r16[k]:.4f}" for k in KS) + " |",
        "| bfloat16 − float32 | | " + " | ".join(f"{r16[k] - r32[k]:+.4f}" for k in KS) + " |",
        "",
        "| seed | training loss, float32 memory: first → last | bfloat16 memory: first → last | same embeddings "
        "against a bfloat16 copy of the memory: largest relative loss difference over the steps |",
        "|---|---|---|---|",
        *[f"| {r['seed']} | {r['curve32'][0]:.4f} → {r['curve32'][-1]:.4f} | {r['curve16'][0]:.4f} → "
          f"{r['curve16'][-1]:.4f} | {r['same_emb_diff']:.1e} |" for r in runs],
    ]
    return lines


def replace_block(path, lines):
    with open(path) as f:
        text = f.read()
    if MARK_START not in text or MARK_END not in text:
        raise SystemExit(f"{path} has no '{MARK_START}' ... '{MARK_END}' block")
    head, rest = text.split(MARK_START, 1)
    tail = rest.split(MARK_END, 1)[1]
    with open(path, "w") as f:
        f.write(head + MARK_START + "\n".join([""] + lines + [""]) + MARK_END + tail)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--memory", type=int, default=400, help="memory rows")
    parser.add_argument("--p", type=int, default=5)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--results", default=os.path.join(RESULTS_DIR, "xbm_digits.md"), help="'' for none")
    parser.add_argument("--readme", default=None, help="also write the summary into this README's block")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_split(torch.float32)
    runs = [run_seed(seed, args, data) for seed in range(args.seeds)]
    command = " ".join(["python examples/xbm_digits.py", *(sys.argv[1:] if argv is None else argv)])
    lines = summary(runs, args, command)
    print("\n".join(lines))
    print(f"# {time.perf_counter() - start:.1f} s")
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.readme:
        replace_block(args.readme, lines)
    return runs


if __name__ == "__main__":
    main()
