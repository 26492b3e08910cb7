"""The GPUs normlab knows, in one table: dense bf16 tensor-core peak FLOP/s (for the MFU of the training logs and
`pretrain bench`, and the tokens/s of `pretrain plan`) and memory (what `pretrain plan` fits a layout into).

Standard library only: `pretrain plan` and the config commands read it without torch. Peaks are NVIDIA's datasheet
figures without sparsity; memory is the capacity the CUDA driver reports (nvidia-smi's MiB / 1024), a little under
the marketing figure. A GPU is found by its `torch.cuda.get_device_name` (`for_device_name`: substrings, in table
order, so that the PCIe and NVL cards are not taken for SXM ones) or by a name given on the command line
(`find`: "H100", "h100-sxm", "A100-80GB", "B200", ... or a device name)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pretrain.errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str  # as `pretrain plan` prints it
    peak_bf16_flops: float  # dense (no 2:4 sparsity) bf16 tensor-core peak, FLOP/s
    memory_gib: float  # device memory as CUDA reports it, GiB
    device_names: tuple[str, ...]  # substrings of torch.cuda.get_device_name that identify it (first match wins)
    aliases: tuple[str, ...] = ()  # more spellings for `--gpu` (compared by `key`)


GPUS = (
    GPU("H100 PCIe", 756e12, 79.6, ("H100 PCIe",)),  # "NVIDIA H100 PCIe"
    GPU("H100 NVL", 835e12, 93.6, ("H100 NVL",)),  # 94 GB
    GPU("H200 NVL", 835e12, 140.4, ("H200 NVL",)),
    GPU("GH200", 989e12, 95.6, ("GH200",)),  # "NVIDIA GH200 480GB": 96 GB of HBM3 beside the Grace CPU's memory
    GPU("H200", 989e12, 140.4, ("H200",), ("H200 SXM",)),  # 141 GB: its own row, never an H100's or A100's memory
    GPU("H100 SXM", 989e12, 79.6, ("H100",), ("H100", "H100 80GB", "H100 SXM5")),  # "NVIDIA H100 80GB HBM3"
    GPU("B200", 2.25e15, 179.1, ("B200",), ("B200 SXM", "HGX B200")),  # 180 GB enabled (of 192 GB); 1,000 W HGX
    GPU("A100 40GB", 312e12, 40.0, ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB")),
    GPU("A100 80GB", 312e12, 80.0, ("A100",), ("A100", "A100 SXM", "A100 PCIe")),  # SXM4 and PCIe alike
    GPU("L40S", 362e12, 45.0, ("L40S",)),
    GPU("A10", 125e12, 22.5, ("A10",)),  # after "A100"
    GPU("RTX 4090", 165e12, 24.0, ("4090",), ("4090",)),  # with fp32 accumulation
)


def key(name: str) -> str:
    """A name as `find` compares it: lower case, without spaces, dashes, underscores and a leading "nvidia"."""
    k = re.sub(r"[\s_\-]+", "", name.lower())
    return k[len("nvidia"):] if k.startswith("nvidia") else k


def for_device_name(device_name: str) -> GPU | None:
    """The GPU whose `torch.cuda.get_device_name` is `device_name` (None: not in the table)."""
    return next((g for g in GPUS if any(s in device_name for s in g.device_names)), None)


def find(name: str) -> GPU:
    """The GPU `name` means: a table name or alias in any case and spacing ("h100-sxm", "A100-80GB"), or a device
    name as torch reports it ("NVIDIA H100 80GB HBM3"); else a one-line UserError listing the known names."""
    wanted = key(name)
    for gpu in GPUS:
        if wanted in {key(n) for n in (gpu.name, *gpu.aliases)}:
            return gpu
    gpu = for_device_name(name) if len(name) > 4 else None  # a device name ("NVIDIA A100-SXM4-80GB"), not a fragment
    if gpu is None:
        raise UserError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS)}")
    return gpu
