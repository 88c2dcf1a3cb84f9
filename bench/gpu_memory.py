"""GPU memory as users and other papers quote it, beside torch's own counters.

`torch.cuda.max_memory_allocated` counts the bytes tensors held at most. What `nvidia-smi`
and gpustat show is NVML's figure for the process: that, plus the caching allocator's
reserve, cuDNN's and cuBLAS's workspaces and the CUDA context itself. The targets
(bench/README.md) ask for both side by side.
"""
from __future__ import annotations

import os
from typing import Any

import torch

MB = 1 << 20


def nvml_memory(device: torch.device) -> dict[str, Any]:
    """{"nvml_process_mb": this process's memory on `device` per NVML, "nvml_process_of": how
    it was found, "nvml_device_mb": all memory in use on the device}, read now.

    NVML lists processes by their ids outside any process namespace; where this process's id
    is not among them (a sandbox) but NVML lists one process alone, that one is taken, as
    it can only be this one ("the only process"). None where NVML (the nvidia-ml-py
    package) is missing or cannot say: a reading that fails costs the figure, never the
    benchmark's record.
    """
    found: dict[str, Any] = {"nvml_process_mb": None, "nvml_process_of": None, "nvml_device_mb": None}
    try:
        import pynvml
    except ImportError:
        return found
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError, or whatever an old or broken library raises
        return found
    try:
        handle = _nvml_handle(pynvml, torch.cuda.get_device_properties(device))
        if handle is None:
            return found
        found["nvml_device_mb"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / MB
        # usedGpuMemory is None where the driver withholds it.
        listed = [p for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.usedGpuMemory is not None]
        mine = [p for p in listed if p.pid == os.getpid()]
        if mine or len(listed) == 1:
            found["nvml_process_mb"] = (mine or listed)[0].usedGpuMemory / MB
            found["nvml_process_of"] = "this process id" if mine else "the only process"
    except Exception:
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
