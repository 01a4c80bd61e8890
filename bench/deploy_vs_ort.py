"""The deployed integer runtime against onnxruntime, one model at a time (used by
bench_deploy.py).

For each model and batch size, in the same process and at the same thread count:
- `torch fp32`: the float network (random init) in eager torch;
- `ORT fp32`: the same network exported with `torch.onnx.export` (static shape per batch),
  onnxruntime with default session options except the thread count;
- `ORT int8`: onnxruntime's own static quantization of that export (`quantize_static`, QDQ,
  per-channel weights, int8 activations and weights, MinMax calibration on random inputs);
- `eqk WbAb steps`: the `.eqk` file of the converted supernet (nested weights 2/4/8,
  activations 2/4/8, first/last layers 8-bit), loaded with `eqnet.deploy.load(path, bits=b,
  max_bits=b)`: the step-list runtime (one C++ call per forward; a row reads `modules
  (fallback)` if the network could not be expressed as a step list);
- `eqk W4A4 modules`: the same file with `runtime="modules"` (one prepared op per layer, the
  rest of the network in Python), the runtime before the step list.

Latency does not depend on the weights' values, so every network is randomly initialized and
calibrated on random data. The runtimes are timed in rotation (one call of each per round,
the median over rounds), so that load from other processes hits every row alike and the
ratios between rows of one (model, batch) stay meaningful on a shared machine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

WIDTHS = (8, 4, 2)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _onnx_models(float_model, x: torch.Tensor, tmp: Path, calib: list[torch.Tensor]):
    """(fp32 path, int8 QDQ path) for input shape x.shape."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32 = tmp / f"float_b{x.shape[0]}.onnx"
    int8 = tmp / f"int8_b{x.shape[0]}.onnx"
    torch.onnx.export(float_model, (x,), str(fp32), input_names=["x"], output_names=["y"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": c.numpy()} for c in calib])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(fp32),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return fp32, int8


def _eqk_file(name: str, float_model, size, tmp: Path) -> Path:
    import eqnet
    from eqnet.deploy import export
    from eqnet.space import ElasticSpace

    space = ElasticSpace(w_bits=WIDTHS, a_bits=WIDTHS, nested=True)
    net = eqnet.convert(float_model, space, keep_first_last="8bit")
    gen = torch.Generator().manual_seed(1)
    eqnet.calibrate(net, [(torch.randn(4, *size, generator=gen), None)], batches=1, method="lsq")
    path = tmp / "model.eqk"
    export(net.eval(), path, arch=name)
    return path


def compare(
    table, name: str, size: tuple, batches: tuple, threads: int, timing: dict, widths=WIDTHS
) -> None:
    """Add the rows of one model (module docstring) to `table`."""
    from eqnet import models
    from eqnet.deploy import load

    torch.manual_seed(0)
    num_classes = 10 if name == "resnet20" else 1000
    float_model = models.get(name, num_classes=num_classes).eval()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        eqk = _eqk_file(name, float_model, size, tmp)
        deployed = {b: load(eqk, bits=b, max_bits=b, model=float_model) for b in widths}
        per_layer = (
            load(eqk, bits=4, max_bits=4, runtime="modules", model=float_model)
            if 4 in widths
            else None
        )
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, *size, generator=gen)
            calib = [torch.randn(batch, *size, generator=gen) for _ in range(2)]
            fp32, int8 = _onnx_models(float_model, x, tmp, calib)
            feed = {"x": x.numpy()}
            rows = [("torch fp32", lambda x=x: float_model(x))]
            for label, path in (("ORT fp32", fp32), ("ORT int8", int8)):
                session = _session(path, threads)
                rows.append((label, lambda s=session, f=feed: s.run(None, f)))
            for b in widths:
                m = deployed[b]
                with torch.no_grad():
                    m(x)  # builds the step program (or records why not)
                how = "steps" if m.runtime_reason is None else "modules (fallback)"
                rows.append((f"eqk W{b}A{b} {how}", lambda m=m, x=x: m(x)))
            if per_layer is not None:
                rows.append(("eqk W4A4 modules", lambda m=per_layer, x=x: m(x)))
            with torch.no_grad():
                medians = rotation_medians([fn for _, fn in rows], **timing[batch])
            for (label, _), sec in zip(rows, medians):
                table.add(model=name, batch=batch, runtime=label, threads=threads, ms=sec * 1e3)


def rotation_medians(fns, *, warmup: int, rounds: int, min_time: float = 0.0) -> list[float]:
    """Median seconds per call of each fn, timed one call each per round, in turn."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < rounds or time.perf_counter() - start < min_time:
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]
