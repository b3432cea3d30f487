"""Bad inputs against the real console commands: every one must fail with one `error: ...` line, exit status 2,
no traceback, and nothing written.

    python benchmarks/bad_inputs.py            # writes docs/bad-inputs.md and docs/bad-inputs.json
    python benchmarks/bad_inputs.py --render   # the Markdown again from the JSON (no commands run)

The cases come in groups, one section of the report each, registered from their own modules (GROUP_MODULES):
bad_inputs_cli.py (options, paths, checkpoints, manifests) and bad_inputs_hostile.py (outputs over inputs, FIFOs,
absurd manifests, foreign checkpoints, small engines, signals). A group brings its own fixtures and cases.

In a fresh temporary directory it saves a small random checkpoint (the `tiny-mnist-small` preset, as the tests'
`random_checkpoint` fixture), exports it once to ONNX with `fastardiff-export` (about a minute on 2 cores), derives
broken copies of that engine directory (manifest edits, a tampered engine file), and then runs each case as a
subprocess of `.venv/bin/fastardiff`, `fastardiff-run` or `fastardiff-export` with the temporary directory as the
working directory (so the commands show relative paths). CUDA is hidden from the commands (CUDA_VISIBLE_DEVICES
empty), so the `--device cuda` cases mean the same on every machine. For each case it records the exit status, the
`error:` line, whether a traceback appeared and whether any file or directory under the temporary directory (the
plan cache included) appeared, changed or vanished. The script exits 1 if any case fails those criteria.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
TRACEBACK = "Traceback (most recent call last)"
CASE_TIMEOUT_S = 180


@dataclass
class Outcome:
    number: int
    area: str
    what: str
    command: str
    exit: int
    message: str
    error_lines: int
    traceback: bool
    wrote: list
    seconds: float
    group: str = "cli"
    want_exit: int = 2              # 128 + signal for the interrupt cases
    want_line: str = "error: "      # the one line the command must print ("interrupted by " for signals)

    @property
    def problems(self) -> list[str]:
        found = []
        if self.traceback:
            found.append("traceback")
        if self.exit != self.want_exit:
            found.append(f"exit status {self.exit} (want {self.want_exit})")
        if self.error_lines != 1:
            found.append(f"{self.error_lines} `{self.want_line.strip()}` lines (want 1)")
        if self.wrote:
            found.append(f"wrote {', '.join(self.wrote[:4])}")
        return found


# ---------------------------------------------------------------------------------------------------------------
# fixtures


def save_random_checkpoint(path: Path) -> None:
    """A tiny-mnist-small checkpoint with seeded random weights (shapes only, not quality)."""
    import torch

    from fastardiff.recipes.checkpoint import DriftARCheckpoint, save_checkpoint
    from fastardiff.recipes.config import Calibration, get_config
    from fastardiff.recipes.models import build_models

    config = get_config("tiny-mnist-small")
    torch.manual_seed(0)
    target, draft, decoder = build_models(config)
    save_checkpoint(path, DriftARCheckpoint(config, Calibration(e_max=1.0), target, draft, decoder).eval())


def edited_engine_copy(source: Path, dest: Path, edit) -> None:
    """A copy of the engine dir `source` whose manifest dict went through `edit` (in place)."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))


def set_field(path: str, value=None, delete: bool = False):
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            manifest = manifest[key]
        if delete:
            del manifest[last]
        else:
            manifest[last] = value
    return edit


def make_fixtures(work: Path, env: dict) -> str:
    """Checkpoints, engine dirs and blocked paths the cases name; returns the unwritable output directory."""
    import torch

    save_random_checkpoint(work / "random.pt")
    (work / "notckpt.pt").write_text("this is a text file, not a checkpoint\n")
    torch.save({"state_dict": {"weight": torch.zeros(3)}, "epoch": 7}, work / "foreign.pt")
    started = time.time()
    export = subprocess.run([str(BIN / "fastardiff-export"), "--ckpt", "random.pt", "--target", "onnx", "--out", "eng",
                             "--no-draft", "--gamma", "1", "--batch", "2"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=900)
    if export.returncode != 0:
        sys.exit(f"exporting the fixture engines failed ({export.returncode}):\n{export.stderr[-3000:]}")
    print(f"exported fixture engines in {time.time() - started:.0f} s", flush=True)
    (work / "eng-nomanifest").mkdir()
    (work / "eng-nomanifest" / "decoder.onnx").write_bytes((work / "eng" / "decoder.onnx").read_bytes())
    edited_engine_copy(work / "eng", work / "eng-nowidth", set_field("config.width", delete=True))
    edited_engine_copy(work / "eng", work / "eng-texthead", set_field("config.heads", "four"))
    edited_engine_copy(work / "eng", work / "eng-batch0", set_field("max_batch", 0))
    edited_engine_copy(work / "eng", work / "eng-v2", set_field("format_version", 2))
    edited_engine_copy(work / "eng", work / "eng-heads5", set_field("config.heads", 5))
    edited_engine_copy(work / "eng", work / "eng-nanemax", set_field("calibration.e_max", float("nan")))
    edited_engine_copy(work / "eng", work / "eng-tflite", set_field("backend", "tflite"))
    edited_engine_copy(work / "eng", work / "eng-badjson", lambda m: None)
    (work / "eng-badjson" / "manifest.json").write_text('{"format_version": 1, "engines": ')
    shutil.copytree(work / "eng", work / "eng-tampered")
    blob = bytearray((work / "eng-tampered" / "decoder.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (work / "eng-tampered" / "decoder.onnx").write_bytes(bytes(blob))
    (work / "afile").write_text("a regular file\n")
    (work / "adir").mkdir()
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("not an engine dir\n")
    (work / "badstate").mkdir()
    (work / "badstate" / "resume-state.pt").write_text("not a training state\n")
    if os.geteuid() == 0:          # root writes through permission bits: a path under a regular file is unwritable
        return "afile/out"
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)
    return "ro"


# ---------------------------------------------------------------------------------------------------------------
# case groups: each a section of the report. A group module (benchmarks/bad_inputs_*.py, named in GROUP_MODULES)
# defines `GROUP`, a dict of CaseGroup's fields: its fixtures (made once in the shared temporary directory, after
# the base fixtures) and its cases, as tuples (area, what, argv[, signal, ready glob]).


@dataclass
class Case:
    area: str
    what: str
    argv: list                      # argv[0]: a console script in .venv/bin
    signal: int = 0                 # send this signal once `ready` (a glob under the work dir) matches
    ready: str = ""


@dataclass
class CaseGroup:
    name: str
    title: str
    about: str                      # a paragraph of the report: what the group's fixtures are
    cases: object                   # (unwritable path) -> list of Case or (area, what, argv)
    fixtures: object = None         # (work dir, env) -> None


GROUPS: dict[str, CaseGroup] = {}
GROUP_MODULES = ("bad_inputs_cli", "bad_inputs_hostile")     # further groups: add their module here


def register(group: CaseGroup) -> CaseGroup:
    GROUPS[group.name] = group
    return group


def load_groups() -> list[CaseGroup]:
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for module in GROUP_MODULES:
        register(CaseGroup(**importlib.import_module(module).GROUP))
    return list(GROUPS.values())


def as_case(item) -> Case:
    return Case(*item)


# ---------------------------------------------------------------------------------------------------------------
# running and reporting


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (size, mtime) and directory under root."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            seen[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = ("dir",)
        for f in filenames:
            st = os.lstat(os.path.join(dirpath, f))
            seen[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
    return seen


def _default_signals() -> None:
    """In the child: the signal's default disposition, even where this script runs as a background job (whose
    children start with SIGINT ignored, which a command rightly keeps)."""
    import signal

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)


def _interrupt(proc: subprocess.Popen, case: Case, work: Path) -> None:
    """Send case.signal once case.ready matches under work (polled, bounded by CASE_TIMEOUT_S)."""
    deadline = time.time() + CASE_TIMEOUT_S
    while proc.poll() is None and time.time() < deadline:
        if list(work.glob(case.ready)):
            proc.send_signal(case.signal)
            return
        time.sleep(0.05)


def run_case(number: int, case: Case, work: Path, env: dict, group: str = "cli") -> Outcome:
    before = snapshot(work)
    started = time.time()
    proc = subprocess.Popen([str(BIN / case.argv[0])] + case.argv[1:], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=_default_signals if case.signal else None)
    if case.signal:
        _interrupt(proc, case, work)
    try:
        out, err = proc.communicate(timeout=CASE_TIMEOUT_S)
        code, output = proc.returncode, err + "\n" + out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code, output = -1, f"timed out after {CASE_TIMEOUT_S} s\n{err or ''}"
    after = snapshot(work)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    want_line = "interrupted by " if case.signal else "error: "
    errors = [line for line in lines if line.startswith(want_line)]
    if case.signal:      # an interrupted run must print no error line besides its one `interrupted` line
        errors += [line for line in lines if line.startswith(("error: ", "internal error"))]
    message = errors[0] if errors else next((line for line in lines if "error" in line.lower()),
                                            lines[0] if lines else "(no output)")
    return Outcome(number, case.area, case.what, shlex.join(case.argv), code, message, len(errors),
                   TRACEBACK in output, changed, round(time.time() - started, 1), group,
                   128 + case.signal if case.signal else 2, want_line)


def markdown(outcomes: list[Outcome], unwritable: str, seconds: float, groups: list[CaseGroup]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    bad = [o for o in outcomes if o.problems]
    head = [
        "# Bad inputs: one `error:` line, exit status 2, no traceback, nothing written",
        "",
        f"Generated by `python benchmarks/bad_inputs.py` ({len(outcomes)} cases, {seconds:.0f} s, "
        f"{'all pass' if not bad else f'{len(bad)} FAIL'}). Interrupted commands (the signal cases) must instead exit "
        "with 128 + the signal's number and print one `interrupted by SIG...` line; every case must leave the "
        "directory as it found it. Each command ran as a subprocess of the installed console "
        "script in a fresh temporary directory holding a random `tiny-mnist-small` checkpoint (`random.pt`), its ONNX "
        "export (`eng`, `--no-draft --gamma 1`), broken copies of that export (`eng-*`), a text file as a checkpoint "
        "(`notckpt.pt`), a foreign torch file (`foreign.pt`), a regular file `afile` and a directory `adir`. "
        f"The unwritable location is `{unwritable}` "
        f"({'a path under a regular file: this ran as root, which writes through permission bits' if unwritable.startswith('afile') else 'a directory with mode 0555'}). "
        "CUDA was hidden from the commands. *wrote files?* compares a listing of the whole temporary directory "
        "(sizes and modification times, the plan cache included) before and after each command.",
        "",
        "What every command guarantees, besides the one-line errors:",
        "",
        "- **Inputs are never outputs.** An `--out`, `--out-dir` image, `--stats-json`, `--grid` or export/training "
        "`--out` that is one of the command's own inputs (the checkpoint and its JSON, the manifest, an engine file, "
        "the plugin library, a cached `--gamma auto` plan) is refused before any work: by resolved path and by file "
        "identity, so hard links and symlinks count, and a directory the command replaces or fills (export, train) "
        "must not hold one. The write primitives check the same set again as they write (`runtime/files.py`).",
        "- **Only regular files are read.** A FIFO, socket or device given as a checkpoint, manifest or engine file is "
        "refused from a `stat` (it is never opened, so nothing blocks).",
        "- **Signals leave nothing.** SIGTERM, SIGINT or SIGHUP stop a run or an export through its clean-up paths: "
        "staged images, statistics and temporary engine directories are removed, nothing reaches a destination, "
        "the directories it created are gone; one line `interrupted by SIG...`, exit status 128 + the signal.",
        "- **Engine calls fit the engines.** Images are split into calls of at most `Manifest.max_batch_rows` rows "
        "(the export's `--batch` and every engine's batch profile); a request one call cannot hold (guidance's two "
        "rows per image on engines exported for batch 1) is refused before generating.",
        "- **Manifests are bounded.** Sizes, statistics and `E_max / tau_sigma` have upper bounds far above any real "
        "model, and the config's heads, widths, token and layer counts must match the engine files' inputs.",
    ]
    rows = []
    for group in groups:
        mine = [o for o in outcomes if o.group == group.name]
        if not mine:
            continue
        rows += ["", f"## {group.title}", "", group.about, "",
                 "| # | bad input | command | exit | message | traceback? | wrote files? |",
                 "|---|---|---|---|---|---|---|"]
        rows += [f"| {o.number} | {o.area}: {cell(o.what)} | `{cell(o.command)}` | {o.exit} | {cell(o.message)} | "
                 f"{'yes' if o.traceback else 'no'} | {cell(', '.join(o.wrote)) if o.wrote else 'no'} |"
                 for o in mine]
    tail = ["", "Failures:", ""] + [f"- #{o.number} {o.what}: {'; '.join(o.problems)}" for o in bad] if bad else []
    return "\n".join(head + rows + tail) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run only the cases whose area or description contains this")
    parser.add_argument("--md", default=str(REPO / "docs" / "bad-inputs.md"))
    parser.add_argument("--json", default=str(REPO / "docs" / "bad-inputs.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--render", action="store_true", help="only write --md again from the cases in --json")
    args = parser.parse_args(argv)
    if args.render:
        record = json.loads(Path(args.json).read_text())
        fields = set(Outcome.__dataclass_fields__)
        outcomes = [Outcome(**{k: v for k, v in c.items() if k in fields}) for c in record["cases"]]
        Path(args.md).write_text(markdown(outcomes, record["unwritable"], record["seconds"], load_groups()))
        return 0
    started = time.time()
    groups = load_groups()
    work = Path(tempfile.mkdtemp(prefix="fastardiff-bad-inputs-"))
    env = dict(os.environ, FASTARDIFF_CACHE_DIR=str(work / "plan-cache"), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    outcomes = []
    try:
        unwritable = make_fixtures(work, env)
        selected = []
        for group in groups:
            if group.fixtures is not None:
                group.fixtures(work, env)
            selected += [(group.name, c) for c in map(as_case, group.cases(unwritable))
                         if not args.only or args.only in c.area or args.only in c.what]
        for number, (group_name, case) in enumerate(selected, 1):
            outcome = run_case(number, case, work, env, group_name)
            outcomes.append(outcome)
            status = "ok  " if not outcome.problems else "FAIL"
            print(f"{status} {number:3d} {outcome.seconds:5.1f}s exit {outcome.exit} {outcome.command}\n"
                  f"           {outcome.message}" + (f"\n           -> {'; '.join(outcome.problems)}"
                                                     if outcome.problems else ""), flush=True)
    finally:
        if (work / "ro").exists():
            (work / "ro").chmod(0o755)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    seconds = time.time() - started
    Path(args.md).write_text(markdown(outcomes, unwritable, seconds, groups))
    Path(args.json).write_text(json.dumps({"unwritable": unwritable, "seconds": round(seconds, 1),
                                           "cases": [dict(asdict(o), problems=o.problems) for o in outcomes]},
                                          indent=1) + "\n")
    failed = [o for o in outcomes if o.problems]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} cases pass; {seconds:.0f} s; wrote {args.md}, {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
