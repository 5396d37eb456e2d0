"""The report as one self-contained HTML page: inline SVG plots (matplotlib, Agg), no scripts,
no external assets, and every model-supplied name escaped."""

import io
from html import escape

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, MaxNLocator

from schemas.report import Report
from workers.evaluate.metrics import METRICS

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 62rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.8rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 0.5rem 0 1.5rem; } svg { max-width: 100%; height: auto; }
"""
ORIGINAL, COMPRESSED, MARK = "#8899aa", "#2a7f62", "#c0392b"
SVG_SETTINGS = {"svg.fonttype": "none", "svg.hashsalt": "clipprune", "font.size": 9}


def _svg(figure: plt.Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: inline in HTML


def _figure(width: float = 6.4, height: float = 2.8) -> tuple[plt.Figure, plt.Axes]:
    figure, axes = plt.subplots(figsize=(width, height))
    axes.spines[["top", "right"]].set_visible(False)
    return figure, axes


def _bytes(value: float, _position: int = 0) -> str:
    """An axis tick in B, kB or MB: raw byte counts ran together (100000125000...)."""
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:g} {unit}"
    return f"{value:g} B"


def _size_plot(report: Report) -> str:
    size = report.size
    figure, axes = _figure(5.5, 2.4)
    labels = ["raw", "gzip"]
    before = [size.original_bytes, size.original_gzip_bytes]
    after = [size.compressed_bytes, size.compressed_gzip_bytes]
    positions = range(len(labels))
    bars = [
        axes.barh([p + 0.2 for p in positions], before, 0.4, color=ORIGINAL, label="original"),
        axes.barh([p - 0.2 for p in positions], after, 0.4, color=COMPRESSED, label="compressed"),
    ]
    for index, bar in enumerate(patch for group in bars for patch in group):
        bar.set_gid(f"size-bar-{index}")  # ids the browser test finds the bars by
    axes.set_yticks(list(positions), labels)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=4))
    axes.xaxis.set_major_formatter(FuncFormatter(_bytes))
    # Beside the bars, not over them: the longest bar (the original) reaches the right edge.
    legend = axes.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1))
    legend.set_gid("size-legend")
    return _svg(figure)


def _layer_plot(report: Report) -> str:
    names = [layer.name for layer in report.layers]
    figure, axes = _figure(6.4, 0.5 + 0.35 * len(names))
    axes.barh(range(len(names)), [layer.sparsity for layer in report.layers], color=COMPRESSED)
    axes.set_yticks(range(len(names)), names)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("sparsity (share of the original parameters now zero or removed)")
    return _svg(figure)


def _sweep_plot(report: Report, max_drop: float | None) -> str:
    assert report.sweep is not None
    figure, axes = _figure()
    assert report.accuracy is not None  # a search needs eval data
    points = report.sweep
    if max_drop is not None:
        sign = -1 if METRICS[report.accuracy.metric].higher_is_better else 1
        axes.axhline(
            report.accuracy.original + sign * max_drop,
            color=MARK,
            linestyle="--",
            label=f"bound (max_accuracy_drop {max_drop:g})",
        )
    for encoding in dict.fromkeys(point.encoding for point in points):
        series = [p for p in points if p.encoding == encoding]
        axes.plot([p.sparsity for p in series], [p.metric for p in series], "o-", label=encoding)
    axes.axhline(report.accuracy.original, color="#555", linestyle=":", label="original")
    for point in points:
        if point.chosen:
            axes.plot(
                [point.sparsity], [point.metric], "o", color=MARK, markersize=9, label="returned"
            )
    axes.set_xlabel("sparsity")
    axes.set_ylabel(report.accuracy.metric)
    axes.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _svg(figure)


def _sensitivity_plot(report: Report) -> str:
    assert report.sensitivity is not None and report.accuracy is not None
    figure, axes = _figure()
    for name in dict.fromkeys(point.name for point in report.sensitivity):
        points = [p for p in report.sensitivity if p.name == name]
        axes.plot([p.sparsity for p in points], [p.metric for p in points], "o-", label=name)
    axes.axhline(report.accuracy.original, color="#555", linestyle=":")
    axes.set_xlabel("sparsity of this tensor alone")
    axes.set_ylabel(report.accuracy.metric)
    axes.legend(frameon=False, fontsize=8)
    return _svg(figure)


# What each job kind's validation curve is measured on (workers/jobs/train.py, the fine-tuning)
VALIDATED_ON = {
    "train": "the held-out validation_split of train_data",
    "prune": "eval_data, or train_data without it (held-back train_data when calibrated)",
}


def _training_plots(report: Report, kind: str) -> list[str]:
    training = report.training
    assert training is not None
    epochs = range(1, len(training.loss) + 1)
    figure, axes = _figure()
    axes.plot(epochs, training.loss, color=ORIGINAL, label="training loss")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    other = axes.twinx()
    validation = f"validation {training.metric} on {VALIDATED_ON[kind]}"
    other.plot(epochs, training.validation, color=COMPRESSED, label=validation)
    other.set_ylabel(training.metric)
    figure.legend(frameon=False, loc="upper center", ncols=2)
    plots = [_svg(figure)]
    if training.grad_norm:
        figure, axes = _figure()
        steps = [i * training.step_stride for i in range(len(training.grad_norm))]
        axes.plot(steps, training.grad_norm, color=ORIGINAL, linewidth=0.8, label="gradient norm")
        clipped = [
            (s, n) for s, n, c in zip(steps, training.grad_norm, training.clipped, strict=True) if c
        ]
        if clipped:
            axes.plot(*zip(*clipped, strict=True), "x", color=MARK, markersize=3, label="clipped")
        if training.clip.mode in ("global_norm", "norm"):
            axes.axhline(training.clip.threshold, color=MARK, linestyle="--", label="threshold")
        axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel("global norm before clipping")
        axes.legend(frameon=False)
        plots.append(_svg(figure))
    return plots


def _row(*cells: object, header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{escape(str(cell))}</{tag}>" for cell in cells) + "</tr>"


def render(job_id: str, kind: str, report: Report, max_drop: float | None = None) -> str:
    """The page; `max_drop` (the job's max_accuracy_drop) draws the bound on the search."""
    with matplotlib.rc_context(SVG_SETTINGS):
        return _render(job_id, kind, report, max_drop)


def _accuracy_section(report: Report) -> list[str]:
    accuracy, latency = report.accuracy, report.latency_ms
    if accuracy is None:
        return ["<h2>Accuracy</h2><p>Not measured: see the notes below.</p>"]
    parts = [
        f"<h2>{'Accuracy' if accuracy.metric == 'accuracy' else f'Score: {accuracy.metric}'}"
        "</h2><table>",
        _row("output", "metric", "original", "compressed", "samples", header=True),
    ]
    for score in accuracy.outputs:
        parts.append(
            _row(
                score.name,
                score.metric,
                f"{score.original:.4f}",
                f"{score.compressed:.4f}",
                score.samples,
            )
        )
    difference = "not finite" if accuracy.max_abs_diff is None else f"{accuracy.max_abs_diff:.3g}"
    parts += [
        "</table>",
        f"<p>Deciding output {escape(accuracy.output)} ({escape(accuracy.reason)}): "
        f"{accuracy.metric} {accuracy.original:.4f} → {accuracy.compressed:.4f}; agreement "
        f"{accuracy.agreement:.1%}; largest output difference {difference}.</p>",
    ]
    if latency is not None:
        parts.append(
            f"<p>onnxruntime p50 {latency.original:.3f} ms → {latency.compressed:.3f} ms "
            f"(batch {latency.batch}).</p>"
        )
    return parts


def _render(job_id: str, kind: str, report: Report, max_drop: float | None) -> str:
    size = report.size
    title = f"clipprune {escape(kind)} job {escape(job_id)}"
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title}</title>",
        '<link rel="icon" href="data:,">',  # no favicon request: the page needs nothing else
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>",
        # Relative to /v1/jobs/{id}/report.html: the job's own model and report
        '<p>Download: <a id="download-model" href="model" download>the model (ONNX)</a> · '
        '<a id="download-report" href="report" download>the report (JSON)</a></p>',
        "<h2>Size</h2><table>",
        _row("", "original", "compressed", "ratio", header=True),
        _row(
            "bytes", f"{size.original_bytes:,}", f"{size.compressed_bytes:,}", f"{size.ratio:.2f}x"
        ),
        _row(
            "gzip bytes",
            f"{size.original_gzip_bytes:,}",
            f"{size.compressed_gzip_bytes:,}",
            f"{size.original_gzip_bytes / size.compressed_gzip_bytes:.2f}x",
        ),
        _row(
            "parameters",
            f"{size.params:,}",
            f"{size.nonzero_params:,} nonzero",
            f"{size.sparsity:.1%} zero",
        ),
        f"</table><figure>{_size_plot(report)}</figure>",
    ]
    parts += _accuracy_section(report)
    if report.sweep and report.accuracy is not None:  # a search measures on eval_data
        sweep = _sweep_plot(report, max_drop)
        heading = f"{report.accuracy.metric.capitalize()} against sparsity"
        parts += [f"<h2>{escape(heading)}</h2>", f"<figure>{sweep}</figure>"]
    parts += [
        "<h2>Layers</h2><table>",
        _row("tensor", "shape", "parameters", "nonzero", "sparsity", header=True),
    ]
    for layer in report.layers:
        shape = " x ".join(map(str, layer.shape))
        if layer.shape != layer.original_shape:
            shape = " x ".join(map(str, layer.original_shape)) + " → " + shape
        parts.append(
            _row(
                layer.name,
                shape,
                f"{layer.params:,}",
                f"{layer.nonzero:,}",
                f"{layer.sparsity:.1%}",
            )
        )
    parts.append(f"</table><figure>{_layer_plot(report)}</figure>")
    if report.sensitivity:
        parts += [
            "<h2>Sensitivity of each layer</h2>",
            f"<figure>{_sensitivity_plot(report)}</figure>",
        ]
    if report.training is not None:
        clip = report.training.clip
        parts.append("<h2>Training</h2>")
        parts += [f"<figure>{plot}</figure>" for plot in _training_plots(report, kind)]
        parts.append(
            f"<p>Clipping {escape(clip.mode)} at {clip.threshold:g}: {clip.clipped_fraction:.1%} "
            f"of steps clipped; gradient norm p50 {clip.grad_norm_p50:.3g}, max "
            f"{clip.grad_norm_max:.3g}.</p>"
        )
    if report.notes:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in report.notes) + "</ul>"
        )
    onnx = report.onnx
    opsets = ", ".join(f"{domain} {version}" for domain, version in onnx.opsets.items())
    parts.append(
        f"<p>ONNX IR {onnx.ir_version}, opsets {escape(opsets)}; checker: "
        f"{escape(onnx.checker)}; sha256 <code>{escape(onnx.model_sha256)}</code></p></body></html>"
    )
    return "\n".join(parts)
