"""The data stage's side of image data: each row's images checked and stored in the artifact.

A row of image data has an `images` column: a list with one entry per image part
(`{"type": "image"}`) of its messages, in order. An entry is a local file path (relative to the
data file's folder, or absolute), a `{"bytes": ..., "path": ...}` mapping (how Parquet files and
`datasets` Image features hold images), or a PIL image (the built-in task). Every image is
opened and decoded up front, so a missing file, an unreadable one or a wrong count is found
before any training, with the same "<source> row N, field 'images': ..." message as text data.

Each good image is written once to the data artifact as `images/<sha256 of its PNG>.png` and
the row's entries become those names: stages read images from the artifact (never from the
user's folder, which may change), and the row fingerprint, hence every training stage's cache
key, follows the pixels.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from posttrain.data.loading import DataError

IMAGES = "images"
MESSAGE_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")


def image_parts(row: dict) -> int:
    """The number of image parts in the row's messages (a string field holds none)."""
    count = 0
    for field in MESSAGE_FIELDS:
        value = row.get(field)
        if isinstance(value, list):
            for message in value:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, list):
                    count += sum(1 for p in content
                                 if isinstance(p, dict) and p.get("type") == "image")
    return count


def has_images(rows: list[dict]) -> bool:
    """Whether a dataset is image data: an `images` column or image parts in its messages."""
    return any(IMAGES in r or image_parts(r) for r in rows)


def referenced_files(rows: list[dict], base_dir: Path) -> list[Path]:
    """The local image files the rows name (for the data stage's cache key)."""
    files = []
    for row in rows:
        for entry in row.get(IMAGES) or []:
            path = entry.get("path") if isinstance(entry, dict) and not entry.get("bytes") \
                else entry
            if isinstance(path, str):
                files.append(_resolve(path, base_dir))
    return files


def store_images(rows: list[dict], *, source: str, base_dir: Path | None,
                 out_dir: Path | None, on_bad_rows: str = "error",
                 max_drop_fraction: float = 0.1) -> tuple[list[dict], dict]:
    """Rows whose images are checked and written to `out_dir/images` (None: checked and named,
    not written; preflight), each entry replaced by its name there; and a report like
    validate_rows' ({rows_in, rows_out, dropped, examples}). on_bad_rows='error' raises at the
    first bad row; 'drop' removes and counts bad rows and fails above `max_drop_fraction`."""
    kept, dropped, examples = [], {}, []
    if out_dir is not None:
        (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows, start=1):
        try:
            kept.append({**row, IMAGES: [_store(entry, j, base_dir, out_dir)
                                         for j, entry in enumerate(_entries(row), start=1)]})
        except _BadImage as e:
            where = f"row {i}, field 'images': {e.detail}"
            if on_bad_rows == "error":
                raise DataError(f"{source} {where}") from None
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
            if len(examples) < 5:
                examples.append(where)
    n_bad = len(rows) - len(kept)
    if rows and (n_bad / len(rows) > max_drop_fraction or not kept):
        raise DataError(f"{source}: {n_bad} of {len(rows)} rows have bad images "
                        f"({n_bad / len(rows):.1%} > max_drop_fraction {max_drop_fraction:.1%}); "
                        f"reasons {dropped}; e.g. {'; '.join(examples)}")
    return kept, {"rows_in": len(rows), "rows_out": len(kept), "dropped": dropped,
                  "examples": examples}


def open_image(data_dir: Path, name: str):
    """A stored image (a name `store_images` wrote) as an RGB PIL image."""
    from PIL import Image

    with Image.open(data_dir / name) as image:
        return image.convert("RGB")


class _BadImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _entries(row: dict) -> list:
    entries = row.get(IMAGES)
    parts = image_parts(row)
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise _BadImage("wrong type", f"expected a list of images, got "
                        f"{type(entries).__name__}")
    if len(entries) != parts:
        raise _BadImage("wrong image count", f"{len(entries)} image(s) for {parts} image "
                        "part(s) ({'type': 'image'}) in the messages; give one image per part, "
                        "in order")
    return entries


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p


def _store(entry: Any, j: int, base_dir: Path | None, out_dir: Path | None) -> str:
    """Decode entry `j` of a row, write it as PNG under its content hash, return its name."""
    from PIL import Image, UnidentifiedImageError

    label = f"image {j}"
    if isinstance(entry, Image.Image):
        image = entry
    else:
        if isinstance(entry, dict) and entry.get("bytes") is not None:
            data, label = entry["bytes"], f"image {j} (bytes)"
        elif isinstance(entry, (str, dict)) and (path := _path_of(entry)):
            file = _resolve(path, base_dir)
            label = f"image {j} {path!r}"
            if not file.is_file():
                raise _BadImage("missing image file", f"{label}: file not found ({file})")
            data = file.read_bytes()
        else:
            raise _BadImage("wrong type", f"image {j}: expected a file path, a {{'bytes', "
                            f"'path'}} mapping or an image, got {entry!r:.60}")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise _BadImage("unreadable image", f"{label}: not a readable image ({e})") from None
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    png = buffer.getvalue()
    name = f"{IMAGES}/{hashlib.sha256(png).hexdigest()[:32]}.png"
    if out_dir is not None and not (out_dir / name).exists():
        (out_dir / name).write_bytes(png)
    return name


def _path_of(entry: str | dict) -> str | None:
    path = entry if isinstance(entry, str) else entry.get("path")
    return path if isinstance(path, str) and path else None
