"""Probes of frozen features: kNN (DINO's weighted vote) and a linear probe (logistic regression).

Plain torch on (N, D) float features and (N,) int labels; nothing here talks to the cluster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07) -> float:
    """DINO's kNN monitor: cosine similarity to the k nearest training features, each neighbour voting for
    its class with weight exp(similarity / temperature); top-1 accuracy of the heaviest class."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    return (knn_predict(train_x, train_y, test_x, classes, k, temperature) == test_y).float().mean().item()


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, classes: int, k: int = 20,
                temperature: float = 0.07) -> torch.Tensor:
    """(N_test,) classes voted by each test feature's k nearest training features (see knn_top1)."""
    sims = F.normalize(test_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T  # (N_test, N_train)
    top, index = sims.topk(min(k, train_x.shape[0]), dim=1)
    votes = torch.zeros(test_x.shape[0], classes, device=sims.device)
    return votes.scatter_add_(1, train_y[index], (top / temperature).exp()).argmax(1)


def standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per dimension, with the training set's statistics."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train_x, *others)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, steps: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression with an L2 penalty on the weights, fitted by L-BFGS from zero weights (a
    convex problem: no random start, so the fit draws nothing from the RNG and is the same in every process)."""
    layer = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], classes)  # no default init: no RNG draw
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return layer


def folds(y: torch.Tensor, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Stratified fold assignment: indices of each fold, every class spread over the folds."""
    gen = torch.Generator().manual_seed(seed)
    parts = [[] for _ in range(count)]
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        for i, j in enumerate(idx[torch.randperm(len(idx), generator=gen)].tolist()):
            parts[i % count].append(j)
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts if p]


L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def choose_l2(x: torch.Tensor, y: torch.Tensor, classes: int, grid=L2_GRID, count: int = 5) -> float:
    """The L2 penalty with the best mean accuracy over stratified cross-validation folds of the training set."""
    return best_l2(cv_correct(x, y, classes, grid, count), grid)


def cv_correct(x: torch.Tensor, y: torch.Tensor, classes: int, grid=L2_GRID, count: int = 5,
               share: tuple[int, int] = (0, 1)) -> torch.Tensor | None:
    """(len(grid),) held-out predictions that were right, summed over the stratified folds, per L2 penalty; None
    when a class is too rare for two folds. ``share`` = (i, n): only the (penalty, fold) fits numbered i, i + n, ...
    (the others count 0), so that n processes can each fit a share and sum their counts."""
    parts = folds(y, min(count, int(torch.bincount(y).min().item())) if len(y) else 1)
    if len(parts) < 2:
        return None
    correct = torch.zeros(len(grid), dtype=torch.float64)
    fits = [(g, held) for g in range(len(grid)) for held in parts]
    for g, held in fits[share[0]::share[1]]:
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[held] = False
        a, b = standardise(x[keep], x[held])
        layer = fit_logistic(a, y[keep], classes, grid[g])
        with torch.no_grad():
            correct[g] += (layer(b).argmax(1) == y[held]).sum().item()
    return correct


def best_l2(correct: torch.Tensor | None, grid=L2_GRID) -> float:
    """The penalty of the most correct predictions (the smaller on a tie); the middle one without folds."""
    if correct is None:
        return grid[len(grid) // 2]
    return grid[max(range(len(grid)), key=lambda i: (float(correct[i]), -i))]


def linear_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                l2: float | None = None) -> dict:
    """Logistic regression on standardised frozen features, its L2 penalty (unless given) chosen by cross-validation
    on the training split only. -> {"top1", "l2"}."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    if l2 is None:
        l2 = choose_l2(train_x.float(), train_y, classes)
    a, b = standardise(train_x.float(), test_x.float())
    with torch.no_grad():
        pred = fit_logistic(a, train_y, classes, l2)(b).argmax(1)
    return {"top1": (pred == test_y).float().mean().item(), "l2": l2}
