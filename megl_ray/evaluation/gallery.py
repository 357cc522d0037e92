"""The explanation gallery: a static HTML page of examples (image, saliency overlay, ground-truth mask, generated
and reference rationales), its images as files beside it; no script, no external resource."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLORMAP = "jet"
"""The heat map's matplotlib colormap (red = high)."""


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.card {{ border: 1px solid #ccc; border-radius: 6px; padding: .6em; width: 520px; }}
.pics {{ display: flex; gap: .4em; }}
.pics figure {{ margin: 0; text-align: center; font-size: .8em; }}
.pics img, .nomask {{ width: 120px; height: 120px; image-rendering: pixelated; }}
.texts {{ display: flex; gap: 1em; }} .texts > div {{ flex: 1; }}
.nomask {{ display: flex; align-items: center; justify-content: center; background: #eee; color: #777; }}
.ok {{ color: #080; }} .wrong {{ color: #b00; }}
p, ol {{ font-size: .9em; margin: .3em 0; }}
</style></head><body>
<h1>{title}</h1>
<p>Checkpoint <code>{checkpoint}</code>, dataset <code>{data}</code>, split <code>{split}</code>.
Overlay: Grad-CAM saliency Â of the predicted class, bilinearly upsampled, '{cmap}' colormap (red = high).
Region: Â at the mask's resolution, max-normalised, ≥ 0.5; IoU is that region's with the ground-truth mask's (as in
<code>miou</code>).</p>
{sections}
</body></html>
"""


def _figure(src: str | None, alt: str, caption: str, missing: str = "no mask") -> str:
    e = html.escape
    body = f'<img src="{e(src)}" alt="{e(alt)}">' if src else f'<div class="nomask">{e(missing)}</div>'
    return f"<figure>{body}<figcaption>{e(caption)}</figcaption></figure>"


def _card(ex: dict[str, Any]) -> str:
    e = html.escape
    verdict = "ok" if ex["predicted"] == ex["label"] else "wrong"
    refs = "".join(f"<li>{e(r)}</li>" for r in ex["references"])
    iou = "no mask" if ex["iou"] is None and not ex["mask"] else ("n/a" if ex["iou"] is None else f"{ex['iou']:.2f}")
    return (
        '<div class="card"><div class="pics">'
        + _figure(ex["image"], f"image {ex['id']}", "image")
        + _figure(ex["overlay"], "saliency overlay", "saliency Â")
        + _figure(ex["region"], "saliency region", "Â ≥ 0.5·max")
        + _figure(ex["mask"], "ground-truth mask", "mask")
        + f"</div><p><b>{e(ex['id'])}</b>: true <b>{e(ex['label'])}</b>, predicted "
        f'<b class="{verdict}">{e(ex["predicted"])}</b> ({ex["probability"]:.2f}), IoU <b>{e(iou)}</b></p>'
        f'<div class="texts"><div><p><b>Generated:</b></p><p class="gen">{e(ex["rationale"])}</p></div>'
        f"<div><p><b>References:</b></p><ol>{refs}</ol></div></div></div>"
    )


def render_gallery(
    examples: Sequence[dict[str, Any]],
    classes: Sequence[str],
    out: Path,
    checkpoint: str,
    data_uri: str,
    split: str,
    title: str = "MEGL explanations",
) -> Path:
    """``out/index.html`` for records of ``explain_rows`` (PNGs already in ``out``), one section per class."""
    sections = []
    for cls in classes:
        cards = "".join(_card(ex) for ex in examples if ex["label"] == cls)
        sections.append(f'<h2>{html.escape(cls)}</h2>\n<div class="grid">{cards or "<p>no example</p>"}</div>')
    page = _PAGE.format(
        title=html.escape(title),
        checkpoint=html.escape(checkpoint),
        data=html.escape(data_uri),
        split=html.escape(split),
        cmap=COLORMAP,
        sections="\n".join(sections),
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
