"""What machine a benchmark ran on: the description stored with every benchmark run.

One function, ``machine_description``, at three levels of detail:

- ``"encoder"`` (the default): the host and the encoder a run embedded with
  (retrieval runs of ``evaluation.services`` and ``bench_ingest``);
- ``"host"``: the host in detail, CPU model and vector features, load average and
  library versions (``bench_queries``, whose encoder runs in the servers);
- ``"brief"``: core count and platform only (``bench_index``, which loads no model).
"""

from __future__ import annotations

import os
import platform

CPU_FEATURES = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16"}


def machine_description(encoder=None, *, detail: str = "encoder") -> dict:
    """The machine (and, at ``detail="encoder"``, the ``encoder``) as a JSON-ready dict."""
    if detail == "brief":
        return {"cpus": os.cpu_count(), "platform": platform.platform()}
    if detail == "host":
        return _host()
    if detail != "encoder":
        raise ValueError(f"detail is 'encoder', 'host' or 'brief', not {detail!r}")
    return _with_encoder(encoder)


def _with_encoder(encoder) -> dict:
    import torch

    device = encoder.device
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "inference": getattr(encoder, "backend", "torch"),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _host() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            text = fh.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["cpu_features"] = sorted(flags & CPU_FEATURES)
                break
    except OSError:
        pass
    try:
        import onnxruntime
        import torch

        info["torch"] = torch.__version__
        info["onnxruntime"] = onnxruntime.__version__
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:
        pass
    return info
