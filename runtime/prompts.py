"""Prompts for class-conditional models: class ids or names from the manifest config's class_names.

"7", "seven", "3,7 9", "three seven": one class per image, cycled to fill --num-images.
"""
from __future__ import annotations

import re

from fastardiff.errors import FastardiffError


class PromptError(FastardiffError):
    pass


def parse_prompts(prompt: str, class_names, num_images: int | None = None) -> list[int]:
    """Class ids, one per image. With num_images the prompt list is cycled (or cut) to that many images."""
    names = [str(n).lower() for n in class_names]
    known = f"known: ids 0-{len(names) - 1} or names {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"
    parts = [p for p in re.split(r"[,\s]+", prompt.strip().lower()) if p]
    if not parts:
        raise PromptError(f"--prompt is empty; give a class id or name ({known})")
    ids = []
    for part in parts:
        if part.lstrip("-").isdigit():
            value = int(part)
            if not 0 <= value < len(names):
                raise PromptError(f"class id {value} is out of range for this model; {known}")
        elif part in names:
            value = names.index(part)
        else:
            raise PromptError(f"unknown class '{part}' in --prompt; {known}")
        ids.append(value)
    if num_images is None:
        return ids
    if num_images < 1:
        raise PromptError(f"--num-images must be at least 1 (got {num_images})")
    return [ids[i % len(ids)] for i in range(num_images)]
