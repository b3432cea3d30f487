"""Run statistics: counters and per-stage wall time, as a table and as JSON.

Counts are per sample where that is what the figure means: `target_rows` counts a sample in a batched target
call once, so tokens_per_target_call = tokens / target_rows equals N / (target calls) for a batch of one and is
the reduction in sequential target passes versus target-only decoding (which has exactly 1.0).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STAGES = ("draft", "verify", "decode", "host")


@dataclass
class RunStats:
    mode: str = "speculative"
    early_stop: str = "static"
    gamma: int = 4
    draft: str = "model"       # speculative proposals: the draft model or the target's own Jacobi guesses
    images: int = 0
    tokens: int = 0            # tokens generated, summed over samples
    target_calls: int = 0      # batched target engine invocations (prefill steps + verifies)
    target_rows: int = 0       # samples evaluated by the target, summed over calls
    draft_calls: int = 0       # batched draft engine invocations
    verifies: int = 0          # sample-level verify steps
    drafts_proposed: int = 0   # drafts sent to verification
    drafts_accepted: int = 0
    early_stops: int = 0       # drafting rounds ended by the entropy threshold
    residual_samples: int = 0
    bonus_tokens: int = 0
    decode_calls: int = 0
    head_calls: int = 0        # diffusion-head engine invocations (families whose tokens come from a head)
    seconds: dict = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    total_seconds: float = 0.0
    # per draft position i (when track_positions): verifies that proposed draft i after accepting drafts < i,
    # and those that accepted it; their ratio is the per-position acceptance --gamma auto is calibrated with
    track_positions: bool = False
    gamma_choice: dict | None = None   # what --gamma auto chose and why
    position_proposed: list = field(default_factory=list)
    position_accepted: list = field(default_factory=list)
    # what the run measured of each proposal kind it ran ("target", "jacobi:<L>", "model:<g>", "rollout:<g>"):
    # {"tokens": tokens made, "seconds": wall seconds of those rounds (engine + host)}, and every switch of kind
    # while it ran: {"round", "from", "to", "reason"} (runtime/adaptive.py)
    mode_rates: dict = field(default_factory=dict)
    switches: list = field(default_factory=list)
    # the warm-up before the timed generation (runtime/speculative.py warm_up): its seconds and engine calls, outside
    # total_seconds; None: no warm-up ran
    warm_up: dict | None = None

    def record_round(self, proposed, accepted) -> None:
        """One verify per row: `proposed` [R] drafts (or Jacobi guesses) tested, `accepted` [R] of them kept;
        each row then emits one more token, a residual sample after a rejection or the bonus when all passed."""
        if self.track_positions:
            self.record_positions(proposed, accepted)
        rows, bonus = len(accepted), int(np.count_nonzero(accepted == proposed))
        self.verifies += rows
        self.drafts_proposed += int(np.add.reduce(proposed))     # (ufunc reduce: no method dispatch, a round's
        self.drafts_accepted += int(np.add.reduce(accepted))     # bookkeeping is a few microseconds)
        self.residual_samples += rows - bonus
        self.bonus_tokens += bonus

    def record_positions(self, num_drafts, accepted) -> None:
        width = int(num_drafts.max(initial=0))
        if len(self.position_proposed) < width:
            grow = width - len(self.position_proposed)
            self.position_proposed += [0] * grow
            self.position_accepted += [0] * grow
        i = np.arange(width)[None, :]
        reached = (i < num_drafts[:, None]) & (i <= accepted[:, None])
        kept = i < accepted[:, None]
        for j, (a, b) in enumerate(zip(reached.sum(0), kept.sum(0))):
            self.position_proposed[j] += int(a)
            self.position_accepted[j] += int(b)

    def position_acceptance(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.position_accepted, self.position_proposed)]

    @contextmanager
    def timer(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def summary(self) -> dict:
        ratio = lambda a, b: a / b if b else 0.0  # noqa: E731
        return {
            "mode": self.mode, "draft": self.draft, "early_stop": self.early_stop, "gamma": self.gamma, "images": self.images,
            "tokens": self.tokens, "target_calls": self.target_calls, "target_rows": self.target_rows,
            "draft_calls": self.draft_calls, "verifies": self.verifies,
            "drafts_proposed": self.drafts_proposed, "drafts_accepted": self.drafts_accepted,
            "acceptance_rate": ratio(self.drafts_accepted, self.drafts_proposed),
            "mean_accepted_per_verify": ratio(self.drafts_accepted, self.verifies),
            "tokens_per_target_call": ratio(self.tokens, self.target_rows),
            "early_stops": self.early_stops, "residual_samples": self.residual_samples,
            "bonus_tokens": self.bonus_tokens, "head_calls": self.head_calls,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            **({"gamma_choice": self.gamma_choice} if self.gamma_choice else {}),
            **({"position_acceptance": [round(a, 4) for a in self.position_acceptance()]}
               if self.track_positions else {}),
            "mode_rates": {label: {"tokens": int(r["tokens"]), "seconds": round(r["seconds"], 6)}
                           for label, r in self.mode_rates.items()},
            "switches": [dict(s) for s in self.switches],
            **({"warm_up": dict(self.warm_up)} if self.warm_up else {}),
            "total_seconds": round(self.total_seconds, 6),
        }

    def table(self) -> str:
        s = self.summary()
        rows = [(k, v) for k, v in s.items() if k not in ("seconds", "mode_rates", "switches", "warm_up")]
        if s.get("warm_up"):
            w = s["warm_up"]
            rows.append(("warm-up (not in total)", f"{w['seconds']:.4f} s, {w['target_calls']} target / "
                                                   f"{w['draft_calls']} draft / {w['decode_calls']} decoder call(s)"))
        rows += [(f"time {k} (s)", v) for k, v in s["seconds"].items()]
        rows += [(f"rate {label}", f"{r['tokens']} tokens in {r['seconds']:.4f} s"
                  + (f" ({r['tokens'] / r['seconds']:.1f} tokens/s)" if r["seconds"] > 0 else ""))
                 for label, r in s["mode_rates"].items()]
        rows += [(f"switch at round {w['round']}", f"{w['from']} -> {w['to']}: {w['reason']}") for w in s["switches"]]
        width = max(len(k) for k, _ in rows)
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_atomic(path, json.dumps(self.summary(), indent=2) + "\n")
        return path


def write_text_atomic(path: Path, text: str) -> None:
    from .files import check_write

    check_write(path)                            # never an input of the running command (runtime/files.py)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644 & ~_umask())          # mkstemp's 0600 would make the user's statistics private
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask, read without changing it (Linux /proc), else the common 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
