"""GPU specs for the cost model: a datasheet table, fitted constants, and the planning device.

The planning device is the current CUDA device when there is one; otherwise the ``device=``
option, else ``$PATCHC_DEVICE``, else ``h200`` -- so a CPU-only user plans for a GPU and can
inspect the result.  An explicit ``device=`` name always wins.  Calibrated constants (measured
on a GPU by a calibration run, not here) live in ``<cache dir>/calibration.json`` as
``{device name: {field: value}}`` and replace the datasheet values in ``load_device``.
The cache dir is ``patchc.files.cache_root`` (the ``cache_dir=`` option, ``$PATCHC_CACHE_DIR``, ...).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional, Union

import torch

from patchc.caches import BoundedCache
from patchc.dtypes import short_name
from patchc.files import atomic_write, cache_root

DEFAULT_DEVICE = "h200"
ENV_DEVICE = "PATCHC_DEVICE"
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class DeviceSpec:
    """One GPU as the cost model sees it.  Rates are dense (no 2:4 sparse-MMA doubling)."""

    name: str
    title: str
    mem_bw_gbs: float          # DRAM bandwidth, GB/s (datasheet)
    sm_count: int
    clock_ghz: float           # boost clock
    l2_mb: float
    smem_per_sm_kb: float      # shared memory per SM
    smem_per_block_kb: float   # largest opt-in shared memory per program
    tflops_bf16: float         # dense tensor-core rate, fp32 accumulate
    tflops_fp16: float
    tflops_tf32: float
    tflops_fp32: float         # CUDA-core FMA rate (fp32 matmul at "highest" precision)
    l2_bw_gbs: float = 10000.0  # L2 -> SM bandwidth, GB/s: what re-reads of X and W cost
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    launch_us: float = 2.5     # launch + ramp of one kernel (GPU side, CUDA graph ~2-3 us)
    # ---- fitted constants (defaults are estimates; calibration replaces them) ----
    bw_eff: float = 0.88       # achievable fraction of DRAM bandwidth (streaming reads ~88-92 %)
    mma_eff: float = 0.75      # achievable fraction of the tensor-core peak for Triton tl.dot
    mem_latency_ns: float = 550.0   # loaded DRAM latency (HBM ~500-600 ns): Little's law for bytes in flight
    sm_bytes_per_clk: float = 64.0  # most one SM pulls from L2/DRAM per clock (L1 fill path)
    warp_ipc: float = 0.5      # issue rate of one warp alone on a sub-partition (dependency stalls)
    split_us: float = 1.5      # split-K extras: zero the fp32 workspace + cast it back (two small kernels)
    arch: int = 90             # compute capability x 10: the SASS target the cost model reads
    # ---- pipe throughputs, warp-instructions per clock per SM (see PIPE_SOURCES) ----
    issue_per_clk: float = 4.0      # one warp-instruction per clock per SM sub-partition (4 per SM)
    int_per_clk: float = 2.0        # 32-bit integer add/logic/shift/compare/IMAD: 64 lanes per clock
    fp_per_clk: float = 4.0         # FP32 FFMA/FADD/FMUL: 128 lanes per clock (Ampere A100: 64)
    lsu_per_clk: float = 1.0        # load/store unit: one warp-instruction per clock into L1TEX
    xu_per_clk: float = 0.5         # conversions / transcendentals: 16 lanes per clock
    mma_flop_per_clk: float = 2048.0    # mma.sync (HMMA) dense 16-bit FLOP per clock per SM, as issued

    def pipe_rates(self) -> dict:
        """Warp-instructions per second of the whole GPU on every counted pipe (``sass.PIPES``;
        "tensor" in FLOP/s of mma.sync)."""
        per_s = self.sm_count * self.clock_ghz * 1e9
        return {"issue": self.issue_per_clk * per_s, "int": self.int_per_clk * per_s, "fp": self.fp_per_clk * per_s,
                "lsu": self.lsu_per_clk * per_s, "xu": self.xu_per_clk * per_s,
                "tensor": self.mma_flop_per_clk * per_s}

    def demand(self, per_tile: dict, tile_bytes: float) -> dict:
        """Each pipe's demand when tiles of ``tile_bytes`` DRAM bytes stream at the full datasheet
        bandwidth and each costs ``per_tile`` warp-instructions per pipe ("issue" = all of them;
        "tensor" in FLOP): 1.0 = the pipe is exactly saturated."""
        tiles_per_s = self.mem_bw_gbs * 1e9 / tile_bytes
        rates = self.pipe_rates()
        return {p: per_tile[p] * tiles_per_s / rates[p] for p in per_tile if p in rates}

    def tflops(self, dtype) -> float:
        """Tensor-core rate for a dtype; fp32 is TF32 unless matmul precision is "highest"."""
        name = dtype_key(dtype)
        if name == "fp32":
            return self.tflops_fp32 if torch.get_float32_matmul_precision() == "highest" else self.tflops_tf32
        return self.tflops_bf16 if name == "bf16" else self.tflops_fp16

    def to_dict(self) -> dict:
        return asdict(self)


# Pipe throughputs (``DeviceSpec.*_per_clk``), per SM and clock, and where they come from:
# * issue: 4 SM sub-partitions, one warp-instruction each per clock (NVIDIA Volta..Hopper
#   architecture whitepapers);
# * int / fp / xu: the CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table: 32-bit
#   integer add, compare, logic, shift and multiply-add run 64 lanes per clock per SM on compute
#   capability 8.x/9.0 (2 warp-instr); FP32 add/multiply/FMA 128 lanes (8.6, 8.9, 9.0) or 64 (8.0);
#   type conversions 16 lanes;
# * lsu: the L1TEX/shared-memory front end accepts one warp-wide request per clock per SM (128 B/clk
#   of shared memory; Nsight Compute's "lsu" pipe), so 1;
# * mma_flop_per_clk: mma.sync m16n8k16 dense FLOP per clock per SM as Triton issues it: A100 2048
#   (312 TFLOPS / 108 SMs / 1.41 GHz), Ampere/Ada GeForce-class 1024 at fp32 accumulate, Hopper
#   2350: mma.sync reaches about 62 % of the wgmma peak of 3790 (Luo et al., "Benchmarking and
#   Dissecting the Nvidia Hopper GPU Architecture", arXiv 2402.13499).
PIPE_SOURCES = ("CUDA C++ Programming Guide: arithmetic instruction throughput per compute capability; "
                "Nsight Compute profiling guide: pipe names; arXiv 2402.13499: Hopper mma.sync throughput")

# Per-architecture limits.  launch_us: an empty kernel in a CUDA graph costs ~2 us on Hopper and a
# little more on Ampere/Ada.  l2_bw_gbs: L2 -> SM bandwidth from published microbenchmarks
# (H100 ~10 TB/s, A100 ~5 TB/s, AD102 ~5 TB/s, GA102 ~3 TB/s); a calibration run should fit it.
_HOPPER = dict(smem_per_sm_kb=228, smem_per_block_kb=227, max_warps_per_sm=64, launch_us=2.0, l2_bw_gbs=10000,
               mma_flop_per_clk=2350.0, arch=90)
_AMPERE = dict(smem_per_sm_kb=164, smem_per_block_kb=163, max_warps_per_sm=64, launch_us=2.5, l2_bw_gbs=5000,
               fp_per_clk=2.0, arch=80)
_ADA_GA102 = dict(smem_per_sm_kb=100, smem_per_block_kb=99, max_warps_per_sm=48, launch_us=2.5, l2_bw_gbs=5000,
                  bw_eff=0.90, mma_flop_per_clk=1024.0, arch=89)   # GDDR6/6X: streaming reads get a little closer to the datasheet

# Datasheet numbers (dense, i.e. half of NVIDIA's "with sparsity" figures).
DEVICES: dict[str, DeviceSpec] = {d.name: d for d in (
    # H200 SXM: 4.8 TB/s HBM3e, 132 SMs, 989 TF bf16/fp16, 494 TF tf32, 67 TF fp32.  L2: the
    # published GH100 product value is 50 MB (the full die has 60 MB, which is what the project's
    # GPU check reported); with a GPU present, properties replace sm_count and l2_mb anyway.
    DeviceSpec("h200", "NVIDIA H200 SXM", 4800, 132, 1.98, 50, tflops_bf16=989.4, tflops_fp16=989.4,
               tflops_tf32=494.7, tflops_fp32=66.9, **_HOPPER),
    DeviceSpec("h100", "NVIDIA H100 SXM5 80GB", 3350, 132, 1.98, 50, tflops_bf16=989.4, tflops_fp16=989.4,
               tflops_tf32=494.7, tflops_fp32=66.9, **_HOPPER),
    DeviceSpec("h100-pcie", "NVIDIA H100 PCIe", 2000, 114, 1.755, 50, tflops_bf16=756.0, tflops_fp16=756.0,
               tflops_tf32=378.0, tflops_fp32=51.2, **{**_HOPPER, "l2_bw_gbs": 7500}),
    DeviceSpec("a100", "NVIDIA A100 SXM4 80GB", 2039, 108, 1.41, 40, tflops_bf16=312.0, tflops_fp16=312.0,
               tflops_tf32=156.0, tflops_fp32=19.5, mem_latency_ns=500.0, **_AMPERE),
    # A6000 / RTX 4090: fp16/bf16 tensor rate *with fp32 accumulate* (the 4090 halves it vs fp16 acc)
    DeviceSpec("a6000", "NVIDIA RTX A6000", 768, 84, 1.80, 6, tflops_bf16=154.8, tflops_fp16=154.8,
               tflops_tf32=77.4, tflops_fp32=38.7, **{**_ADA_GA102, "l2_bw_gbs": 3000, "arch": 86}),
    DeviceSpec("rtx4090", "NVIDIA GeForce RTX 4090", 1008, 128, 2.52, 72, tflops_bf16=165.2, tflops_fp16=165.2,
               tflops_tf32=82.6, tflops_fp32=82.6, **_ADA_GA102),
    DeviceSpec("l40s", "NVIDIA L40S", 864, 142, 2.52, 96, tflops_bf16=362.05, tflops_fp16=362.05,
               tflops_tf32=183.0, tflops_fp32=91.6, **_ADA_GA102),
)}
_ALIASES = {"4090": "rtx4090", "rtx-4090": "rtx4090", "geforce-rtx-4090": "rtx4090", "rtx-a6000": "a6000",
            "h100-sxm": "h100", "h100-sxm5": "h100", "a100-80gb": "a100", "a100-sxm": "a100", "h200-sxm": "h200"}
# substrings of torch.cuda.get_device_name(), most specific first
_CUDA_NAMES = (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("a100", "a100"),
               ("a6000", "a6000"), ("4090", "rtx4090"), ("l40s", "l40s"))
_NUMERIC = {f.name for f in fields(DeviceSpec) if f.name not in ("name", "title")}


def dtype_key(dtype) -> str:
    """'bf16' | 'fp16' | 'fp32' for a torch dtype or a name ('bfloat16', 'half', ...)."""
    return short_name(dtype)


def known_devices() -> list[str]:
    """Names of the devices in the datasheet table."""
    return sorted(DEVICES)


def canonical_name(name: str) -> str:
    """Normalise a device name ('H100', 'RTX 4090', ...); ValueError listing the known names."""
    key = re.sub(r"[\s_]+", "-", str(name).strip().lower())
    key = _ALIASES.get(key, key)
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(known_devices())}")
    return key


def calibration_path(cache_dir=None) -> Path:
    """``<cache root>/calibration.json`` (``patchc.files.cache_root``)."""
    return cache_root(cache_dir) / CALIBRATION_FILE


_CAL_MEMO = BoundedCache("calibration files", 16)   # path -> (stat, data): read once per change


def _read_calibration(cache_dir=None) -> dict:
    path = calibration_path(cache_dir)
    try:
        st = path.stat()
        hit = _CAL_MEMO.get(path)
        if hit is not None and hit[0] == (st.st_mtime_ns, st.st_size, st.st_ino):
            return json.loads(json.dumps(hit[1]))       # a private copy
        data = json.loads(path.read_text())
        _CAL_MEMO.put(path, ((st.st_mtime_ns, st.st_size, st.st_ino), data))
        return json.loads(json.dumps(data))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"patchc: ignoring unreadable calibration file {path}: {exc}")
        return {}


def save_calibration(name: str, values: dict, cache_dir=None) -> Path:
    """Store fitted constants for a device (merged into earlier ones); atomic write. Returns the file."""
    name = canonical_name(name)
    bad = sorted(set(values) - _NUMERIC)
    if bad:
        raise ValueError(f"unknown calibration fields {bad}; valid: {sorted(_NUMERIC)}")
    data = _read_calibration(cache_dir)
    data.setdefault(name, {}).update({k: float(v) for k, v in values.items()})
    return atomic_write(calibration_path(cache_dir), json.dumps(data, indent=2, sort_keys=True))


def load_device(name: str, cache_dir=None) -> DeviceSpec:
    """The datasheet spec of ``name`` with calibrated constants (if any, from the calibration file
    under ``cache_dir``'s cache root) merged over it."""
    spec = DEVICES[canonical_name(name)]
    cal = {k: v for k, v in _read_calibration(cache_dir).get(spec.name, {}).items() if k in _NUMERIC}
    if cal:
        ints = {"sm_count", "regs_per_sm", "max_warps_per_sm", "arch"}
        spec = replace(spec, **{k: (int(v) if k in ints else float(v)) for k, v in cal.items()})
    return spec


def _cuda_device(cache_dir=None) -> Optional[DeviceSpec]:
    """The current CUDA device as a spec (known name; else the nearest by architecture)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    label = props.name.lower()
    name = next((n for pat, n in _CUDA_NAMES if pat in label), None)
    if name is None:
        name = {9: "h100", 8: "a100" if props.minor == 0 else "l40s" if props.minor == 9 else "a6000"}.get(
            props.major, DEFAULT_DEVICE)
        warnings.warn(f"patchc: no specs for {props.name!r}; planning with {name}'s rates "
                      f"and its own SM count / L2 size (calibrate for better plans)")
    spec = load_device(name, cache_dir)
    l2 = getattr(props, "L2_cache_size", 0)
    return replace(spec, sm_count=props.multi_processor_count, l2_mb=l2 / 2**20 if l2 else spec.l2_mb,
                   arch=10 * props.major + props.minor)


def get_device(device: Union[None, str, DeviceSpec, torch.device] = None, cache_dir=None) -> DeviceSpec:
    """The planning device: an explicit name/spec, else the current CUDA device, else
    ``$PATCHC_DEVICE``, else ``h200``.  ``device="cuda"`` / a CUDA torch.device means the current GPU.
    Calibrated constants come from the calibration file under ``cache_dir``'s cache root."""
    if isinstance(device, DeviceSpec):
        return device
    if isinstance(device, torch.device) or device in ("cuda", "auto", "current"):
        device = None   # a torch device (even "cpu") is not a GPU model: plan for the current GPU / default
    if device is None:
        spec = _cuda_device(cache_dir)
        if spec is not None:
            return spec
        device = os.environ.get(ENV_DEVICE) or DEFAULT_DEVICE
    return load_device(device, cache_dir)
