"""Helpers shared by several command modules (kept light: imported when the parser is built)."""

from __future__ import annotations

from collections.abc import Mapping


def parse_classes(text: str | None) -> list[str] | None:
    """The ``--classes`` value as a list: comma-separated names, or ``wbc5`` for the five white-cell types.

    Names are kept as given (stripped); the library maps spellings to canonical class names.
    ``None`` when the option is not given.
    """
    if not text:
        return None
    if text.strip().lower() == "wbc5":
        from hematovision.data.classes import WBC5

        return list(WBC5)
    return [name.strip() for name in text.split(",") if name.strip()]


def summary_line(name: str, metrics: Mapping) -> str:
    """One line of headline metrics: images, accuracy, balanced accuracy, macro-F1."""
    return (f"{name}: {metrics['n_images']} images, accuracy {metrics['accuracy']:.4f}, "
            f"balanced accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")
