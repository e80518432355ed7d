"""Reports: a machine-readable JSON next to a human Markdown table, both written atomically."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .atomic import atomic_write_json, atomic_write_text

console = Console(stderr=False)


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    t = Table(title=title)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*(fmt(c) for c in r))
    console.print(t)


def perplexity_rows(ppl: dict[str, dict[str, float | None]]) -> tuple[list[str], list[list]]:
    domains = list(next(iter(ppl.values())).keys()) if ppl else []
    rows = []
    for variant, by_domain in ppl.items():
        vals = [by_domain.get(d) for d in domains]
        ok = [v for v in vals if v is not None]
        rows.append([variant, *vals, (sum(ok) / len(ok)) if len(ok) == len(vals) and ok else None])
    return ["variant", *domains, "mean"], rows


def carve_rows(table: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["layer", "shared %", "routed min %", "routed mean %", "routed max %", "covered %"]
    return headers, [[r["layer"], r["shared_pct"], r["routed_min_pct"], r["routed_mean_pct"], r["routed_max_pct"],
                      r["covered_pct"]] for r in table]


def carve_summary_rows(table: list[dict], params: dict, dense_total: int) -> tuple[list[str], list[list]]:
    def col(k):
        return [r[k] for r in table]

    rows = [["shared % (per layer)", min(col("shared_pct")), sum(col("shared_pct")) / len(table), max(col("shared_pct"))],
            ["routed expert % (per layer)", min(col("routed_min_pct")), sum(col("routed_mean_pct")) / len(table),
             max(col("routed_max_pct"))]]
    prow = [["params: dense parent", dense_total, "", ""], ["params: MoE total", params["total"], "", ""],
            ["params: MoE active / token", params["active"], f"{100 * params['active'] / dense_total:.1f}% of dense", ""],
            ["params: router", params["router"], "", ""]]
    return ["", "min", "mean", "max"], rows + prow


def write(json_path: Path, data: dict, markdown: str) -> None:
    json_path = Path(json_path)
    atomic_write_json(json_path, data)
    atomic_write_text(json_path.with_suffix(".md"), markdown)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    from .atomic import atomic_file

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    pyplot().close(fig)


def plot_perplexity(ppl: dict[str, dict[str, float | None]], path: Path) -> None:
    """Grouped bars: one group per domain, one bar per variant, log scale."""
    plt = pyplot()
    domains = list(next(iter(ppl.values())).keys())
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(domains), 3.6))
    width = 0.8 / max(len(ppl), 1)
    for i, (variant, vals) in enumerate(ppl.items()):
        xs = [j + i * width for j, d in enumerate(domains) if vals.get(d) is not None]
        ys = [vals[d] for d in domains if vals.get(d) is not None]
        ax.bar(xs, ys, width, label=variant)
    ax.set_xticks([j + width * (len(ppl) - 1) / 2 for j in range(len(domains))], domains)
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_carve(table: list[dict], path: Path) -> None:
    """Per layer: shared expert share and the routed experts' min/mean/max share."""
    plt = pyplot()
    layers = [r["layer"] for r in table]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(layers, [r["shared_pct"] for r in table], label="shared expert")
    ax.plot(layers, [r["routed_mean_pct"] for r in table], label="routed expert (mean)")
    ax.fill_between(layers, [r["routed_min_pct"] for r in table], [r["routed_max_pct"] for r in table], alpha=0.25,
                    label="routed expert (min–max)")
    ax.plot(layers, [r["covered_pct"] for r in table], "--", label="kept by any expert")
    ax.set_xlabel("layer")
    ax.set_ylabel("% of the layer's dense neurons")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_routing(stats: dict, expert_names: list[str], path: Path) -> None:
    """Three panels: the router's expert load per domain (heatmap), how often a token keeps the previous token's
    expert, and the mutual information between adjacent layers' expert choices."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    load = stats.get("load", {}).get("readme", {})
    ax = axes[0]
    if load:
        domains = list(load)
        im = ax.imshow([load[d] for d in domains], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(expert_names)), expert_names, rotation=30, fontsize=8)
        ax.set_yticks(range(len(domains)), domains, fontsize=8)
        for i, d in enumerate(domains):
            for j, v in enumerate(load[d]):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("router's expert load per domain", fontsize=9)
    ax = axes[1]
    kp = stats.get("keep_previous", {})
    ax.bar(list(kp), [100 * v for v in kp.values()], color="tab:blue")
    for i, v in enumerate(kp.values()):
        ax.text(i, 100 * v + 1, f"{100 * v:.0f}%", ha="center", fontsize=8)
    ax.set_ylabel("% of tokens")
    ax.set_ylim(0, 105)
    ax.set_title("token keeps the previous token's expert", fontsize=9)
    ax = axes[2]
    for variant, mi in stats.get("adjacent_mi_bits", {}).items():
        ax.plot(range(len(mi)), mi, marker=".", label=f"{variant} choices")
    if "max_mi_bits" in stats:
        ax.axhline(stats["max_mi_bits"], ls="--", c="gray", lw=0.8, label="log2(E): fully determined")
    ax.set_xlabel("layer pair (l, l+1)")
    ax.set_ylabel("mutual information (bits)")
    ax.set_title("redundancy of per-layer routing", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_recovery(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Validation perplexity against expert-tuning tokens, one line per trained variant."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for variant, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
    ax.set_xlabel("training tokens (expert tuning)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def recovery_curve(log_file: Path) -> list[tuple[int, float]]:
    import json

    if not Path(log_file).exists():
        return []
    rows = [json.loads(ln) for ln in Path(log_file).read_text().splitlines() if ln.strip()]
    return [(r["tokens"], r["ppl"]) for r in rows if r.get("phase") == "eval"]
