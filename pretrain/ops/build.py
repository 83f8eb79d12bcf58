"""Building and loading the DCNv3 extensions from ``csrc/dcnv3``.

Two extensions, built just in time on first use and cached (or ahead of time with ``python -m pretrain.ops build``)
under ``<cache>/<name>/<fingerprint of the sources>``, from a copy of the sources in ``<cache>/src/<fingerprint>``:

* ``dcnv3_cpu_<isa>``: the fused CPU kernel, C++ only; ``<isa>`` is ``avx2`` when the CPU has AVX2+FMA, else
  ``generic``, so a cache shared by different nodes (a home directory on a cluster) never loads code built for
  another instruction set.
* ``dcnv3_cuda_<archs>``: the CUDA kernel for the architectures in ``DCNV3_CUDA_ARCH_LIST`` (default ``8.0;9.0``,
  i.e. A100 and H100); falls back to ``TORCH_CUDA_ARCH_LIST`` when that is set instead.

Environment: ``DCNV3_CSRC`` (the csrc/dcnv3 folder; default beside the package), ``DCNV3_BUILD_DIR`` (cache root,
default ``~/.cache/internimage_pretrain``), ``CUDA_HOME`` (defaults to ``/usr/local/cuda`` when it exists),
``DCNV3_VERBOSE_BUILD=1`` to see compiler output. A failed build is remembered with its reason; the operator then
falls back to the reference with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(os.environ.get("DCNV3_CSRC", Path(__file__).resolve().parents[2] / "csrc" / "dcnv3"))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


def cache_root() -> Path:
    root = os.environ.get("DCNV3_BUILD_DIR") or Path.home() / ".cache" / "internimage_pretrain"
    return Path(root) / f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"


@functools.cache  # the CPU does not change under a process; every DCNv3 call asks (through load_cpu)
def cpu_isa() -> str:
    """'avx2' when this CPU has AVX2, FMA and F16C (x86-64), else 'generic'."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "generic"
    return "avx2" if {"avx2", "fma", "f16c"} <= set(flags) else "generic"


def cuda_arch_list() -> str:
    return os.environ.get("DCNV3_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


def _cuda_include_paths() -> list[str]:
    # torch's CUDA headers include cusparse.h and friends, which ship with the nvidia-* wheels, not with torch.
    site = Path(sysconfig.get_paths()["purelib"])
    return [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]


def _headers(sources: list[Path]) -> list[Path]:
    """The headers a build may include, copied with its sources and fingerprinted: the C++ ``.h`` files, and for a
    CUDA build the ``.cuh`` ones too (so a CUDA-only change does not rebuild the CPU extension)."""
    cuda = any(s.suffix == ".cu" for s in sources)
    return sorted([*CSRC.glob("*.h"), *(CSRC.glob("*.cuh") if cuda else [])])


def cuda_sources() -> list[Path]:
    """The CUDA extension's translation units, which ninja compiles in parallel (``MAX_JOBS`` caps it): the bindings
    (``dcnv3_cuda.cpp``, host code only, so the host compiler takes it without nvcc's double pass over torch's
    headers) and the kernels instantiated once per input dtype (``dcnv3_cuda_f64.cu``, ``_f32``, ``_f16``,
    ``_bf16``)."""
    return [CSRC / "dcnv3_cuda.cpp", *sorted(CSRC.glob("dcnv3_cuda_*.cu"))]


def _content_copy(sources: list[Path], fingerprint: str) -> tuple[list[Path], Path]:
    """The sources and headers copied to ``<cache>/src/<fingerprint>``. torch keys its JIT builds on paths, so building
    from a content-addressed copy lets identical sources share one build wherever they live (a run's code snapshot,
    another checkout), while different sources never overwrite each other's build."""
    dest = cache_root() / "src" / fingerprint
    if not dest.is_dir():
        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for path in sorted(set(sources) | set(_headers(sources))):
            shutil.copyfile(path, tmp / path.name)
        try:
            tmp.rename(dest)
        except OSError:  # another process published the same content first
            shutil.rmtree(tmp, ignore_errors=True)
    return [dest / s.name for s in sources], dest


def _cflags(name: str, cuda: bool) -> list[str]:
    """Host compiler flags. The CPU kernel needs -fopenmp: torch's at::parallel_for is an inline OpenMP region that
    compiles to a serial loop without it. The extension then links libgomp.so.1, which resolves to the copy torch
    has already loaded, so torch.set_num_threads governs both."""
    if cuda:
        return ["-O3", "-fopenmp-simd"]
    return ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if name.endswith("_avx2") else [])


def _ldflags(cuda: bool) -> list[str]:
    return [] if cuda else ["-fopenmp"]


def _build(name: str, sources: list[Path], cuda: bool, fingerprint: str) -> ModuleType:
    from torch.utils import cpp_extension

    sources, src_dir = _content_copy(sources, fingerprint)
    build_dir = cache_root() / name / fingerprint
    build_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict = dict(
        name=name, sources=[str(s) for s in sources], extra_cflags=_cflags(name, cuda),
        extra_ldflags=_ldflags(cuda), extra_include_paths=[str(src_dir)],
        build_directory=str(build_dir), verbose=os.environ.get("DCNV3_VERBOSE_BUILD") == "1",
    )
    if cuda:
        if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda").is_dir():
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
            cpp_extension.CUDA_HOME = "/usr/local/cuda"
        kwargs["extra_cuda_cflags"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["extra_include_paths"] += _cuda_include_paths()
        # cpp_extension reads the architectures from the environment; set them for this build only, so that other
        # extensions built later in the process (DeepSpeed's ops) keep the user's choice.
        saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        try:
            return cpp_extension.load(**kwargs)
        finally:
            if saved is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    return cpp_extension.load(**kwargs)


def _fingerprint(name: str, sources: list[Path], cuda: bool) -> str:
    """What a build depends on: sources and headers, the extension's name (ISA / architectures), compiler flags and
    torch."""
    flags = _cflags(name, cuda) + _ldflags(cuda)
    digest = hashlib.sha256(f"{name}|{torch.__version__}|{sys.version_info[:2]}|{flags}".encode())
    for path in sorted(set(sources) | set(_headers(sources))):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _load(name: str, sources: list[Path], cuda: bool, force: bool = False) -> ModuleType | None:
    module = _loaded.get(name)  # the per-call path: no lock once loaded (a dict read is atomic)
    if module is not None:
        return module
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _failed and not force:
            return None
        missing = [str(s) for s in sources if not s.is_file()]
        if missing:
            _failed[name] = f"sources not found: {', '.join(missing)} (set DCNV3_CSRC to the csrc/dcnv3 folder)"
            return None
        # A failed build is remembered beside it, so that every later process (each rank, each test) does not spend
        # minutes failing again; changed sources (another fingerprint) or `python -m pretrain ops build` try again.
        fingerprint = _fingerprint(name, sources, cuda)
        marker = cache_root() / name / fingerprint / "BUILD_FAILED.json"
        if not force and marker.is_file():
            try:
                reason = json.loads(marker.read_text()).get("reason", "?")
            except (OSError, ValueError):
                reason = "?"
            _failed[name] = (f"an earlier build of these sources failed ({reason}); "
                             "`python -m pretrain ops build` tries again")
            return None
        try:
            module = _build(name, sources, cuda, fingerprint)
        except Exception as exc:  # noqa: BLE001 - any compiler/linker failure becomes a reported fallback
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            _failed[name] = f"{type(exc).__name__}: {' | '.join(lines[-6:])}"
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"reason": _failed[name]}))
            tmp.replace(marker)
            return None
        marker.unlink(missing_ok=True)
        _failed.pop(name, None)
        _loaded[name] = module
        return module


def cpu_extension_name() -> str:
    return f"dcnv3_cpu_{cpu_isa()}"


def cuda_extension_name() -> str:
    archs = "_".join(a.replace(".", "").replace("+PTX", "ptx") for a in cuda_arch_list().replace(",", ";").split(";"))
    return f"dcnv3_cuda_sm{archs}"


def load_cpu(force: bool = False) -> ModuleType | None:
    """The fused CPU extension, built on first call; None if it cannot be built (see :func:`failure`).
    ``force`` retries a build that failed before."""
    return _load(cpu_extension_name(), [CSRC / "dcnv3_cpu.cpp"], cuda=False, force=force)


def load_cuda(force: bool = False) -> ModuleType | None:
    """The CUDA extension, built on first call; None if it cannot be built (see :func:`failure`).
    ``force`` retries a build that failed before."""
    from torch.utils import cpp_extension

    name = cuda_extension_name()
    if name not in _loaded and name not in _failed:
        home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if Path("/usr/local/cuda").is_dir() else None)
        if home is None and cpp_extension.CUDA_HOME is None:
            _failed[name] = "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
            return None
    return _load(name, cuda_sources(), cuda=True, force=force)


def failure(kind: str) -> str | None:
    """Why the 'cpu' or 'cuda' extension is unavailable, or None if it loaded or was not tried."""
    name = cpu_extension_name() if kind == "cpu" else cuda_extension_name()
    return _failed.get(name)


