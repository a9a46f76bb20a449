"""Writing an analysis: ``NAME.json`` (every value) and ``NAME.png`` (its picture), by rank 0."""
import json
import os

from lgp_ds import dist
from lgp_ds.atomic import write_file


def figure(panels: int, width: float = 4.2, height: float = 3.4):
    """(matplotlib figure, list of ``panels`` axes side by side), drawn without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def write(out_dir: str, name: str, record: dict, fig) -> dict[str, str]:
    """Collective: rank 0 writes ``record`` to ``out_dir/name.json`` and ``fig`` to
    ``out_dir/name.png`` (each whole or not at all) and prints where; returns the paths."""
    import matplotlib.pyplot as plt
    paths = {"json": os.path.join(out_dir, f"{name}.json"),
             "png": os.path.join(out_dir, f"{name}.png")}
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        write_file(paths["json"], lambda tmp: _dump(record, tmp))
        fig.tight_layout()
        write_file(paths["png"], lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        print(f"written: {paths['json']}, {paths['png']}", flush=True)
    plt.close(fig)
    dist.barrier()
    return paths


def _dump(record: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
