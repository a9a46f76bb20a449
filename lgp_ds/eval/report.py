"""The comparison's table: method x protocol top-1, as Markdown, JSON and a PNG bar chart.

``results`` maps an encoder's name to {protocol: {"top1": %, "labels": labelled images used,
...}}; protocols appear as columns in the order of ``PROTOCOLS`` (those present).
"""
import json
import os

from lgp_ds.atomic import write_file, write_text

# protocol key -> column title
PROTOCOLS = {"knn": "kNN", "logreg": "logistic regression", "linear": "linear probe"}


def _columns(results: dict) -> list[str]:
    present = {p for row in results.values() for p in row}
    return [p for p in PROTOCOLS if p in present]


def _labels(results: dict, protocol: str) -> str:
    """The labelled-image count(s) of a protocol's column (one number when every row agrees)."""
    counts = sorted({row[protocol]["labels"] for row in results.values() if protocol in row})
    return "/".join(str(c) for c in counts)


def held_out(results: dict) -> str:
    """How many held-out images the results were scored on (e.g. "450")."""
    return "/".join(str(n) for n in sorted({r["test_images"] for row in results.values()
                                             for r in row.values()}))


def markdown(results: dict, title: str = "") -> str:
    """One row per encoder, one column per protocol (its labelled images in the header)."""
    cols = _columns(results)
    head = ["encoder"] + [f"{PROTOCOLS[p]} ({_labels(results, p)} labels)" for p in cols]
    lines = ([f"{title}", ""] if title else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        cells = [f"{row[p]['top1']:.1f}" if p in row else "-" for p in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: str, title: str = "") -> None:
    """Grouped bars: a group per protocol, a bar per encoder, top-1 % on the y axis."""
    import matplotlib
    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    cols, names = _columns(results), list(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(cols), 4.0))
    for i, name in enumerate(names):
        xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(cols))]
        tops = [results[name].get(p, {}).get("top1", 0.0) for p in cols]
        bars = ax.bar(xs, tops, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(cols)),
                  [f"{PROTOCOLS[p]}\n({_labels(results, p)} labels)" for p in cols])
    ax.set_ylabel("top-1 on held-out images (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_results(results: dict, folder: str, title: str = "", extra: dict | None = None
                  ) -> dict[str, str]:
    """``results.md``, ``results.json`` (with ``extra``: settings, timings) and ``results.png`` in
    ``folder``, each written whole or not at all; returns their paths."""
    paths = {ext: os.path.join(folder, f"results.{ext}") for ext in ("md", "json", "png")}
    text = markdown(results, title)
    write_text(paths["md"], text)
    payload = json.dumps({"results": results, **(extra or {})}, indent=2)
    write_text(paths["json"], payload + "\n")
    bar_chart(results, paths["png"], title)
    return paths
