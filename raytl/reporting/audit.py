"""audit.html: the audit's counts, the most suspicious label issues and the largest duplicate groups as
image grids (thumbnails read under the report's rules: the schemes the embeddings allowed, extract's bomb
guard), and the histogram of every row's nearest-neighbour similarity."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from raytl.files import storage
from raytl.reporting.report import FIGURES_SCRIPT, figure_png, page_head, pyplot, thumbnails

ISSUES_SHOWN = 24  # label issues drawn, most suspicious first
GROUPS_SHOWN = 8  # duplicate groups drawn, largest first
MEMBERS_SHOWN = 6  # of each group


def grid(cells: list[tuple[str, str]], schemes: Sequence[str], columns: int = 6) -> bytes:
    """Thumbnails of (path, title) in rows of `columns`; an unreadable image says so in its place."""
    plt = pyplot()
    images = thumbnails([path for path, _ in cells], schemes)
    columns = max(1, min(columns, len(cells)))
    lines = -(-len(cells) // columns)
    figure, axes_grid = plt.subplots(lines, columns, figsize=(2.1 * columns, 2.4 * lines), squeeze=False)
    for axes in axes_grid.flat:
        axes.axis("off")
    for axes, (_, title), image in zip(axes_grid.flat, cells, images, strict=False):
        if image is None:
            axes.text(0.5, 0.5, "image not\nreachable", ha="center", va="center", fontsize=8, color="#999")
        else:
            axes.imshow(image)
        axes.set_title(title, fontsize=8)
    return figure_png(figure)


def similarity_figure(histogram: dict[str, list], threshold: float) -> bytes:
    plt = pyplot()
    edges, counts = np.array(histogram["edges"]), np.array(histogram["counts"])
    figure, axes = plt.subplots(figsize=(7.5, 3.2))
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0")
    axes.axvline(threshold, color="#c44e52", linewidth=1, label=f"--threshold {threshold:g}")
    axes.set_yscale("symlog")
    axes.set_xlabel("cosine to the nearest other row (normalised embeddings)")
    axes.set_ylabel("rows")
    axes.legend(loc="upper left")
    return figure_png(figure)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img class="figure" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _listing(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """The rows drawn above, as text to copy: one line each, the columns named."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r[c]))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def page(result: dict[str, Any], tables: dict[str, pa.Table], schemes: Sequence[str]) -> str:
    """The whole page; sections for the checks that ran."""
    facts = [("rows", f"{result['rows']:,}"), ("checks", ", ".join(result["checks"]))]
    sections: list[str] = []
    if result.get("labels") is not None:
        _label_issues(result["labels"], tables["label_issues.parquet"], schemes, facts, sections)
    if result.get("duplicates") is not None:
        _duplicate_groups(result["duplicates"], tables["duplicates.parquet"], schemes, facts, sections)
    leak = result.get("leakage")
    if leak is not None:
        before, after = leak["accuracy"], leak["accuracy_without_leaked"]
        accuracy = "-" if before is None else f"{before:.4f}"
        clean = "-" if after is None else f"{after:.4f}"
        facts += [("leaked validation rows", f"{leak['leaked']:,} of {leak['validation_rows']:,}"),
                  ("validation accuracy", f"{accuracy}; without the leaked rows {clean}")]  # fmt: skip
    where = html.escape(storage.redact(result["embeddings"]))
    listed = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts)
    return f"""{page_head(f"raytl audit: {where}")}
dl {{ display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }}
dt {{ color: #666; }}
table {{ border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1.5rem; }}
td, th {{ border-bottom: 1px solid #ddd; padding: .15rem .6rem; text-align: left; }}
</style></head>
<body>
<h1>raytl audit</h1>
<p>{where}</p>
<dl>{listed}</dl>
{"".join(sections)}
{FIGURES_SCRIPT}
</body></html>
"""


def _label_issues(
    labels: dict[str, Any], table: pa.Table, schemes: Sequence[str], facts: list, sections: list[str]
) -> None:
    """The label-issues facts and section: the most suspicious rows' images and their listing."""
    facts += [
        ("label issues", f"{labels['issues']:,} of {labels['labelled']:,} labelled rows"),
        ("out-of-fold accuracy", f"{labels['out_of_fold_accuracy']:.4f} ({labels['folds']} folds)"),
    ]
    issues = table.slice(0, ISSUES_SHOWN).to_pylist()
    body = "<p>No label issues found.</p>"
    if issues:
        cells = [
            (r["path"], f"#{r['rank']} {r['label']} → {r['suggested_label']}\n({r['self_confidence']:.2f})")
            for r in issues
        ]
        body = _img(grid(cells, schemes), "label issues") + _listing(
            issues, ("rank", "path", "label", "suggested_label", "self_confidence")
        )
    sections.append(
        f"<section><h2>Likely label errors (given → suggested, self-confidence)</h2>{body}</section>"
    )


def _duplicate_groups(
    duplicates: dict[str, Any], table: pa.Table, schemes: Sequence[str], facts: list, sections: list[str]
) -> None:
    """The duplicates' facts and sections: the first groups' images and listing, the similarity figure."""
    facts += [("duplicate groups", f"{duplicates['groups']:,} ({duplicates['rows_in_groups']:,} rows; "
               f"{duplicates['removable']:,} removable; {duplicates['groups_crossing_splits']:,} cross "
               "the split)")]  # fmt: skip
    rows = table.to_pylist()
    cells, shown = [], []
    for number in sorted({r["group"] for r in rows})[:GROUPS_SHOWN]:
        members = [r for r in rows if r["group"] == number][:MEMBERS_SHOWN]
        shown += members
        cells += [(r["path"], f"group {number} · {r['label']} · {r['split']}\n({r['similarity']:.3f})")
                  for r in members]  # fmt: skip
    body = "<p>No near-duplicates found.</p>"
    if cells:
        body = _img(grid(cells, schemes), "duplicate groups") + _listing(
            shown, ("group", "path", "label", "split", "similarity", "keep")
        )
    figure = similarity_figure(duplicates["nearest_similarity"], duplicates["threshold"])
    sections.append(f"<section><h2>Near-duplicate groups</h2>{body}</section>")
    sections.append(f"<section><h2>Nearest-neighbour similarity</h2>{_img(figure, 'similarities')}</section>")
