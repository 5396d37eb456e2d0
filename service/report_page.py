"""The report as one self-contained HTML page: no scripts, no external assets, names escaped."""

from html import escape

from schemas.report import Report

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.8rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.bar { background: #4a7; height: 0.8rem; display: inline-block; }
"""


def _row(*cells: object, header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{escape(str(cell))}</{tag}>" for cell in cells) + "</tr>"


def _number(value: float) -> str:
    return f"{value:,.4g}" if isinstance(value, float) else f"{value:,}"


def render_report(job_id: str, kind: str, report: Report) -> str:
    size, accuracy = report.size, report.accuracy
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>clipprune {escape(kind)} job {escape(job_id)}</title>",
        f"<style>{STYLE}</style></head>",
        f"<body><h1>clipprune {escape(kind)} job <code>{escape(job_id)}</code></h1>",
        "<h2>Size</h2><table>",
        _row("", "original", "compressed", "ratio", header=True),
        _row(
            "bytes",
            _number(size.original_bytes),
            _number(size.compressed_bytes),
            f"{size.ratio:.2f}x",
        ),
        _row(
            "gzip bytes",
            _number(size.original_gzip_bytes),
            _number(size.compressed_gzip_bytes),
            f"{size.original_gzip_bytes / size.compressed_gzip_bytes:.2f}x",
        ),
        _row(
            "parameters",
            _number(size.params),
            _number(size.nonzero_params),
            f"{size.sparsity:.1%} zero",
        ),
        "</table><h2>Accuracy</h2><table>",
        _row("metric", "original", "compressed", "delta", header=True),
        _row(
            accuracy.metric,
            f"{accuracy.original:.4f}",
            f"{accuracy.compressed:.4f}",
            f"{accuracy.delta:+.4f}",
        ),
        "</table>",
        f"<p>{accuracy.samples} samples; agreement {accuracy.agreement:.1%}; "
        f"largest output difference {accuracy.max_abs_diff:.3g}; onnxruntime p50 "
        f"{report.latency_ms.original:.3f} ms → {report.latency_ms.compressed:.3f} ms "
        f"(batch {report.latency_ms.batch}).</p>",
        "<h2>Layers</h2><table>",
        _row("tensor", "shape", "parameters", "nonzero", "sparsity", "", header=True),
    ]
    for layer in report.layers:
        shape = " x ".join(map(str, layer.shape))
        if layer.shape != layer.original_shape:
            shape = " x ".join(map(str, layer.original_shape)) + " → " + shape
        bar = f'<span class=bar style="width:{layer.sparsity * 10:.2f}rem"></span>'
        parts.append(
            _row(
                layer.name,
                shape,
                _number(layer.params),
                _number(layer.nonzero),
                f"{layer.sparsity:.1%}",
            )[:-5]
            + f"<td>{bar}</td></tr>"
        )
    parts.append("</table>")
    if report.training is not None:
        training = report.training
        clip = training.clip
        parts += [
            "<h2>Training</h2><table>",
            _row("epoch", "loss", f"validation {training.metric}", header=True),
            *(
                _row(epoch, f"{loss:.4f}", f"{value:.4f}")
                for epoch, (loss, value) in enumerate(
                    zip(training.loss, training.validation, strict=True), 1
                )
            ),
            "</table>",
            f"<p>Clipping {escape(clip.mode)} at {clip.threshold:g}: "
            f"{clip.clipped_fraction:.1%} of steps clipped; gradient norm "
            f"p50 {clip.grad_norm_p50:.3g}, max {clip.grad_norm_max:.3g}.</p>",
        ]
    if report.notes:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in report.notes) + "</ul>"
        )
    onnx = report.onnx
    parts.append(
        f"<p>ONNX IR {onnx.ir_version}, opsets "
        + escape(", ".join(f"{domain} {version}" for domain, version in onnx.opsets.items()))
        + f"; checker: {escape(onnx.checker)}; sha256 <code>{escape(onnx.model_sha256)}</code></p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
