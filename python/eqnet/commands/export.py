"""`eqnet export RUN --out FILE.eqk`: a trained supernet run -> one .eqk file.

    eqnet export runs/layered --out model.eqk
    eqnet export runs/layered --out model.eqk --configs runs/layered/search-layered/configs.json
    eqnet export runs/mq --out mq.eqk --config mixed.json --config other.json

A nested (layered) run stores every width, ordered so a prefix of the file is the lower-width
model, plus the named configs. A non-nested run stores the given configs (default: one uniform
config per weight width), each in its own section. Configs come from `eqnet search`'s
configs.json (every chosen config, named mixed0, mixed1, ...) or SubnetConfig JSON files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

from eqnet.commands.argtypes import count


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="trained run directory (eqnet train --out)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .eqk file to write")
    p.add_argument("--configs", default=None, metavar="JSON", help="an eqnet search configs.json")
    p.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="JSON",
        help="a SubnetConfig JSON file (repeatable); named after the file's stem",
    )
    p.add_argument(
        "--bn-batches",
        type=count(0),
        default=None,
        help="held-out batches to re-estimate BN per width before export (default: the run's "
        "bn_batches; 0: keep the checkpoint's statistics)",
    )


def read_configs(configs_json=None, config_files=None) -> OrderedDict:
    """name -> SubnetConfig from a search's configs.json and/or SubnetConfig JSON files."""
    from eqnet.space import SubnetConfig

    out = OrderedDict()
    if configs_json:
        data = json.loads(Path(configs_json).read_text())
        chosen = data.get("chosen") if isinstance(data, dict) else None
        if not isinstance(chosen, list):
            raise ValueError(f"--configs {configs_json}: expected an eqnet search configs.json")
        for i, entry in enumerate(chosen):
            out[f"mixed{i}"] = SubnetConfig(entry["config"].items())
    for path in config_files or []:
        name = Path(path).stem
        if name in out or name.isdecimal():
            raise ValueError(f"--config {path}: name {name!r} is taken; rename the file")
        out[name] = SubnetConfig.from_json(Path(path).read_text())
    return out


def recalibrate_widths(supernet, loader, batches: int) -> None:
    """Re-estimate the BN statistics the exported widths use, as the trainer does before it
    evaluates: per-bit BN once per weight width (each width's own BNs); shared BN once, at the
    highest width (a file holds one set of shared statistics)."""
    from eqnet.convert import recalibrate_bn
    from eqnet.deploy.export import default_configs

    active = supernet.config()
    widths = list(default_configs(supernet).values())
    if not getattr(supernet, "per_bit_bn", False):
        widths = widths[-1:]
    for cfg in widths:
        supernet.set_config(cfg)
        recalibrate_bn(supernet, loader, batches=batches)
    supernet.set_config(active)
    supernet.eval()


def export_run(run_dir, out, configs=None, bn_batches: int | None = None) -> dict:
    """Export a trained run (BN statistics re-estimated on its augmented held-out split first,
    unless bn_batches=0); returns the written header."""
    from eqnet.data import data_task
    from eqnet.deploy import export
    from eqnet.run import load_run

    run = load_run(run_dir)
    if run.space is None:
        raise ValueError(f"{run_dir}: a float run has no quantized supernet to export")
    batches = run.config.bn_batches if bn_batches is None else bn_batches
    if batches:
        recalibrate_widths(run.model, run.bn_images(batches), batches)
    extra = {
        "data": run.config.data,
        "recipe": run.config.recipe,
        "run": str(run_dir),
        "bn_batches": batches,  # eqnet eval --reference re-estimates the run's BN the same way
    }
    if data_task(run.config.data) == "causal-lm":  # what eqnet eval rebuilds the windows from
        extra["data_options"] = {"seq_len": run.config.seq_len, "text_bytes": run.config.text_bytes}
    return export(run.model, out, configs=configs or None, extra=extra)


def summary(header: dict) -> str:
    sizes = [s["nbytes"] for s in header["sections"]]
    kind = "nested (prefix = lower width)" if header["nested"] else "per-config sections"
    lines = [f"{kind}; top width {header['top_bits']}; section bytes {sizes}"]
    for key, need in header["widths"].items():
        lines.append(f"  {key}: sections {need}")
    return "\n".join(lines)


def run(args) -> int:
    from eqkernels import EqkFormatError, atomic

    try:
        atomic.remove_stale_temps(Path(args.out).resolve().parent)
        configs = read_configs(args.configs, args.config)
        header = export_run(args.run, args.out, configs, args.bn_batches)
    except (FileNotFoundError, ValueError, NotImplementedError, EqkFormatError) as exc:
        print(f"eqnet export: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")
    print(summary(header))
    return 0
