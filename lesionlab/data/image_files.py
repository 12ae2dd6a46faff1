"""Image files named by a user (files or folders): folders expanded, files decoded, each failure told and recorded.

`warn` receives one line per problem (`error: ...` for an image-less folder, `skipped ...` for a file that does
not decode); the command line prints it after its own prefix. `failures` collects (path, message) pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from lesionlab.data.images import Decoded, expand_image_paths, load_input
from lesionlab.exceptions import UserError


def expand_images(items: list[Path], failures: list[tuple[Path, str]], warn: Callable[[str], None]) -> list[Path]:
    """Image files, with folders expanded to the image files below them; an image-less folder is reported."""
    paths, problems = expand_image_paths(items)
    for path, msg in problems:
        warn(f"error: {msg}")
        failures.append((path, msg))
    return paths


def readable_inputs(paths: list[Path], failures: list[tuple[Path, str]],
                    warn: Callable[[str], None]) -> Iterator[tuple[Path, Decoded]]:
    """Yield (path, decoded input: image, format, DICOM header) for each file that decodes; report each bad one."""
    for path in paths:
        try:
            yield path, load_input(path)
        except UserError as e:
            warn(f"skipped {e}")
            failures.append((path, str(e)))


def readable_images(paths: list[Path], failures: list[tuple[Path, str]],
                    warn: Callable[[str], None]) -> Iterator[tuple[Path, Image.Image]]:
    """Yield (path, RGB image) for each file that decodes; report each bad one and record it."""
    for path, d in readable_inputs(paths, failures, warn):
        yield path, d.image
