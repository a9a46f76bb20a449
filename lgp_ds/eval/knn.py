"""Weighted k-nearest-neighbour classification on frozen features (cosine similarity).

As in InstDisc / DINO's kNN monitor: the k most similar training features vote for their labels
with weight exp(similarity / temperature); the class with the largest vote wins.
"""
import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """train [N, D], train_labels [N] (0..C-1), test [M, D] -> predicted labels [M].

    Features are L2-normalised here; the test set is processed ``chunk`` rows at a time, so the
    similarity matrix never exceeds [chunk, N].
    """
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k={k} and temperature={temperature} must be positive")
    k = min(k, train.shape[0])
    train = F.normalize(train.float(), dim=1)
    num_classes = int(train_labels.max()) + 1
    out = []
    for start in range(0, test.shape[0], chunk):
        sim = F.normalize(test[start:start + chunk].float(), dim=1) @ train.T  # [m, N]
        top, idx = sim.topk(k, dim=1)  # [m, k]
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out)


def knn_accuracy(train, train_labels, test, test_labels, k: int = 20,
                 temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of :func:`knn_predict` on the labelled test features."""
    pred = knn_predict(train, train_labels, test, k, temperature)
    return 100.0 * (pred == test_labels).float().mean().item()
