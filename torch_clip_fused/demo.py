"""``make demo``: a short real training run on scikit-learn's bundled digits (no download),
comparing torch.optim.SGD with ClippedSGD under several clipping types."""

from __future__ import annotations

import time

import torch

from .clipped_sgd import ClippedSGD

DEMO_TYPES = ["no_clip", "norm", "layer_wise", "coordinate_wise", "auto_clip", "linear_rand_norm",
              "quadratic_rand_autoclip"]


def load_digits_tensors(seed: int = 0):
    """Digits (8x8 images, 10 classes) scaled to [0, 1], split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def train(make_optimizer, epochs: int = 8, batch: int = 32, seed: int = 0):
    xtr, ytr, xva, yva = load_digits_tensors(seed)
    model = mlp(seed)
    opt = make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            steps += 1
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        train_loss = loss_fn(model(xtr), ytr).item()
        val_acc = (model(xva).argmax(1) == yva).float().mean().item()
    return train_loss, val_acc, 1e3 * elapsed / steps


def main() -> None:
    rows = [("torch.optim.SGD",) + train(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))]
    for kind in DEMO_TYPES:
        rows.append((f"ClippedSGD {kind}",) + train(
            lambda ps, kind=kind: ClippedSGD(ps, lr=0.1, momentum=0.9, clipping_type=kind, seed=0)))
    print("digits, MLP 64-128-10, 8 epochs, batch 32, lr 0.1, momentum 0.9\n")
    print(f"| {'optimizer':36s} | train loss | val acc | ms/step |")
    print(f"|{'-' * 38}|-----------:|--------:|--------:|")
    for name, loss, acc, ms in rows:
        print(f"| {name:36s} | {loss:10.4f} | {acc:7.3f} | {ms:7.3f} |")


if __name__ == "__main__":
    main()
