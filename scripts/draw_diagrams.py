"""Draw the docs' diagrams (committed PNGs under docs/diagrams/): the engine calls of one round for each proposal
kind, and the KV cache updated in place. Run `.venv/bin/python scripts/draw_diagrams.py` after changing either."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "diagrams"
ENGINE, HOST = "#4c72b0", "#dd8452"

# proposal kind -> (title, [(lane, label, width)], tokens a round makes)
ROUNDS = {
    "target-only": ("target-only (the baseline)",
                    [("engine", "target_verify\nK = 1", 1.4), ("host", "sample\nx ~ p", 0.9)],
                    "1 token per target call"),
    "model-draft-steps": ("model draft by steps (draft_step engines)",
                          [("engine", "draft_step", 1.0), ("host", "sample", 0.6), ("engine", "draft_step", 1.0),
                           ("host", "sample", 0.6), ("engine", "... γ times", 1.0),
                           ("engine", "target_verify\nK = γ + 1", 1.6),
                           ("host", "accept min(1, p/q)\nresidual / bonus\nreset lengths", 1.9)],
                          "1 + accepted drafts per target call; γ + 1 engine calls"),
    "draft-rollout": ("draft rollout (draft_rollout_γ: the draft unrolled in one graph)",
                      [("engine", "draft_rollout_γ\nγ drafts, noise in,\nearly stop in-graph", 2.2),
                       ("engine", "target_verify\nK = γ + 1", 1.6),
                       ("host", "accept min(1, p/q)\nresidual / bonus\nreset lengths", 1.9)],
                      "2 engine calls per round (on a device: verify + accept in one target_jacobi call)"),
    "jacobi": ("speculative Jacobi (no draft model: the target's own guesses)",
               [("engine", "target_jacobi\nverify L + 1 slots, accept,\ncouple, new guesses, residual", 3.2),
                ("host", "read counts;\nrare residual\nfinish", 1.4)],
               "1 engine call per round, L guesses tested"),
}


def draw_round(ax, title, steps, note):
    lanes = {"engine": 1.0, "host": 0.0}
    x = 0.2
    for lane, label, width in steps:
        y = lanes[lane]
        color = ENGINE if lane == "engine" else HOST
        ax.add_patch(FancyBboxPatch((x, y - 0.32), width, 0.64, boxstyle="round,pad=0.02", fc=color, ec="black",
                                    alpha=0.85, lw=0.8))
        ax.text(x + width / 2, y, label, ha="center", va="center", fontsize=7.5, color="white")
        x += width + 0.15
    ax.set_xlim(0, 11.2)
    ax.set_ylim(-0.6, 1.6)
    ax.set_yticks([0, 1], ["host (numpy)", "engines"], fontsize=8)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, fontsize=9, loc="left")
    ax.text(11.1, 1.45, note, ha="right", va="center", fontsize=7.5, style="italic")


def draw_rounds(path: Path) -> None:
    fig, axes = plt.subplots(len(ROUNDS), 1, figsize=(10, 1.9 * len(ROUNDS)))
    for ax, (title, steps, note) in zip(axes, ROUNDS.values()):
        draw_round(ax, title, steps, note)
    fig.suptitle("One round of the loop: the engine calls per proposal kind (time runs left to right)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_cache(path: Path) -> None:
    """Three states of one layer's [B, S] key buffer (B = 3 rows, S = 12 positions): before a verify call, after the
    engine wrote the fed tokens' keys in place at each row's length, after acceptance reset the lengths."""
    lengths = [5, 3, 7]
    fed = 4
    accepted = [2, 4, 1]     # fed positions kept per row: the last accepted token + the accepted drafts
    states = [
        ("1. before the call: valid keys up to each row's length", lengths, [0] * 3, lengths),
        ("2. the engine writes the K = 4 fed tokens' keys in place at each row's length (no copy of the cache)",
         lengths, [fed] * 3, lengths),
        ("3. acceptance: each row's length moves by what it kept; rejected keys stay, unread, and are overwritten "
         "next round", [n + a for n, a in zip(lengths, accepted)], [fed] * 3, lengths),
    ]
    fig, axes = plt.subplots(len(states), 1, figsize=(10, 5.4))
    for ax, (title, valid, written, start) in zip(axes, states):
        for b in range(3):
            for s in range(12):
                if s < valid[b]:
                    color, hatch = "#55a868", None
                elif start[b] <= s < start[b] + written[b]:
                    color, hatch = ("#c44e52", "//") if s >= valid[b] else ("#55a868", None)
                    if title.startswith("2."):
                        color, hatch = "#8172b3", "//"
                else:
                    color, hatch = "#eeeeee", None
                ax.add_patch(plt.Rectangle((s, 2 - b), 0.92, 0.8, fc=color, ec="black", lw=0.5, hatch=hatch))
            ax.text(12.3, 2 - b + 0.4, f"length {valid[b]}", va="center", fontsize=8)
        ax.set_xlim(-1.2, 14)
        ax.set_ylim(-0.2, 3)
        ax.axis("off")
        for b in range(3):
            ax.text(-0.2, 2 - b + 0.4, f"row {b}", ha="right", va="center", fontsize=8)
        ax.set_title(title, fontsize=8.5, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, fc=c, ec="black", hatch=h) for c, h in
               (("#55a868", None), ("#8172b3", "//"), ("#c44e52", "//"), ("#eeeeee", None))]
    fig.legend(handles, ["valid (attended)", "written by this call", "written, rejected (stale)", "free"],
               loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("The KV cache in place: one buffer per layer [B, H, S, Dh] that the runtime owns (one head shown)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    draw_rounds(OUT / "rounds.png")
    draw_cache(OUT / "kv-cache-in-place.png")
    print(f"wrote {OUT / 'rounds.png'} and {OUT / 'kv-cache-in-place.png'}")


if __name__ == "__main__":
    main()
