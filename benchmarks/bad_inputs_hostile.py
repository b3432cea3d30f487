"""Hostile command lines (issue 36), a case group of benchmarks/bad_inputs.py: outputs that are the command's own
inputs, FIFOs and devices where a file is read, manifests whose values pass the schema's types but are absurd or do
not describe their engine files, foreign checkpoints and out-of-range lengths, requests larger than the engines'
batch profile, and SIGTERM / SIGINT in the middle of a long run or an export."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from bad_inputs import edited_engine_copy, set_field

REPO = Path(__file__).resolve().parents[1]


def fixtures(work: Path, env: dict) -> None:
    eng = work / "eng"
    os.mkfifo(work / "fifo.pt")
    os.link(eng / "manifest.json", work / "manifest-link.json")
    (work / "grid-link.png").symlink_to("eng/manifest.json")
    (work / "ckdir").mkdir()
    shutil.copy(work / "random.pt", work / "ckdir" / "0000-three.png")    # named like the run's first image
    (work / "models").mkdir()
    shutil.copy(work / "random.pt", work / "models" / "model.pt")
    (work / "trained").mkdir()
    shutil.copy(work / "random.pt", work / "trained" / "tiny-mnist.pt")  # what draft-onpolicy would write there
    shutil.copy(REPO / "recipes" / "checkpoints" / "tiny-mnist-fast-ardiff.pt", work / "fa.pt")
    shutil.copy(work / "random.pt", work / "calib.pt")
    config = json.loads((eng / "manifest.json").read_text())["config"]
    edited_engine_copy(eng, work / "eng-size1e30", set_field("config.image_size", 10 ** 30))
    edited_engine_copy(eng, work / "eng-sizefloat", set_field("config.image_size", 1e30))
    edited_engine_copy(eng, work / "eng-emax1e308", set_field("calibration.e_max", 1e308))
    edited_engine_copy(eng, work / "eng-tausigma", set_field("config.tau_sigma", 0.01))
    edited_engine_copy(eng, work / "eng-taustatic", set_field("calibration.tau_static", -1e300))
    edited_engine_copy(eng, work / "eng-heads", set_field("config.heads", config["heads"] * 2))
    edited_engine_copy(eng, work / "eng-tokendim", set_field("config.token_dim", config["token_dim"] * 2))
    edited_engine_copy(eng, work / "eng-layers", set_field("config.target_layers", config["target_layers"] + 1))
    edited_engine_copy(eng, work / "eng-width0", set_field("config.width", 0))
    edited_engine_copy(eng, work / "eng-batchhuge", set_field("max_batch", 10 ** 12))

    def batch_one(manifest: dict) -> None:
        manifest["max_batch"] = 1
        for entry in manifest["engines"].values():
            if "batch" in entry.get("profile", {}):
                entry["profile"]["batch"] = [1, 1, 1]
    edited_engine_copy(eng, work / "eng-b1", batch_one)
    for name in ("manifest.json", "decoder.onnx"):
        d = work / f"eng-fifo-{name.split('.')[0]}"
        shutil.copytree(eng, d)
        (d / name).unlink()
        os.mkfifo(d / name)


def cases(ro: str) -> list[tuple]:
    run = ["fastardiff-run"]
    eng = run + ["--engine", "eng", "--prompt", "3", "--gamma", "1"]
    fa = ["fastardiff"]
    term, intr = int(signal.SIGTERM), int(signal.SIGINT)
    long_run = run + ["--engine", "eng", "--prompt", "0,1,2,3,4,5,6,7,8,9", "--num-images", "5000", "--mode",
                      "target", "--gamma", "1", "--out", "grid/x.png", "--out-dir", "imgs/all", "--stats-json",
                      "stats/s.json"]
    return [
        ("overwrite", "--stats-json is the engine manifest", eng + ["--stats-json", "eng/manifest.json"]),
        ("overwrite", "--out is an engine file", eng + ["--out", "eng/decoder.onnx"]),
        ("overwrite", "--stats-json is a hard link of the manifest", eng + ["--stats-json", "manifest-link.json"]),
        ("overwrite", "--out is a symlink to the manifest", eng + ["--out", "grid-link.png"]),
        ("overwrite", "--out-dir image named like the --ckpt", run + ["--ckpt", "ckdir/0000-three.png", "--prompt",
                                                                      "3", "--gamma", "1", "--out-dir", "ckdir"]),
        ("overwrite", "--out is the --ckpt", run + ["--ckpt", "random.pt", "--prompt", "3", "--out", "random.pt"]),
        ("overwrite", "export --out holds the --ckpt", ["fastardiff-export", "--ckpt", "models/model.pt", "--target",
                                                        "onnx", "--out", "models"]),
        ("overwrite", "export --out is the working dir holding the --ckpt",
         ["fastardiff-export", "--ckpt", "random.pt", "--target", "onnx", "--out", "."]),
        ("overwrite", "train --out holds the --init checkpoint", fa + ["train", "--stage", "draft-onpolicy", "--init",
                                                                       "trained/tiny-mnist.pt", "--out", "trained"]),
        ("overwrite", "eval --grid is the --ckpt", fa + ["eval", "--ckpt", "random.pt", "--n", "4", "--grid",
                                                         "random.pt"]),
        ("hang", "FIFO as info --ckpt", fa + ["info", "--ckpt", "fifo.pt"]),
        ("hang", "FIFO as export --ckpt", ["fastardiff-export", "--ckpt", "fifo.pt", "--target", "onnx", "--out",
                                           "e2"]),
        ("hang", "FIFO as calibrate --ckpt", fa + ["calibrate", "--ckpt", "fifo.pt"]),
        ("hang", "FIFO as run --ckpt", run + ["--ckpt", "fifo.pt", "--prompt", "3"]),
        ("hang", "FIFO as eval --ckpt", fa + ["eval", "--ckpt", "fifo.pt", "--n", "4"]),
        ("hang", "FIFO as train --init", fa + ["train", "--stage", "draft-onpolicy", "--init", "fifo.pt", "--out",
                                               "t2"]),
        ("hang", "FIFO as the engine manifest", run + ["--engine", "eng-fifo-manifest", "--prompt", "3"]),
        ("hang", "FIFO as an engine file", run + ["--engine", "eng-fifo-decoder", "--prompt", "3"]),
        ("hang", "character device as --ckpt", fa + ["info", "--ckpt", "/dev/zero"]),
        ("absurd", "manifest image_size 10^30", run + ["--engine", "eng-size1e30", "--prompt", "3"]),
        ("absurd", "manifest image_size 1e30 (a float)", run + ["--engine", "eng-sizefloat", "--prompt", "3"]),
        ("absurd", "manifest e_max 1e308", run + ["--engine", "eng-emax1e308", "--prompt", "3"]),
        ("absurd", "manifest tau_sigma 0.01 (sigma(E) overflows)", run + ["--engine", "eng-tausigma", "--prompt",
                                                                          "3"]),
        ("absurd", "manifest tau_static -1e300", run + ["--engine", "eng-taustatic", "--prompt", "3"]),
        ("absurd", "manifest heads doubled (engine files disagree)", run + ["--engine", "eng-heads", "--prompt", "3"]),
        ("absurd", "manifest token_dim doubled (engine files disagree)", run + ["--engine", "eng-tokendim",
                                                                                "--prompt", "3"]),
        ("absurd", "manifest target_layers + 1 (engine files disagree)", run + ["--engine", "eng-layers", "--prompt",
                                                                                "3"]),
        ("absurd", "manifest width 0", run + ["--engine", "eng-width0", "--prompt", "3"]),
        ("absurd", "manifest max_batch 10^12", run + ["--engine", "eng-batchhuge", "--prompt", "3"]),
        ("foreign", "calibrate a fast-ardiff checkpoint", fa + ["calibrate", "--ckpt", "fa.pt"]),
        ("foreign", "draft-onpolicy --init a fast-ardiff checkpoint", fa + ["train", "--stage", "draft-onpolicy",
                                                                            "--init", "fa.pt", "--out", "t3"]),
        ("range", "calibrate --jacobi-windows 1000", fa + ["calibrate", "--ckpt", "calib.pt", "--jacobi-windows",
                                                           "1000"]),
        ("range", "calibrate --jacobi-windows 2,64 (a model of 64 tokens)",
         fa + ["calibrate", "--ckpt", "calib.pt", "--jacobi-windows", "2,64"]),
        ("range", "calibrate --cfg-scales 1e9", fa + ["calibrate", "--ckpt", "calib.pt", "--cfg-scales", "1,1e9"]),
        ("range", "bench pipeline --jacobi 1000", fa + ["bench", "pipeline", "--jacobi", "1000", "--no-export",
                                                        "--no-torch"]),
        ("range", "bench pipeline --gamma 1000", fa + ["bench", "pipeline", "--gamma", "1000", "--no-export",
                                                       "--no-torch"]),
        ("range", "run --temperature 1e-30", eng + ["--temperature", "1e-30"]),
        ("batch", "--cfg-scale 2 on batch-1 engines", run + ["--engine", "eng-b1", "--prompt", "3", "--cfg-scale",
                                                             "2"]),
        ("batch", "--cfg-scale 2 --mode target on batch-1 engines", run + ["--engine", "eng-b1", "--prompt", "3,4",
                                                                           "--cfg-scale", "2", "--mode", "target"]),
        ("batch", "--cfg-scale 1.5 --gamma 1 on batch-1 engines", run + ["--engine", "eng-b1", "--prompt", "3",
                                                                         "--cfg-scale", "1.5", "--gamma", "1"]),
        ("signal", "SIGTERM during a 5000-image run", long_run, term, "imgs/all/.fastardiff-stage-*/*.png"),
        ("signal", "SIGINT during a 5000-image run", long_run, intr, "imgs/all/.fastardiff-stage-*/*.png"),
        ("signal", "SIGTERM during an export", ["fastardiff-export", "--ckpt", "random.pt", "--target", "onnx",
                                                "--out", "new/e3", "--no-draft", "--gamma", "1"], term,
         "new/.e3.tmp-*/*"),
    ]


GROUP = {"name": "hostile", "title": "Hostile command lines: outputs over inputs, FIFOs, absurd manifests, foreign "
         "checkpoints, small engines, signals",
         "about": "Further fixtures: `fifo.pt` (a FIFO), a hard link and a symlink to `eng/manifest.json`, a copy of "
                  "`random.pt` named `ckdir/0000-three.png` (the name of the run's first image), `models/model.pt`, "
                  "`trained/tiny-mnist.pt`, the shipped fast-ardiff checkpoint as `fa.pt`, copies of `eng` whose "
                  "manifest was edited (`eng-*`; `eng-b1` describes a `--batch 1` export: max_batch 1, every batch "
                  "profile [1, 1, 1]), and copies with a FIFO in place of the manifest or an engine file. The signal "
                  "cases send the signal once the command has staged files (its readiness, polled).",
         "cases": cases, "fixtures": fixtures}
