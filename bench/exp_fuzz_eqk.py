"""A large fuzz campaign against the .eqk loader (run by hand; the suite runs 300 cases).

Exports two small deployment files (a nested digits_cnn supernet with a mixed config, and a
non-nested one with per-tensor/asymmetric forms), then loads N crafted variants of each
(tests/eqk_fuzzer.py: CRC-valid header mutations, layer geometry and form edits, class counts,
tensor-table edits, NaN/Inf/zero/subnormal values; every CRC, digest and the identity
recomputed) in long-lived workers under RLIMIT_AS (VmSize + 1 GiB) and a 60 s per-case limit.
Prints the count of each outcome: rejected (EqkFormatError), identical (outputs bit-identical
to the original file at the same config), absent (a valid file without the width or config
asked for: the documented ValueError for that argument), WRONG (silent wrong load), OTHER (another
exception), MEMORY, HANG, CRASH, and one example of each failure.

    python -m bench.exp_fuzz_eqk --cases 6000 --seed 1
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fuzzer():
    """The suite's fuzzer (tests/eqk_fuzzer.py), loaded from its file: tests is no package."""
    spec = importlib.util.spec_from_file_location("eqk_fuzzer", ROOT / "tests" / "eqk_fuzzer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _export(workdir: str) -> dict[str, tuple[str, list]]:
    import eqnet
    import torch
    from eqnet import models
    from eqnet.deploy import export
    from eqnet.space import ElasticSpace, SubnetConfig

    out = {}
    nested = ElasticSpace(w_bits=(2, 3, 4), a_bits=(2, 4, 8), nested=True)
    flat = ElasticSpace(w_bits=(2, 4, 8), a_bits=(4, 8), w_granularities=("tensor", "channel"),
                        w_symmetries=("sym", "asym"), a_symmetries=("sym", "asym"))  # fmt: skip
    for name, space in (("nested", nested), ("flat", flat)):
        torch.manual_seed(0)
        sn = eqnet.convert(models.get("digits_cnn"), space, keep_first_last="8bit")
        gen = torch.Generator().manual_seed(0)
        eqnet.calibrate(sn, [(torch.randn(8, 1, 8, 8, generator=gen), torch.zeros(8))], batches=1)
        mixed = SubnetConfig.random(space, sn, torch.Generator().manual_seed(1))
        path = os.path.join(workdir, f"{name}.eqk")
        configs = {"mixed": mixed}
        if name == "flat":
            configs["u4"] = SubnetConfig.uniform(space, sn, 4, 4, "tensor", "asym", "sym")
            configs["u8"] = SubnetConfig.uniform(space, sn, 8, 8)
        export(sn, path, configs=configs, arch="digits_cnn")
        if name == "nested":
            sel = [{}, {"bits": 2, "max_bits": 2}, {"bits": 3, "max_bits": 3}, {"bits": 4},
                   {"config": "mixed"}]  # fmt: skip
        else:
            sel = [{}, {"config": "mixed"}, {"config": "u4"}, {"config": "u8"}]
        out[name] = (path, sel)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=6000, help="cases per file (two files)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")]
    )
    total: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, (path, sel) in _export(workdir).items():
            result = _fuzzer().campaign(path, workdir, seed=args.seed, count=args.cases,
                              workers=args.workers, env=env, selections=sel,
                              log=lambda m, n=name: print(f"[{n}] {m}", flush=True))  # fmt: skip
            print(f"{name}: {result['counts']} in {result['seconds']:.0f} s")
            for k, v in result["counts"].items():
                total[k] = total.get(k, 0) + v
            for kind, examples in result["examples"].items():
                note, message, trace = examples[0]
                print(f"  {kind} x{len(examples)}: {note} -> {message}\n{trace or ''}")
    print(f"total: {total} over {sum(total.values())} variants")
    failures = sum(v for k, v in total.items() if k not in ("rejected", "identical", "absent"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
