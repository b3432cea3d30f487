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
    if not isinstance(prompt, str):
        raise PromptError(f"--prompt must be text (got {type(prompt).__name__})")
    names = [str(n).lower() for n in class_names]
    if not names:
        raise PromptError("this model has no classes to prompt for; re-export the engines")
    known = f"known: ids 0-{len(names) - 1} or names {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"
    parts = [p for p in re.split(r"[,\s]+", prompt.strip().lower()) if p]
    if not parts:
        raise PromptError(f"--prompt is empty; give a class id or name ({known})")
    ids = []
    for part in parts:
        if re.fullmatch(r"[+-]?[0-9]+", part):   # ASCII digits only: int() would refuse some unicode digits
            value = int(part)
            if not 0 <= value < len(names):
                shown = part if len(part) <= 20 else part[:17] + "..."
                raise PromptError(f"class id {shown} is out of range for this model; {known}")
        elif part in names:
            value = names.index(part)
        else:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise PromptError(f"unknown class {shown!r} in --prompt; {known}")
        ids.append(value)
    if num_images is None:
        return ids
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise PromptError(f"--num-images must be an integer of at least 1 (got {num_images})")
    return [ids[i % len(ids)] for i in range(num_images)]
