"""The learning curve's figure (accuracy against labels per class, log x-axis, the spread over draws) and
its self-contained HTML page."""

from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np

from raytl.files import storage
from raytl.reporting.report import figure_png, page_head, pyplot


def figure(curve: dict[str, Any]) -> bytes:
    """Mean accuracy (and macro F1) per point with error bars of one standard deviation over the draws;
    the full-data accuracy and its `share` as lines."""
    plt = pyplot()
    points = curve["points"]
    x = np.array([p["labels_per_class"] for p in points], dtype=np.float64)
    fig, axes = plt.subplots(figsize=(7.5, 4.2))
    for key, style, name in (("accuracy", "-o", "accuracy"), ("macro_f1", "--s", "macro F1")):
        axes.errorbar(x, [p[key] for p in points], yerr=[p[f"{key}_std"] for p in points], fmt=style,
                      markersize=4, capsize=3, label=name)  # fmt: skip
    found = curve["answer"]
    axes.axhline(found["full_accuracy"], color="#999", linewidth=0.8)
    axes.axhline(found["share"] * found["full_accuracy"], color="#999", linewidth=0.8, linestyle=":",
                 label=f"{found['share']:.2f} of all labels' accuracy")  # fmt: skip
    axes.set_xscale("log")
    axes.set_xticks(x, [str(p["shots"]) for p in points])
    axes.minorticks_off()
    axes.set_xlabel("labelled images per class ('all': every training row)")
    axes.set_ylabel("validation score")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return figure_png(fig)


def page(curve: dict[str, Any], png: bytes) -> str:
    """curve.html: the answer, the figure and the table of points."""
    rows = "".join(
        f"<tr><td>{p['shots']}</td><td>{p['labels']:,}</td><td>{p['accuracy']:.4f} ± {p['accuracy_std']:.4f}"
        f"</td><td>{p['macro_f1']:.4f} ± {p['macro_f1_std']:.4f}</td><td>{len(p['draws'])}</td></tr>"
        for p in curve["points"]
    )
    where = html.escape(storage.redact(curve["embeddings"]))
    return f"""{page_head(f"raytl curve: {where}")}
</style></head>
<body>
<h1>raytl curve</h1>
<p>{where}: {len(curve["classes"])} classes, {html.escape(curve["head"])} probe, validated on
{sum(curve["val_samples"].values()):,} rows.</p>
<p><strong>{html.escape(curve["sentence"])}</strong></p>
<img class="figure" alt="learning curve" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<table><tr><th>labels per class</th><th>labels</th><th>accuracy</th><th>macro F1</th><th>draws</th></tr>
{rows}</table>
</body></html>
"""
