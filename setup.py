"""Build script: the Python package, plus the optional CUDA extension `mmkernels._C` (see csrc/).

The extension is built with nvcc and ninja whenever nvcc is found (on PATH, in $CUDA_HOME/bin or in
/usr/local/cuda/bin). It does not link against libtorch, and it links the CUDA runtime statically,
so it builds against a CPU-only torch and imports on a machine without a GPU driver.

Environment:
    MMKERNELS_SKIP_CUDA_BUILD=1   build the pure-Python package only.
    MMKERNELS_CUDA_ARCHS="80;90"  the SM architectures to compile for (PTX of the last is embedded too).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CUDA_SOURCES = ["csrc/region_mask.cu", "csrc/region_loss.cu"]
CXX_SOURCES = ["csrc/bindings.cpp"]
HEADERS = ["csrc/region.h", "csrc/region_common.cuh", "csrc/region_math.h"]


def find_nvcc() -> str | None:
    """nvcc's path, or None when it is absent or MMKERNELS_SKIP_CUDA_BUILD is set."""
    if os.environ.get("MMKERNELS_SKIP_CUDA_BUILD", "").lower() in ("1", "true", "yes", "on"):
        return None
    candidates = [shutil.which("nvcc")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def find_ninja() -> str:
    path = shutil.which("ninja")
    if path:
        return path
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        raise RuntimeError("building mmkernels._C needs ninja: pip install ninja") from None
    return os.path.join(ninja.BIN_DIR, "ninja")


def gencode_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("MMKERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    if not archs or not all(a.isdigit() for a in archs):
        raise RuntimeError(f"MMKERNELS_CUDA_ARCHS must list SM numbers such as '80;90', got {archs!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def cuda_library_dir(nvcc: str) -> str:
    """The folder of libcudart_static.a (nvcc may be a wrapper script outside the toolkit)."""
    homes = [Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        homes.insert(0, Path(cuda_home))
    for home in homes:
        for candidate in (home / "lib64", home / "targets" / "x86_64-linux" / "lib", home / "lib"):
            if (candidate / "libcudart_static.a").exists():
                return str(candidate)
    raise RuntimeError(f"libcudart_static.a not found under {', '.join(map(str, homes))}; set CUDA_HOME")


class CudaExtension(Extension):
    """mmkernels._C, compiled by NinjaCudaBuild rather than by setuptools' C compiler."""


class NinjaCudaBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        import pybind11

        nvcc = find_nvcc()
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "mmkernels_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        cxx = os.environ.get("CXX", "c++")
        includes = [f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {nvcc}",
            f"cxx = {cxx}",
            "nvcc_flags = -O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden "
            + " ".join(gencode_flags() + [f"-I{ROOT / 'csrc'}"]),
            "cxx_flags = -O3 -std=c++17 -fPIC -fvisibility=hidden " + " ".join(includes),
            f"ldflags = -shared -L{cuda_library_dir(nvcc)} -l:libcudart_static.a -lpthread -ldl -lrt",
            "rule nvcc",
            "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule cxx",
            "  command = $cxx $cxx_flags -MMD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
            "rule link",
            "  command = $cxx $in -o $out $ldflags",
            "  description = link $out",
        ]
        objects = []
        for rule, sources in (("nvcc", CUDA_SOURCES), ("cxx", CXX_SOURCES)):
            for source in sources:
                obj = build_dir / (Path(source).name + ".o")
                objects.append(str(obj))
                lines.append(f"build {obj}: {rule} {ROOT / source}")
        lines.append(f"build {output}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        print(f"building mmkernels._C with {nvcc} ({' '.join(gencode_flags())})", file=sys.stderr)
        subprocess.run([find_ninja(), "-C", str(build_dir)], check=True)


ext_modules = []
if find_nvcc() is not None:
    ext_modules.append(CudaExtension("mmkernels._C", sources=CUDA_SOURCES + CXX_SOURCES, depends=HEADERS))
else:
    print("mmkernels: nvcc not found (or MMKERNELS_SKIP_CUDA_BUILD=1); skipping the CUDA extension",
          file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass={"build_ext": NinjaCudaBuild})
