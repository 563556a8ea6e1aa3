"""What this installation of leanops can run here: versions, the device, how leanops._C was built, and for every
op family, provider and device type whether it is built and usable, and why not. ``leanops info`` prints it.

``collect()`` returns plain data (tests check it, ``leanops info --json`` prints it); ``format_info()`` turns it
into the text the command line shows.
"""
import importlib.metadata
import os
import platform

import torch

from . import __version__, _extension, ops

DEVICE_TYPES = ("cpu", "cuda")


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "not installed" (read from metadata, without importing)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), or what `platform` knows, or "unknown CPU"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask where the platform has one, else all cores)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    """A human-readable name for `device`: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_cores()} cores)"


def backend_table() -> list[dict]:
    """One entry per (family, provider, device type): built, usable, and why not, from the families' declarations
    (leanops.ops)."""
    return [row for family in ops.FAMILIES for device_type in DEVICE_TYPES for row in family.status(device_type)]


def collect() -> dict:
    """Everything ``leanops info`` reports, as plain data (strings, numbers, booleans, lists, dicts)."""
    cuda_visible = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())] if cuda_visible else []
    return {
        "versions": {
            "leanops": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda or "not a CUDA build",
            "triton": package_version("triton"),
        },
        "device": {
            "cuda_visible": cuda_visible,
            "gpus": gpus,
            "cpu": cpu_model(),
            "cpu_cores": cpu_cores(),
        },
        "extension": {
            "loaded": _extension.extension_loaded(),
            "build_info": dict(_extension.build_info),
            "error": _extension.extension_error,
        },
        "environment": {name: os.environ.get(name) for name in ("LEANOPS_BACKEND", "TRITON_INTERPRET")},
        "backends": backend_table(),
        "auto_order": {family.name: {device: list(names) for device, names in family.preference.items()}
                       for family in ops.FAMILIES},
    }


def format_info(info: dict) -> str:
    """The text ``leanops info`` prints for the data of ``collect()``."""
    versions, device, extension = info["versions"], info["device"], info["extension"]
    lines = [f"leanops {versions['leanops']}",
             f"  python  {versions['python']}",
             f"  torch   {versions['torch']} (CUDA: {versions['torch_cuda']})",
             f"  triton  {versions['triton']}",
             "",
             "device"]
    if device["gpus"]:
        lines += [f"  cuda:{index}  {name}" for index, name in enumerate(device["gpus"])]
    else:
        lines.append("  no CUDA device visible")
    lines += [f"  cpu     {device['cpu']}, {device['cpu_cores']} cores", "", "leanops._C"]
    if extension["loaded"]:
        build = extension["build_info"]
        kernels = "CPU and CUDA kernels" if build.get("cuda") else "CPU kernels only"
        lines.append(f"  loaded: {kernels}, built against torch {build.get('torch', 'unknown')}")
        if build.get("cuda"):
            lines.append(f"  CUDA architectures: {build.get('cuda_arch_list') or 'unknown'}")
    else:
        cause, _, fix = (extension["error"] or "").partition(" Fix: ")
        lines.append(f"  not available: {cause}")
        if fix:
            lines.append(f"  fix: {fix}")
    set_variables = {name: value for name, value in info["environment"].items() if value is not None}
    if set_variables:
        lines += ["", "environment"] + [f"  {name}={value}" for name, value in set_variables.items()]

    lines += ["", "providers per op family (leanops.ops)"]
    header = ("provider", "device", "built", "usable", "why not")
    def why_not(reason: str | None) -> str:
        # The extension's cause and fix are printed once above, not in every row.
        if reason and reason.startswith("leanops._C is not available"):
            return "leanops._C is not available (see above)"
        return reason or ""

    rows = [(entry["backend"], entry["device_type"], "yes" if entry["built"] else "no",
             "yes" if entry["usable"] else "no", why_not(entry["reason"])) for entry in info["backends"]]
    widths = [max(len(str(row[column])) for row in rows + [header]) for column in range(len(header) - 1)]

    def line(row) -> str:
        return "    " + "  ".join([str(cell).ljust(width) for cell, width in zip(row, widths)] + [row[-1]]).rstrip()

    for family, order in info["auto_order"].items():
        tries = "; ".join(f"on {device}: {', '.join(names)}" for device, names in order.items())
        lines += [f"  {family} (auto tries {tries})", line(header)]
        lines += [line(row) for row, entry in zip(rows, info["backends"]) if entry["family"] == family]
    return "\n".join(lines)
