"""GPU memory as users and other papers quote it, beside torch's own counters.

`torch.cuda.max_memory_allocated` counts the bytes tensors held at most. What `nvidia-smi`
and gpustat show is NVML's figure for the process: that, plus the caching allocator's
reserve, cuDNN's and cuBLAS's workspaces and the CUDA context itself. Issue 15 asks for
both side by side.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

MB = 1 << 20


def nvml_memory(device: torch.device) -> dict[str, Optional[float]]:
    """{"nvml_process_mb": this process's memory on `device` per NVML, "nvml_device_mb":
    all memory in use on it}, read now; None where NVML (the nvidia-ml-py package) is
    missing or cannot say, as when a process namespace hides this process's id from it."""
    found: dict[str, Optional[float]] = {"nvml_process_mb": None, "nvml_device_mb": None}
    try:
        import pynvml
    except ImportError:
        return found
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return found
    try:
        handle = _nvml_handle(pynvml, torch.cuda.get_device_properties(device))
        if handle is None:
            return found
        found["nvml_device_mb"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / MB
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            # usedGpuMemory is None where the driver withholds it.
            if process.pid == os.getpid() and process.usedGpuMemory is not None:
                found["nvml_process_mb"] = process.usedGpuMemory / MB
    except pynvml.NVMLError:
        pass
    finally:
        pynvml.nvmlShutdown()
    return found


def _nvml_handle(pynvml: Any, props: Any) -> Any:
    # NVML numbers devices its own way (CUDA_VISIBLE_DEVICES renumbers torch's): match the
    # PCI address instead.
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pci = pynvml.nvmlDeviceGetPciInfo(handle)
        if (pci.domain, pci.bus, pci.device) == (props.pci_domain_id, props.pci_bus_id, props.pci_device_id):
            return handle
    return None
