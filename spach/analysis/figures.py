"""PNG figures of the analyses (matplotlib, Agg backend), written atomically; each returns its path or None."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from spach.io import atomic_savefig


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path)
    plt.close(fig)
    return Path(path)


def figure_erf(results: dict[str, dict], path: Path) -> Optional[Path]:
    """ERF maps, one row per model, one column per stage: log10(1 + map scaled to max 100), as RepLKNet."""
    results = {k: v for k, v in results.items() if v and v.get("stages")}
    if not results:
        return None
    plt = _plt()
    cols = max(len(r["stages"]) for r in results.values())
    fig, axes = plt.subplots(len(results), cols, figsize=(2.2 * cols, 2.3 * len(results)), squeeze=False)
    for row, (label, r) in enumerate(results.items()):
        for c in range(cols):
            ax = axes[row][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(r["stages"]):
                ax.axis("off")
                continue
            st = r["stages"][c]
            m = np.asarray(st["map"], dtype=np.float64)
            m = np.log10(1 + 100 * m / m.max()) if m.max() > 0 else m
            ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=np.log10(101))
            ax.set_title(f"{st['module']} (/{st['stride']})\n50%: {100 * st['area']['50']:.1f}%  "
                         f"99%: {100 * st['area']['99']:.1f}%", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle("effective receptive fields (area ratio of the square holding 50% / 99%)", fontsize=9)
    return _save(fig, path)


def figure_cka(result: dict, path: Path, title: Optional[str] = None) -> Optional[Path]:
    """A block × block CKA heat map (rows: x's blocks, columns: y's blocks)."""
    m = np.asarray(result["matrix"], dtype=np.float64)
    if m.size == 0:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.8 + 0.35 * m.shape[1], 1.4 + 0.35 * m.shape[0]))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", origin="lower")
    ax.set_xlabel(f"{result['y']} blocks", fontsize=8)
    ax.set_ylabel(f"{result['x']} blocks", fontsize=8)
    ax.set_title(title or "linear CKA (unbiased minibatch HSIC)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def figure_matrix(labels: list[str], matrix: list[list[float]], path: Path, title: str) -> Optional[Path]:
    """A labelled square matrix (e.g. cross-model CKA of the final representation) with the values printed."""
    if not labels:
        return None
    m = np.asarray(matrix, dtype=np.float64)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * len(labels), 2 + 0.6 * len(labels)))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.6 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def figure_corruptions(results: dict[str, dict], path: Path) -> Optional[Path]:
    """Top-1 vs severity for every corruption, one line per model (severity 0 = clean)."""
    results = {k: v for k, v in results.items() if v and v.get("top1")}
    if not results:
        return None
    plt = _plt()
    names = list(next(iter(results.values()))["top1"])
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.6 * rows), squeeze=False)
    for k, name in enumerate(names):
        ax = axes[k // cols][k % cols]
        for label, r in results.items():
            if name in r["top1"]:
                ax.plot(range(6), [r["clean"], *r["top1"][name]], marker=".", label=label)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("severity", fontsize=7)
        ax.set_ylabel("top-1 (%)", fontsize=7)
        ax.grid(alpha=0.3)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=6)
    return _save(fig, path)


def figure_fourier(results: dict[str, dict], path: Path) -> Optional[Path]:
    """Fourier heat maps (error %, zero frequency in the centre; one colour scale, up to the largest error)."""
    results = {k: v for k, v in results.items() if v and v.get("error")}
    if not results:
        return None
    plt = _plt()
    n = len(results)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    vmax = max(float(np.nanmax(np.asarray(r["error"], dtype=np.float64))) for r in results.values())
    vmax = max(5.0, min(100.0, 5 * np.ceil(vmax / 5)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.8, 2.7 * rows), squeeze=False, layout="constrained")
    for k, (label, r) in enumerate(results.items()):
        ax = axes[k // cols][k % cols]
        half = (r["cols"][1] - r["cols"][0]) / 2 if len(r["cols"]) > 1 else 0.5   # cells are `step` wide
        im = ax.imshow(np.asarray(r["error"], dtype=np.float64), vmin=0, vmax=vmax, cmap="jet",
                       extent=(r["cols"][0] - half, r["cols"][-1] + half, r["rows"][-1] + half, r["rows"][0] - half))
        ax.set_title(f"{label}\nmean error {r['mean_error']:.1f}%", fontsize=7)
        ax.tick_params(labelsize=6)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.046, label="error (%)")
    fig.suptitle(f"error under Fourier basis noise of norm {next(iter(results.values()))['eps']} (per frequency)",
                 fontsize=9)
    return _save(fig, path)


def figure_bandpass(results: dict[str, dict], path: Path) -> Optional[Path]:
    """Top-1 after low-pass and high-pass filtering against the bandwidth, one colour per model."""
    results = {k: v for k, v in results.items() if v and v.get("lowpass")}
    if not results:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for label, r in results.items():
        bws = [int(b) for b in r["lowpass"]]
        line, = ax.plot(bws, list(r["lowpass"].values()), marker=".", label=f"{label} low-pass")
        ax.plot(bws, list(r["highpass"].values()), marker="x", linestyle="--", color=line.get_color(),
                label=f"{label} high-pass")
    ax.set_xlabel("bandwidth (central frequencies kept / removed)")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def figure_attention(results: dict[str, dict], path: Path) -> Optional[Path]:
    """Mean attention distance (input pixels) of every head against the attention layer's depth."""
    results = {k: v for k, v in results.items() if v and v.get("layers")}
    if not results:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, r in results.items():
        xs = [i for i, layer in enumerate(r["layers"]) for _ in layer["heads"]]
        ys = [h for layer in r["layers"] for h in layer["heads"]]
        ax.scatter(xs, ys, s=12, label=label, alpha=0.8)
    ax.set_xlabel("attention layer (forward order)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
