"""Probe what a text run learned: kNN and linear probes on frozen, mean-pooled features, against random init.

    python bench/probe_text.py runs/demo/text_tiny/checkpoints/step_00000200

Labelled held-out text: the docstrings (modules, classes, functions, methods) of 8 standard-library
packages the demo corpus does not contain, labelled by package; sentences the model never trained on,
tokenised with the run's sentencepiece model (from its manifest) and cut to the model's positions. For
each encoder (the run's teacher and student, a fresh random init as the presets declare it, and the
random init with N(0, 1) positions that zero.Init used to leave), features are the mean over non-pad
tokens of the final layer. Probes: cosine kNN (k=10) and a logistic-regression linear probe, each on 5
stratified 50/50 splits; also the share of the token features' variance that position alone explains
over the first 32 tokens (a model collapsed to position is near 100%). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PACKAGES = ("asyncio", "email", "xml", "multiprocessing", "importlib", "concurrent", "sqlite3", "ctypes")


def package_docs(package: str) -> list[str]:
    """Docstrings of a package's modules and of the classes, functions and methods defined there."""
    import pkgutil
    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(getattr(root, "__path__", []), package + ".")
                         if "test" not in m.name and "__main__" not in m.name]
    docs = set()
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:  # optional submodules (platform-specific) may not import
            continue
        objs = [module]
        for value in vars(module).values():
            if getattr(value, "__module__", None) == name and (inspect.isclass(value) or inspect.isfunction(value)):
                objs.append(value)
                if inspect.isclass(value):
                    objs.extend(v for v in vars(value).values() if inspect.isfunction(v))
        for obj in objs:
            text = inspect.getdoc(obj)
            if text and len(text) > 40:
                docs.add(" ".join(text.split()))
    return sorted(docs)


def labelled_docs(per_class: int, seed: int) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for label, package in enumerate(PACKAGES):
        docs = package_docs(package)
        random.Random(seed).shuffle(docs)
        texts += docs[:per_class]
        labels += [label] * len(docs[:per_class])
    return texts, labels


def tokenize(texts: list[str], spm_path: Path, length: int, pad_id: int) -> torch.Tensor:
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    rows = []
    for ids in sp.encode(texts):
        ids = ids[:length]
        rows.append(ids + [pad_id] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def build_backbone(cfg, weights: dict | None, seed: int, unit_positions: bool = False):
    from pipeline.distributed import model_parallel_config
    from pipeline.model.data2vec import Backbone
    torch.manual_seed(seed)
    model = Backbone(cfg.make_modality(), cfg.encoder, model_parallel_config(1))
    if weights is not None:
        model.load_state_dict(weights)
    if unit_positions:  # what zero.Init left before the fix: PyTorch's N(0, 1) default
        torch.nn.init.normal_(model.embed.positions.weight)
    return model.eval()


@torch.no_grad()
def features(model, tokens: torch.Tensor, pad_id: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mean-pooled final features (N, D), final token features (N, T, D))."""
    pooled, per_token = [], []
    for i in range(0, len(tokens), batch):
        x = tokens[i:i + batch]
        final, _ = model.encode({"tokens": x}, None, keep=0)  # (B, T, D)
        keep = x.ne(pad_id).unsqueeze(-1).float()
        pooled.append((final * keep).sum(1) / keep.sum(1).clamp_min(1))
        per_token.append(final)
    return torch.cat(pooled), torch.cat(per_token)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 10) -> float:
    sims = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    votes = train_y[sims.topk(k, dim=1).indices]  # (N_test, k)
    pred = torch.mode(votes, dim=1).values
    return (pred == test_y).float().mean().item()


def linear_accuracy(train_x, train_y, test_x, test_y, classes: int, steps: int = 300) -> float:
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    layer = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(a), train_y) + 1e-3 * layer.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return (layer(b).argmax(1) == test_y).float().mean().item()


def position_share(per_token: torch.Tensor, tokens: torch.Tensor, pad_id: int, window: int = 32) -> float:
    """Share of the token features' variance explained by position (over rows with no pad in the window)."""
    rows = tokens[:, :window].ne(pad_id).all(1)
    x = per_token[rows, :window].double()  # (N, W, D)
    total = (x - x.mean((0, 1))).pow(2).sum()
    between = (x.mean(0, keepdim=True) - x.mean((0, 1))).pow(2).sum() * x.shape[0]
    return (between / total).item()


def probe(name: str, model, tokens, labels, pad_id: int, splits: int = 5) -> dict:
    pooled, per_token = features(model, tokens, pad_id)
    y = torch.tensor(labels)
    knn, lin = [], []
    for s in range(splits):
        gen = torch.Generator().manual_seed(s)
        train, test = [], []
        for c in y.unique():
            idx = (y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            train += idx[: len(idx) // 2].tolist()
            test += idx[len(idx) // 2:].tolist()
        train, test = torch.tensor(train), torch.tensor(test)
        knn.append(knn_accuracy(pooled[train], y[train], pooled[test], y[test]))
        lin.append(linear_accuracy(pooled[train], y[train], pooled[test], y[test], len(PACKAGES)))
    row = {"encoder": name, "knn": sum(knn) / splits, "linear": sum(lin) / splits,
           "position_share": position_share(per_token, tokens, pad_id)}
    print(f"{name:>32}  kNN {row['knn']:.3f}  linear {row['linear']:.3f}  position share {row['position_share']:.2f}")
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a complete checkpoint directory of a text run")
    parser.add_argument("--per-class", type=int, default=150, help="docstrings per package (class)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from data_prep.core import read_manifest
    from pipeline.distributed import single_process_parallel_state
    from pipeline.experiment import build_experiment
    from pipeline.export import consolidated
    torch.set_num_threads(2)
    single_process_parallel_state()

    exported = consolidated(Path(args.checkpoint))
    cfg = build_experiment(exported["config"])
    manifest = read_manifest(cfg.data.manifest)
    spm = Path(manifest["dir"]) / "spm.model"
    texts, labels = labelled_docs(args.per_class, args.seed)
    pad = cfg.model.pad_id
    tokens = tokenize(texts, spm, cfg.model.max_positions, pad)
    print(f"{len(texts)} held-out docstrings in {len(PACKAGES)} classes ({', '.join(PACKAGES)}); "
          f"majority class {max(labels.count(c) for c in set(labels)) / len(labels):.3f}")
    strip = len("backbone.")
    rows = [
        probe(f"teacher, step {exported['step']}", build_backbone(cfg, exported["teacher"], 0), tokens, labels, pad),
        probe(f"student, step {exported['step']}", build_backbone(
            cfg, {k[strip:]: v for k, v in exported["student"].items() if k.startswith("backbone.")}, 0),
            tokens, labels, pad),
        probe("random init (declared)", build_backbone(cfg, None, args.seed), tokens, labels, pad),
        probe("random init, N(0,1) positions", build_backbone(cfg, None, args.seed, unit_positions=True),
              tokens, labels, pad),
    ]
    result = {"checkpoint": args.checkpoint, "step": exported["step"], "samples": len(texts), "probes": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
