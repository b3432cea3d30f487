"""Build every `--target trt` engine of the shipped models with the installed TensorRT library and tabulate it.

For each model (default: the shipped tiny-mnist and tiny-mnist-fast-ardiff checkpoints), KV update (in place, host)
and precision (fp32, fp16): export each engine's plugin graph (exporter/trt_target.export_engine_graph, the export's
own code, parity left out), parse and build it (build_engine_file), and record parsed / built / build seconds /
engine bytes / layers / plugin layers / KV-cache-update layers. The host variant rebuilds only the engines whose
graph differs from the in-place one (draft_step, target_verify, target_jacobi) at fp32; at fp16 the host form is the
default (an in-place fp16 graph is not built: it would update a cast copy of the cache), so every engine is built
there. The 100-step head_teacher (~5-10 min of one core, ~59k layers) is left out unless --with-teacher.

  .venv/bin/python benchmarks/trt_build_table.py --json docs/trt-build-table.json --markdown docs/trt-build-table.md

--variants picks KV-update:precision pairs (default all four); --from-manifest DIR adds the rows of an engine
directory `fastardiff-export --target trt` wrote (its manifest's export.trt figures: in place, the export's
precision). The JSON is rewritten after every engine, so an interrupted run keeps what it built. Build seconds
depend on the machine's load (note it with the figures); bytes and layer counts do not.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny-mnist": ROOT / "recipes/checkpoints/tiny-mnist.pt",
          "tiny-mnist-fast-ardiff": ROOT / "recipes/checkpoints/tiny-mnist-fast-ardiff.pt"}
HOST_ENGINES = ("draft_step", "target_verify", "target_jacobi")   # the engines whose host form differs


def build_variant(ckpt, kv_update: str, precision: str, args, work: Path, on_row=None) -> list[dict]:
    from fastardiff.errors import FastardiffError
    from fastardiff.exporter.engine_modules import shape_profiles
    from fastardiff.exporter.head_engines import HEAD_ENGINES, head_profile
    from fastardiff.exporter.targets import ExportOptions, check_options, engine_modules, resolve_options
    from fastardiff.exporter.trt_target import TensorRTBuild, build_engine_file, export_engine_graph

    opts = resolve_options(ExportOptions(target="trt", precision=precision, kv_update=kv_update, gamma=args.gamma,
                                         trt_library=args.trt_library,
                                         compute_capabilities=tuple(args.compute_capability.split(","))
                                         if args.compute_capability else ()))
    try:
        check_options(ckpt.config, opts)
    except FastardiffError as err:        # e.g. in-place fp16: recorded as not built, with the reason
        row = {"engine": "(every engine)", "kv_update": kv_update, "precision": precision, "parsed": False,
               "built": False, "error": str(err)}
        if on_row is not None:
            on_row(row)
        return [row]
    built = TensorRTBuild(opts)
    modules, _ = engine_modules(ckpt, opts)
    profiles = shape_profiles(ckpt.config, opts.max_batch, opts.gamma)
    rows = []
    for name, module in modules.items():
        if name == "head_teacher" and not args.with_teacher:
            continue
        if kv_update == "host" and precision == "fp32" and name not in HOST_ENGINES:
            continue          # the same graph as the in-place fp32 build (the default at fp32)
        if args.engines and name not in args.engines.split(","):
            continue
        profile = head_profile(ckpt.config, name, opts.max_batch, opts.gamma) if name in HEAD_ENGINES \
            else profiles[name]
        row = {"engine": name, "kv_update": kv_update, "precision": precision, "parsed": False, "built": False}
        start = time.perf_counter()
        try:
            graph = export_engine_graph(ckpt, name, module, profile, work, opts, built)
            row["export_seconds"] = round(time.perf_counter() - start, 1)
            row["plugin_nodes"] = graph.plugin_nodes
            build_engine_file(built, ckpt.config.to_dict(), graph, work, precision)
            row.update(parsed=True, built=True, **table_fields(built.stats[name]))
        except FastardiffError as err:
            row["parsed"] = "could not parse" not in str(err)
            row["error"] = str(err)[:300]
        except Exception as err:  # the ONNX export itself failed (torch.export / onnx): no graph to parse
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(err).splitlines()[0])[:240]   # no terminal colours
            row["error"] = f"ONNX export failed: {type(err).__name__}: {first}"
        rows.append(row)
        if on_row is not None:
            on_row(row)
        logging.info("%s %s %s %s: %s", ckpt.config.name, kv_update, precision, name,
                     {k: row.get(k) for k in ("built", "seconds", "bytes", "plugin_layers", "kv_cache_update_layers")})
        for leftover in work.glob(f"{name}.*"):
            leftover.unlink()
    return rows


def manifest_rows(spec: str) -> list[dict]:
    """Rows from an export's manifest: DIR (every engine it built) or DIR:engine,engine (only those), with the
    export's own figures."""
    path, _, only = spec.partition(":")
    engine_dir = Path(path)
    data = json.loads((engine_dir / "manifest.json").read_text())
    trt = data["export"]["trt"]
    model = data["config"].get("name", engine_dir.name)
    kv = "in-place" if data["export"].get("kv_update", "").startswith("in place") else "host"
    return [{"model": model, "engine": name, "kv_update": kv, "precision": data["precision"], "parsed": True,
             "built": True, "source": f"fastardiff-export manifest ({engine_dir.name})", **table_fields(stats)}
            for name, stats in trt["engines"].items() if not only or name in only.split(",")]


def table_fields(stats: dict) -> dict:
    """A build's figures without its optimisation profile (the manifest keeps that)."""
    return {k: v for k, v in stats.items() if k != "profile"}


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown(result: dict) -> str:
    """One row per engine build; engines taken from an export's manifest are marked (export), failures listed."""
    lines = ["| model | engine | KV update | precision | parsed | built | build s | MB | layers | plugin layers | "
             "KV-cache-update layers |", "|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    order = {"in-place": 0, "host": 1}
    rows = sorted(result["rows"], key=lambda r: (r["model"], order.get(r["kv_update"], 2), r["precision"]))
    for r in rows:
        name = r["engine"] + (" (export)" if r.get("source") else "")
        head = f"| {r['model']} | {name} | {r['kv_update']} | {r['precision']} | {'yes' if r['parsed'] else 'no'} | "
        if r["built"]:
            lines.append(head + f"yes | {r['seconds']} | {r['bytes'] / 1e6:.1f} | {r['layers']} | "
                         f"{r['plugin_layers']} | {r['kv_cache_update_layers']} |")
        else:
            lines.append(head + "no | - | - | - | - | - |")
            notes.append(f"- {r['model']} {r['engine']} {r['kv_update']} {r['precision']}: {r.get('error', '')}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--variants", default="in-place:fp32,host:fp32,host:fp16",
                        help="KV-update:precision pairs, comma-separated")
    parser.add_argument("--from-manifest", action="append", default=[], metavar="DIR[:ENGINES]",
                        help="also take the rows of this export's manifest, or of the engines named (repeatable)")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--trt-library", default="tensorrt_rtx")
    parser.add_argument("--compute-capability", default="")
    parser.add_argument("--engines", default="", help="only these engines (comma-separated; default all)")
    parser.add_argument("--with-teacher", action="store_true", help="also build the 100-step head_teacher")
    parser.add_argument("--from-json", type=Path, action="append", default=[],
                        help="also take the rows of an earlier run's JSON (repeatable: to merge runs)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fastardiff").setLevel(logging.WARNING)
    from fastardiff.recipes.checkpoint import load_checkpoint

    import importlib.metadata as md

    meta = {"library": args.trt_library, "python": platform.python_version(),
            "versions": {d: md.version(d) for d in ("tensorrt_rtx_cu12",) if _installed(d)},
            "machine": platform.machine(), "gamma": args.gamma, "with_teacher": args.with_teacher,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows = [r for d in args.from_manifest for r in manifest_rows(d)]
    rows += [r for f in args.from_json for r in json.loads(f.read_text())["rows"]]

    def save():
        result = {"meta": meta, "rows": rows}
        write_atomically(args.json, json.dumps(result, indent=1) + "\n")
        if args.markdown:
            write_atomically(args.markdown, markdown(result))

    with tempfile.TemporaryDirectory(prefix="trt-table-") as tmp:
        for model in filter(None, args.models.split(",")):
            ckpt = load_checkpoint(MODELS[model])
            for variant in args.variants.split(","):
                kv_update, precision = variant.split(":")
                def keep(row, model=model):
                    rows.append({"model": model, **row})
                    save()

                build_variant(ckpt, kv_update, precision, args, Path(tmp), keep)
    save()
    failed = [f"{r['model']}/{r['engine']}/{r['kv_update']}/{r['precision']}" for r in rows if not r["built"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} engines built" + (f"; not built: {failed}" if failed else ""))
    return 1 if failed else 0


def _installed(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
