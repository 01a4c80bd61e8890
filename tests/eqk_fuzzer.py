"""A seeded fuzzer of .eqk deployment files: CRC-valid crafted headers and value corruptions.

Used by tests/test_format_fuzz.py (a few hundred cases per run) and bench/exp_fuzz_eqk.py (a
large campaign by hand). Every crafted file is re-packed from the specification in
docs/eqk-format.md (magic, u64 length, JSON, CRC32, 64-byte aligned sections each followed by
its CRC32), with every CRC, section digest and the identity recomputed, so only the reader's
validation can reject it. Cases are loaded by long-lived worker processes under an address-space
limit (RLIMIT_AS) and a per-case time limit. A case passes when the load raises EqkFormatError
or when the loaded model's outputs are bit-identical to the original file's at the same
configuration ("absent": a valid crafted file that does not offer the width or config asked for
raised the documented ValueError for that argument).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import select
import struct
import subprocess
import sys
import time
import zlib

HOSTILE = [
    2**40, 2**62, 2**63, -1, 0, 1, 3, 7, 9, 10**6, 10**7, 2 * 10**8, 2**31, 1.5, 1e308, -1e308,
    "x", "", None, True, False, [], {}, [2**62, 2**62, 0], [10**6, 10**6], [0], [-1], "a" * 5000,
    {"a": 1}, [[1]], "nested-channel", "w*", "float32", "int64",
]  # fmt: skip
GEOMETRY = {
    "kernel_size": [[1, 1], [5, 5], [3, 1], [2**20, 3], [0, 3]],
    "stride": [[2, 2], [1, 2], [0, 1], [10**6, 1]],
    "padding": [[0, 0], [2, 2], [10**6, 10**6], [-1, 0]],
    "dilation": [[2, 2], [1, 3], [0, 0]],
    "groups": [2, 4, 16, 0, 10**7],
    "has_bias": [True, False],
    "bn": [None, "model.features.1", "model.features.4", "model.fc", "model.nope"],
    "in_channels": [1, 8, 64, 10**7],
    "out_channels": [8, 10, 64, 2 * 10**8],
    "in_features": [32, 63, 10**7],
    "out_features": [9, 11, 10**7],
    "kind": ["linear", "conv2d", "lstm"],
    "fixed": [None, {"w_bits": 4, "a_bits": 4, "w_granularity": "channel", "w_symmetry": "sym",
                     "a_symmetry": "asym"}],
}  # fmt: skip
FORM = {
    "stored_bits": [1, 2, 3, 5, 8, 9, 2**40],
    "K": [1, 8, 143, 145, 10**9],
    "N": [1, 31, 33, 10**7],
    "nested": [True, False],
    "has_zero_point": [True, False],
    "quant_min": [-1, 1, -128, -2],
    "quant_max": [2, 4, 127, 254, 256],
}
BAD_VALUES = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e-45, 1e-40, -0.0]


def align64(n: int) -> int:
    return -(-n // 64) * 64


def split(blob: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<Q", blob, 4)
    header = json.loads(blob[12 : 12 + length])
    return header, blob[align64(12 + length + 4) :]


def repack(header: dict, data: bytes) -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head = b"EQK1" + struct.pack("<Q", len(body)) + body + struct.pack("<I", zlib.crc32(body))
    return head + bytes(align64(len(head)) - len(head)) + data


def reseal(header: dict, data: bytearray) -> None:
    """Recompute every section CRC, digest and the identity after `data` was edited."""
    digests = []
    for sec in header["sections"]:
        start, n = sec["offset"], sec["nbytes"]
        body = bytes(data[start : start + n])
        struct.pack_into("<I", data, start + n, zlib.crc32(body))
        digests.append(hashlib.sha256(body).hexdigest())
    header["digests"] = digests
    header["identity"] = hashlib.sha256(":".join(digests).encode("ascii")).hexdigest()


def craft(path, out, edit_header=None, edit_data=None):
    """Write to `out` the file at `path` after `edit_header(header)` and `edit_data(header, data)`,
    resealed (CRCs, digests, identity) so that only the reader's validation can reject it."""
    header, data = split(path.read_bytes())
    data = bytearray(data)
    if edit_header:
        edit_header(header)
    if edit_data:
        edit_data(header, data)
    reseal(header, data)
    out.write_bytes(repack(header, bytes(data)))
    return out


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _get(root, path):
    for p in path:
        root = root[p]
    return root


def _set(root, path, value):
    _get(root, path[:-1])[path[-1]] = value


def mutate_header_leaf(rng, header):
    paths = [p for p in _paths(header) if p and p[0] not in ("digests", "identity")]
    path = rng.choice(paths)
    target = _get(header, path)
    parent = _get(header, path[:-1])
    r = rng.random()
    if r < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
        return f"delete {path}"
    if r < 0.25 and isinstance(parent, list) and parent:
        if rng.random() < 0.5:
            parent.append(copy.deepcopy(target))
            return f"duplicate {path}"
        parent.pop(path[-1])
        return f"drop {path}"
    if r < 0.45 and isinstance(target, int) and not isinstance(target, bool):
        value = target + rng.choice([-1, 1, -64, 64, 2**32, -(2**32)])
    else:
        value = copy.deepcopy(rng.choice(HOSTILE))
    _set(header, path, value)
    return f"set {path} = {str(value)[:40]}"


def mutate_geometry(rng, header):
    layers = header["model"]["layers"]
    name = rng.choice(sorted(layers))
    key = rng.choice([k for k in GEOMETRY if k in layers[name] or rng.random() < 0.1])
    value = copy.deepcopy(rng.choice(GEOMETRY[key]))
    layers[name][key] = value
    return f"geometry {name}.{key} = {value}"


def mutate_form(rng, header):
    qlayers = header["quant"]["layers"]
    name = rng.choice(sorted(qlayers))
    kind = rng.choice(["weights", "acts"])
    fkey = rng.choice(sorted(qlayers[name][kind]))
    field = rng.choice([k for k in FORM if k in qlayers[name][kind][fkey]])
    value = rng.choice(FORM[field])
    qlayers[name][kind][fkey][field] = value
    return f"form {name}.{kind}[{fkey}].{field} = {value}"


def mutate_arch(rng, header):
    value = rng.choice([10**7, 2 * 10**8, 0, -1, 9, 11, "10", 10**12])
    header["model"]["arch"]["kwargs"]["num_classes"] = value
    return f"num_classes = {value}"


def mutate_tensor_entry(rng, header):
    entry = rng.choice(header["tensors"])
    key = rng.choice(["shape", "dtype", "offset", "nbytes", "section", "name"])
    if key == "shape" and rng.random() < 0.5:
        entry["shape"], entry["nbytes"] = [2**62, 2**62, 0], 0
        return f"tensor {entry['name']} shape overflow"
    values = {
        "shape": [[1], entry["shape"][::-1], entry["shape"] + [1], [2**40]],
        "dtype": ["int32", "float32", "float16", "int64", "uint8", "complex64"],
        "offset": [0, 64, 2**40, 1],
        "nbytes": [0, 4, 2**40],
        "section": [0, 1, 2, 99],
        "name": [header["tensors"][0]["name"], entry["name"] + "x", ""],
    }[key]
    entry[key] = rng.choice(values)
    return f"tensor {entry['name']}.{key} = {entry[key]}"


def corrupt_value(rng, header, data: bytearray):
    floats = [t for t in header["tensors"] if t["dtype"] == "float32" and t["nbytes"]]
    entry = rng.choice(floats)
    sec = header["sections"][entry["section"]]
    index = rng.randrange(entry["nbytes"] // 4)
    value = rng.choice(BAD_VALUES)
    if not entry["name"].endswith("/scale") and value in (0.0, -1.0, 1e-45, 1e-40, -0.0):
        value = rng.choice(BAD_VALUES[:3])  # a finite non-scale value is a valid model
    struct.pack_into("<f", data, sec["offset"] + entry["offset"] + 4 * index, value)
    return f"value {entry['name']}[{index}] = {value}"


def corrupt_zero_point(rng, header, data: bytearray):
    ints = [t for t in header["tensors"] if t["dtype"] == "int32" and t["name"].endswith(
        "/zero_point") and t["nbytes"]]  # fmt: skip
    if not ints:
        return corrupt_value(rng, header, data)
    entry = rng.choice(ints)
    sec = header["sections"][entry["section"]]
    index = rng.randrange(entry["nbytes"] // 4)
    value = rng.choice([2**31 - 1, -(2**31), 2**20, -(2**17)])
    struct.pack_into("<i", data, sec["offset"] + entry["offset"] + 4 * index, value)
    return f"value {entry['name']}[{index}] = {value}"


MUTATORS = [
    (mutate_header_leaf, 4),
    (mutate_geometry, 3),
    (mutate_form, 3),
    (mutate_arch, 1),
    (mutate_tensor_entry, 2),
    (corrupt_value, 3),
    (corrupt_zero_point, 1),
]


def make_case(rng, blob: bytes) -> tuple[bytes, str]:
    header, data = split(blob)
    data = bytearray(data)
    notes = []
    for _ in range(rng.choice([1, 1, 1, 2])):
        mutator = rng.choices([m for m, _ in MUTATORS], [w for _, w in MUTATORS])[0]
        try:
            if mutator in (corrupt_value, corrupt_zero_point):
                notes.append(mutator(rng, header, data))
            else:
                notes.append(mutator(rng, header))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, struct.error):
            notes.append("mutation skipped")
    try:
        reseal(header, data)
    except (KeyError, TypeError, IndexError, struct.error, ValueError):
        pass  # a mutated section table: the reader must reject the file as it is
    return repack(header, bytes(data)), "; ".join(notes)


# ------------------------------------------------------------------------------ the worker

WORKER = r"""
import json, resource, sys, traceback
import torch
torch.set_num_threads(1)
import eqnet
from eqkernels import EqkFormatError
from eqkernels.format import read_eqk_header
from eqnet.deploy import load

def vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
limit = vm_bytes() + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
original = sys.argv[1]
x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
refs = {}

def run(model):
    with torch.no_grad():
        return model(x)

def reference(cfg):
    key = cfg.to_json()
    if key not in refs:
        refs[key] = run(load(original, config=cfg))
    return refs[key]

for line in sys.stdin:
    case = json.loads(line)
    try:
        model = load(case["path"], **case["kwargs"])
        y = run(model)
        ref = reference(model.active_config)
        same = y.shape == ref.shape and torch.equal(y.view(torch.int32), ref.view(torch.int32))
        out = {"result": "identical" if same else "WRONG"}
    except EqkFormatError as exc:
        out = {"result": "rejected", "message": str(exc)[:200]}
    except ValueError as exc:
        # A valid file that does not offer the selection asked for: an argument error.
        header = read_eqk_header(case["path"])
        asked = str(case["kwargs"].get("bits", case["kwargs"].get("config", "")))
        offered = set(header["widths"]) & set(header["quant"]["configs"])
        absent = asked and asked not in offered
        out = {"result": "absent" if absent else "OTHER",
               "message": f"ValueError: {str(exc)[:200]}", "trace": traceback.format_exc()[-800:]}
    except MemoryError:
        out = {"result": "MEMORY"}
    except BaseException as exc:
        out = {"result": "OTHER", "message": f"{type(exc).__name__}: {str(exc)[:200]}",
               "trace": traceback.format_exc()[-800:]}
    print(json.dumps(out), flush=True)
"""


class Worker:
    def __init__(self, original: str, memory_bytes: int, env: dict):
        self.args = [sys.executable, "-c", WORKER, original, str(memory_bytes)]
        self.env = env
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self.env,
            text=True,
            bufsize=1,
        )

    def send(self, case: dict) -> None:
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.proc.wait()
            died = not ready
            self.start()
            return {"result": "HANG" if died else "CRASH"}
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


SELECTIONS = [{}, {"bits": 2, "max_bits": 2}, {"bits": 3, "max_bits": 3}, {"bits": 4}]


def campaign(original: str, workdir: str, seed: int, count: int, workers: int = 2,
             memory_bytes: int = 1 << 30, timeout: float = 60.0, env=None, log=None,
             selections=None) -> dict:  # fmt: skip
    """Run `count` crafted cases from `original`; returns counts per result and examples."""
    rng = random.Random(seed)
    selections = SELECTIONS if selections is None else selections
    blob = open(original, "rb").read()
    env = dict(os.environ if env is None else env)
    pool = [Worker(original, memory_bytes, env) for _ in range(workers)]
    counts: dict[str, int] = {}
    examples: dict[str, list] = {}
    start = time.time()
    pending: list[tuple[Worker, str, str]] = []
    try:
        for i in range(count):
            data, note = make_case(rng, blob)
            worker = pool[i % workers]
            path = os.path.join(workdir, f"case{i % (2 * workers)}.eqk")
            if len(pending) == workers:
                _collect(pending.pop(0), timeout, counts, examples)
            with open(path, "wb") as f:
                f.write(data)
            worker.send({"path": path, "kwargs": rng.choice(selections)})
            pending.append((worker, note, path))
            if log and (i + 1) % 1000 == 0:
                log(f"{i + 1} cases, {time.time() - start:.0f} s, {counts}")
        while pending:
            _collect(pending.pop(0), timeout, counts, examples)
    finally:
        for w in pool:
            try:
                w.close()
            except Exception:
                w.proc.kill()
    return {"counts": counts, "examples": examples, "seconds": time.time() - start}


def _collect(item, timeout, counts, examples):
    worker, note, _ = item
    out = worker.receive(timeout)
    result = out["result"]
    counts[result] = counts.get(result, 0) + 1
    if result not in ("rejected", "identical", "absent"):
        examples.setdefault(result, []).append((note, out.get("message"), out.get("trace")))
