"""The benchmark's images: generated shapes (:mod:`ai_service.shapes`), as PNG bytes."""

from __future__ import annotations

import io


def png_images(count: int, size: int, seed: int = 500_000) -> list[bytes]:
    """``count`` different shapes images of ``size`` px, PNG-encoded (same for every caller)."""
    from ai_service.shapes import draw_shapes_image

    out = []
    for i in range(count):
        image, _ = draw_shapes_image(size, seed + i)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out
