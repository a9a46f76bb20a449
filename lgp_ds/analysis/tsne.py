"""t-SNE of frozen features (the paper's Figure 3): the class token after the final norm of each
image of the chosen classes (the unaugmented evaluation view), embedded in 2-D by
scikit-learn's TSNE with a fixed seed; a panel per checkpoint, coloured by class."""
import numpy as np
import torch


def choose(features: torch.Tensor, labels: torch.Tensor, classes: list[int] | None,
           per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of features [N, D] / labels [N] whose label is in ``classes`` (None: every
    class present), the first ``per_class`` of each (None: all). A class absent from the data
    is a ValueError."""
    present = sorted(set(labels.tolist()))
    classes = present if classes is None else classes
    absent = [c for c in classes if c not in present]
    if absent:
        raise ValueError(f"--classes {absent}: no image of that class in the data (classes "
                         f"present: {present})")
    rows = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        rows.append(idx if per_class is None else idx[:per_class])
    rows = torch.cat(rows).sort().values
    return features[rows], labels[rows]


def embed(features: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """features [N, D] -> [N, 2]: scikit-learn's TSNE (PCA initialisation, ``seed``; the
    perplexity is capped below N, as TSNE requires)."""
    from sklearn.manifold import TSNE
    n = features.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 images, got {n}")
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca",
                random_state=seed)
    return tsne.fit_transform(features.double().numpy())


def plot(axes, embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """A panel per checkpoint: each image a dot at its t-SNE position, coloured by class."""
    import matplotlib
    for ax, (name, (points, labels)) in zip(axes, embeddings.items()):
        classes = sorted(set(labels.tolist()))
        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for i, c in enumerate(classes):
            at = labels == c
            ax.scatter(points[at, 0], points[at, 1], s=5, color=cmap(i % cmap.N), label=str(c))
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                    title="class")
