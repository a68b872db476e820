"""Hardware profile -> torch device, dtype and thread settings, refusing impossible requests early."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch

from specsweep.backends.prepack import check_supported
from specsweep.errors import SpecsweepError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# what hardware.cuda_graphs and hardware.compile take: an explicit mask over a static cache
STATIC_CACHE_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    bool_masks: bool = False  # tree masks as bool [B,1,Sq,Skv] (NPU SDPA) instead of additive float
    max_verify_tokens: int | None = None  # most tokens one verify forward may hold and stay exact
    prepack_linear: bool = False  # reorder linear weights once for oneDNN (specsweep/backends/prepack.py)
    cuda_graphs: bool = False  # static KV cache, verify forwards replayed as CUDA graphs (specsweep/backends/target.py)
    verify_width: int | None = None  # every forward after the prefill padded to this many rows (exact on GPU)
    compile: bool = False  # verify forwards through torch.compile (specsweep/backends/target.py)
    lean_forward: bool = False  # verify forwards as bare tensor operations (specsweep/backends/lean.py)
    row_block: int | str = 1  # rows of prepacked products padded to a multiple of it; auto: per shape (prepack.py)
    exactness_probe: bool = False  # prove verify rows keep one-row bits before decoding (specsweep/backends/exactness.py)

    def check_verify_size(self, tokens: int, setting: str) -> None:
        if self.verify_width is not None and tokens > self.verify_width:
            raise SpecsweepError(
                f"{setting}: a verify forward of {tokens} tokens exceeds hardware.verify_width={self.verify_width}, "
                f"the rows every target forward holds on this profile; raise it or use a smaller tree")
        if self.max_verify_tokens is not None and tokens > self.max_verify_tokens:
            raise SpecsweepError(
                f"{setting}: a verify forward of {tokens} tokens exceeds hardware.max_verify_tokens="
                f"{self.max_verify_tokens}, beyond which this profile's kernels round differently than a "
                f"one-token step (outputs would not be token-for-token the target's); use a smaller tree")

    def loads_like(self, other: Hardware) -> bool:
        """Whether a model loaded for ``other`` is the one this profile loads (`models.load_model`);
        the other fields choose how its forwards run."""
        fields = ("device", "dtype", "attn_implementation", "prepack_linear", "row_block", "max_verify_tokens")
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    def describe(self) -> dict:
        info = {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "attn_implementation": self.attn_implementation, "bool_masks": self.bool_masks,
                "prepack_linear": self.prepack_linear, "cuda_graphs": self.cuda_graphs,
                "verify_width": self.verify_width, "compile": self.compile, "lean_forward": self.lean_forward,
                "row_block": self.row_block, "max_verify_tokens": self.max_verify_tokens,
                "exactness_probe": self.exactness_probe, "torch_threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
        return info


def missing_cxx_compiler() -> str | None:
    """The C++ compiler torch.compile needs on the CPU ($CXX, else g++), if it is not installed."""
    compiler = os.environ.get("CXX", "g++")
    return compiler if shutil.which(compiler) is None else None


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device)
    except ImportError:
        return False
    return torch.npu.is_available()


def pick_device(device: str) -> str:
    """``auto`` -> cuda, else npu, else cpu; anything else as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "npu" if _npu_available() else "cpu"


def resolve(cfg) -> Hardware:
    """``cfg``: the hardware config group (device, dtype, attn_implementation, threads)."""
    device = pick_device(cfg.device)
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise SpecsweepError(f"hardware.device={device}: this torch ({torch.__version__}) sees no CUDA device")
    if kind == "npu" and not _npu_available():
        raise SpecsweepError(f"hardware.device={device}: torch_npu is not installed or sees no NPU (pip install .[npu])")
    if kind not in ("cpu", "cuda", "npu"):
        raise SpecsweepError(f"hardware.device={device}: unknown device (cpu, cuda, npu or auto)")
    dtype_name = cfg.dtype
    if dtype_name == "auto":
        dtype_name = "float32" if kind == "cpu" else "bfloat16"
    if dtype_name not in DTYPES:
        raise SpecsweepError(f"hardware.dtype={dtype_name}: choose one of {', '.join(DTYPES)} or auto")
    tree_mask = cfg.get("tree_mask", "additive")
    if tree_mask not in ("additive", "bool"):
        raise SpecsweepError(f"hardware.tree_mask={tree_mask}: choose additive or bool")
    if tree_mask == "bool" and cfg.attn_implementation != "sdpa":
        # transformers' eager attention adds the mask: a bool mask would be silently wrong there
        raise SpecsweepError(f"hardware.tree_mask=bool needs attn_implementation=sdpa, got {cfg.attn_implementation}")
    prepack = bool(cfg.get("prepack_linear", False))
    if prepack:
        check_supported(torch.device(device), DTYPES[dtype_name])
    cuda_graphs = bool(cfg.get("cuda_graphs", False))
    if cuda_graphs and kind != "cuda":
        raise SpecsweepError(f"hardware.cuda_graphs=true needs a CUDA device, not {device}")
    compile_forwards = bool(cfg.get("compile", False))
    for flag, on in (("cuda_graphs", cuda_graphs), ("compile", compile_forwards)):
        if on and cfg.attn_implementation not in STATIC_CACHE_ATTENTION:
            raise SpecsweepError(f"hardware.{flag}=true needs attn_implementation sdpa or eager "
                                 f"(an explicit mask over a static cache), not {cfg.attn_implementation}")
    if compile_forwards and kind == "npu":
        raise SpecsweepError("hardware.compile=true: torch.compile's inductor has no npu backend here")
    if compile_forwards and kind == "cpu" and (compiler := missing_cxx_compiler()):
        raise SpecsweepError(f"hardware.compile=true on the CPU needs a C++ compiler ({compiler} not found)")
    verify_width = cfg.get("verify_width")
    if verify_width is not None and (isinstance(verify_width, bool) or not isinstance(verify_width, int)
                                     or verify_width < 1):
        raise SpecsweepError(f"hardware.verify_width must be a positive integer or null, got {verify_width!r}")
    if (verify_width is not None or compile_forwards) and tree_mask == "bool":
        raise SpecsweepError("hardware.verify_width and hardware.compile need tree_mask=additive "
                             "(their static cache takes additive masks)")
    lean_forward = bool(cfg.get("lean_forward", False))
    if lean_forward:
        check_supported(torch.device(device), DTYPES[dtype_name], "hardware.lean_forward=true")
        if cuda_graphs or verify_width is not None or compile_forwards:
            raise SpecsweepError("hardware.lean_forward=true verifies over a growing cache; it cannot be combined "
                                 "with cuda_graphs, verify_width or compile (their static cache)")
        if cfg.attn_implementation != "row_invariant":
            raise SpecsweepError("hardware.lean_forward=true attends over masked cache slots, which keeps a row's "
                                 f"bits under attn_implementation=row_invariant only, not {cfg.attn_implementation}")
    row_block = cfg.get("row_block", 1)
    if row_block is None:
        row_block = 1
    if row_block != "auto" and (isinstance(row_block, bool) or not isinstance(row_block, int) or row_block < 1):
        raise SpecsweepError(f"hardware.row_block must be auto or a positive integer, got {row_block!r}")
    if row_block != 1 and not prepack:
        raise SpecsweepError("hardware.row_block pads the rows of prepacked products: it needs prepack_linear=true")
    max_verify = cfg.get("max_verify_tokens")
    if max_verify is not None and (isinstance(max_verify, bool) or not isinstance(max_verify, int) or max_verify < 1):
        raise SpecsweepError(f"hardware.max_verify_tokens must be a positive integer or null, got {max_verify!r}")
    probe = cfg.get("exactness_probe", False)
    if not isinstance(probe, bool):
        raise SpecsweepError(f"hardware.exactness_probe must be true or false, got {probe!r}")
    if probe and max_verify is None and verify_width is None:
        raise SpecsweepError("hardware.exactness_probe=true needs the largest verify it must prove: "
                             "set hardware.max_verify_tokens or hardware.verify_width")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    return Hardware(torch.device(device), DTYPES[dtype_name], cfg.attn_implementation, tree_mask == "bool",
                    max_verify, prepack, cuda_graphs, verify_width, compile_forwards, lean_forward, row_block, probe)
