"""Run kernels.cu on the CPU: build it with g++ against tests/cuda_emu.h, launch through ctypes.

The call shape is CuPy's, so code written against one runs on the other:

    module = cupy.RawModule(code=open("kernels.cu").read())   # on a GPU
    module = EmuModule("kernels.cu")                          # on a CPU, this file
    module.get_function("swiglu_forward")((blocks,), (256,), (gate, up, out, np.int32(n)))

How a build works (EmuModule.__init__):
  1. parse every `extern "C" __global__ void name(params)` of the source: the signatures are
     what each launch's arguments are checked against;
  2. write tests/build/<name>_<hash>.cpp: `#include` of the UNMODIFIED source, a definition for
     each `extern __shared__` array, and per kernel a launcher `emu_launch_<name>(grid, block,
     shared_mem, void** args)` that unpacks args the way cuLaunchKernel does (args[i] points at
     parameter i) and runs the kernel through emu::launch;
  3. g++ -include tests/cuda_emu.h ... -shared -> tests/build/<name>_<hash>.so (cached by hash).

What a launch checks, as a GPU would (or should):
  * scalar arguments must be NumPy scalars of the parameter's C type: np.int32 for `int`,
    np.float32 for `float`. (CuPy passes a Python int as a 64-bit integer and a Python float as
    a double; a kernel taking `float` then reads garbage. Here that is a TypeError.)
  * pointer arguments must be C-contiguous NumPy arrays of the pointee's type, writeable unless
    the pointer is const;
  * the block has at most the kernel's __launch_bounds__ threads;
  * the kernel wrote nothing outside its arrays: each array is copied into a buffer with
    0xFF-filled margins (NaN for floats: an out-of-bounds read shows up as NaN), the margins are
    checked after the launch and the array part is copied back.
"""
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
HEADER = TESTS / "cuda_emu.h"
BUILD = TESTS / "build"
KERNELS_CU = ROOT / "kernels.cu"

# -fno-ipa-reference(-addressable): otherwise g++ proves a __shared__ array that is never
# written (or never read) in C++ terms and folds its reads to 0, hiding the garbage fill.
CXXFLAGS = ["-std=gnu++17", "-O2", "-fPIC", "-shared", "-fno-extern-tls-init",
            "-fno-ipa-reference", "-fno-ipa-reference-addressable", "-Wall",
            "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable"]
MARGIN_BYTES = 1024  # checked margin on each side of every array argument
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

# C type of a parameter (after removing const, __restrict__ and *) -> NumPy dtype
C_TYPES = {
    "float": np.float32, "double": np.float64,
    "int": np.int32, "unsigned int": np.uint32, "unsigned": np.uint32,
    "int32_t": np.int32, "uint32_t": np.uint32,
    "long long": np.int64, "long long int": np.int64, "int64_t": np.int64,
    "unsigned long long": np.uint64, "uint64_t": np.uint64, "size_t": np.uint64,
    "unsigned char": np.uint8, "uint8_t": np.uint8, "char": np.int8, "int8_t": np.int8,
}
CTYPES_SCALARS = {
    np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int32,
    np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64,
    np.uint8: ctypes.c_uint8, np.int8: ctypes.c_int8,
}


class EmuError(RuntimeError):
    """A launch the emulator refused or stopped: deadlock, bad warp operation, bad launch shape,
    an out-of-bounds write."""


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str        # as written, without __restrict__: "const float*", "int"
    base: str         # "float", "int", ...
    pointer: bool
    const: bool       # const pointee (the kernel only reads the array)

    @property
    def dtype(self):
        return np.dtype(C_TYPES[self.base])


@dataclass(frozen=True)
class Kernel:
    name: str
    params: tuple
    launch_bounds: str  # the __launch_bounds__ expression, "" if none


def strip_comments(source):
    """The source with // and /* */ comments blanked (newlines kept, so lines still count)."""
    def blank(match):
        return re.sub(r"[^\n]", " ", match.group(0))
    return re.sub(r"//[^\n]*|/\*.*?\*/", blank, source, flags=re.S)


_BOUNDS = r"__launch_bounds__\s*\((?P<{}>[^()]*(?:\([^()]*\)[^()]*)*)\)\s*"
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+(?:' + _BOUNDS.format("lb1") + r")?void\s+(?:"
                     + _BOUNDS.format("lb2") + r")?(?P<name>\w+)\s*\((?P<params>[^)]*)\)")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?"
                            r"(?P<type>[A-Za-z_][\w\s]*?)\s+(?P<name>\w+)\s*\[\s*\]")


def parse_param(text):
    """'const float* __restrict__ q' -> Param(name='q', ctype='const float*', base='float', ...)."""
    text = " ".join(text.replace("__restrict__", " ").split())
    match = re.fullmatch(r"(?P<type>.*?[\s*&])\s*(?P<name>[A-Za-z_]\w*)", text)
    if not match:
        raise ValueError(f"cannot parse kernel parameter {text!r}")
    ctype = " ".join(match.group("type").split()).replace(" *", "*")
    pointer = ctype.count("*")
    if pointer > 1 or "&" in ctype:
        raise ValueError(f"kernel parameter {text!r}: only T and T* parameters are supported")
    words = [w for w in ctype.replace("*", " ").split() if w != "const"]
    base = " ".join(words)
    if base not in C_TYPES:
        raise ValueError(f"kernel parameter {text!r}: type {base!r} is not one of {sorted(C_TYPES)}")
    const = bool(pointer) and "const" in ctype.split("*")[0].split()
    return Param(match.group("name"), ctype, base, bool(pointer), const)


def parse_kernels(source):
    """{name: Kernel} for every extern "C" __global__ function of a CUDA source."""
    kernels = {}
    for match in _KERNEL.finditer(strip_comments(source)):
        params_text = match.group("params").strip()
        params = () if params_text in ("", "void") else tuple(
            parse_param(p) for p in params_text.split(","))
        # __launch_bounds__(max threads per block[, min blocks per SM, ...]): keep the first
        bounds = (match.group("lb1") or match.group("lb2") or "").split(",")[0].strip()
        kernels[match.group("name")] = Kernel(match.group("name"), params, bounds)
    if not kernels:
        raise ValueError('no extern "C" __global__ kernels found')
    return kernels


def extern_shared_arrays(source):
    """{name: C type} of the `extern __shared__ T name[];` declarations (dynamic shared memory)."""
    arrays = {}
    for match in _EXTERN_SHARED.finditer(strip_comments(source)):
        ctype, name = " ".join(match.group("type").split()), match.group("name")
        if arrays.get(name, ctype) != ctype:
            raise ValueError(f"extern __shared__ {name} is declared as {arrays[name]} and {ctype}")
        arrays[name] = ctype
    return arrays


def generate_launchers(source_path, kernels, shared_arrays):
    """The C++ translation unit that includes the source and adds one launcher per kernel."""
    lines = ["// generated by tests/kernel_emu.py: the kernels plus a ctypes launcher for each",
             f'#include "{source_path}"', ""]
    for name, ctype in shared_arrays.items():
        lines.append(f"alignas(16) thread_local {ctype} {name}"
                     f"[EMU_DYNAMIC_SMEM_BYTES / sizeof({ctype})];  // extern __shared__")
    for kernel in kernels.values():
        unpacked = ", ".join(f"*({p.ctype}*)args[{i}]" for i, p in enumerate(kernel.params))
        lines += [
            "",
            f"static void emu_body_{kernel.name}(void* packed) {{",
            "    void** args = (void**)packed;",
            "    (void)args;",
            f"    {kernel.name}({unpacked});",
            "}",
            f'extern "C" int emu_launch_{kernel.name}(const unsigned int* grid, '
            "const unsigned int* block, unsigned long long shared_mem, void** args) {",
            "    return emu::launch(dim3(grid[0], grid[1], grid[2]), "
            "dim3(block[0], block[1], block[2]),",
            f"                       (size_t)shared_mem, emu_body_{kernel.name}, args);",
            "}",
            f'extern "C" int emu_launch_bounds_{kernel.name}() {{ '
            f"return {kernel.launch_bounds or 0}; }}",
        ]
    return "\n".join(lines) + "\n"


def build(source_path=KERNELS_CU, source=None, extra_flags=()):
    """Compile a CUDA source for the CPU. Returns (path of the .so, {name: Kernel}).

    source: the text to build instead of reading source_path (written next to the build, so the
    emulator's line numbers are this text's). Builds are cached in tests/build by content hash.
    """
    source_path = Path(source_path).resolve()
    if source is None:
        source = source_path.read_text()
    kernels = parse_kernels(source)
    shared_arrays = extern_shared_arrays(source)
    key = hashlib.sha256("\0".join([source, HEADER.read_text(), Path(__file__).read_text(),
                                    " ".join(CXXFLAGS + list(extra_flags))]).encode()).hexdigest()
    stem = f"{source_path.stem}_{key[:16]}"
    BUILD.mkdir(exist_ok=True)
    library = BUILD / f"{stem}.so"
    if library.exists():
        return library, kernels
    cu_copy = BUILD / f"{stem}.cu"
    cu_copy.write_text(source)
    cpp = BUILD / f"{stem}.cpp"
    cpp.write_text(generate_launchers(cu_copy, kernels, shared_arrays))
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=BUILD)
    os.close(fd)
    command = ["g++", *CXXFLAGS, *extra_flags, "-include", str(HEADER), "-o", tmp, str(cpp)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise EmuError(f"g++ failed to build {source_path.name} for the CPU:\n{result.stderr}")
    os.replace(tmp, library)  # atomic: concurrent builders of the same hash agree
    return library, kernels


def _dim3(what, value):
    if isinstance(value, (int, np.integer)):
        value = (value,)
    value = tuple(value)
    if not 1 <= len(value) <= 3 or not all(isinstance(v, (int, np.integer)) for v in value):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    return (tuple(int(v) for v in value) + (1, 1))[:3]


class EmuModule:
    """A CUDA source built for the CPU; get_function(name) as with cupy.RawModule."""

    def __init__(self, path=KERNELS_CU, code=None, schedule="forward", seed=0, extra_flags=()):
        self.path, self.kernels = build(path, code, extra_flags)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self.set_schedule(schedule, seed)

    def set_schedule(self, schedule, seed=0):
        """Order of the fibers in each scheduling round: "forward", "reverse" or "random"."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        self.lib.emu_set_schedule(SCHEDULES[schedule], ctypes.c_ulonglong(seed))

    def get_function(self, name):
        if name not in self.kernels:
            raise AttributeError(f"no kernel {name!r} in {self.path.name}; "
                                 f"kernels: {sorted(self.kernels)}")
        return EmuFunction(self, self.kernels[name])


class EmuFunction:
    """One kernel: call it as function(grid, block, args, shared_mem=0)."""

    def __init__(self, module, kernel):
        self.module = module
        self.kernel = kernel
        self._launch = getattr(module.lib, f"emu_launch_{kernel.name}")
        self._launch.restype = ctypes.c_int
        self.launch_bounds = getattr(module.lib, f"emu_launch_bounds_{kernel.name}")()

    def __call__(self, grid, block, args, shared_mem=0):
        kernel = self.kernel
        grid, block = _dim3("grid", grid), _dim3("block", block)
        threads = block[0] * block[1] * block[2]
        if self.launch_bounds and threads > self.launch_bounds:
            raise EmuError(f"{kernel.name}: block {block} has {threads} threads, more than its "
                           f"__launch_bounds__({self.launch_bounds}) (a GPU refuses the launch)")
        args = tuple(args)
        if len(args) != len(kernel.params):
            raise TypeError(f"{kernel.name} takes {len(kernel.params)} arguments "
                            f"({', '.join(p.name for p in kernel.params)}), got {len(args)}")
        keep = []          # ctypes objects that must live through the call
        padded = {}        # id(user array) -> (user array, padded copy, the array's part of it)
        copy_back = []     # (user array, view) for writeable pointers
        argv = (ctypes.c_void_p * max(1, len(args)))()
        for i, (param, arg) in enumerate(zip(kernel.params, args)):
            if param.pointer:
                view = self._array_argument(param, arg, i, padded)
                value = ctypes.c_void_p(view.ctypes.data)
                if not param.const and not any(view is v for _, v in copy_back):
                    copy_back.append((arg, view))
            else:
                value = self._scalar_argument(param, arg, i)
            keep.append(value)
            argv[i] = ctypes.cast(ctypes.pointer(value), ctypes.c_void_p)
        rc = self._launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                          ctypes.c_ulonglong(int(shared_mem)), argv)
        if rc != 0:
            raise EmuError(f"{kernel.name}: {self.module.lib.emu_last_error().decode()}")
        for i, param in enumerate(kernel.params):
            if not param.pointer:
                continue
            _, buffer, view = padded[id(args[i])]
            margin = MARGIN_BYTES // buffer.itemsize
            raw = buffer.view(np.uint8)
            if not (np.all(raw[:MARGIN_BYTES] == 0xFF) and np.all(raw[-MARGIN_BYTES:] == 0xFF)):
                raise EmuError(f"{kernel.name}: wrote outside array argument {i} "
                               f"'{param.name}' ({view.size} elements; margin {margin})")
        for arg, view in copy_back:
            np.copyto(arg, view.reshape(arg.shape))

    def _array_argument(self, param, arg, i, padded):
        where = f"{self.kernel.name} argument {i} '{param.name}' ({param.ctype})"
        if not isinstance(arg, np.ndarray):
            raise TypeError(f"{where}: expected a NumPy array, got {type(arg).__name__}")
        if arg.dtype != param.dtype:
            raise TypeError(f"{where}: expected dtype {param.dtype}, got {arg.dtype}")
        if not arg.flags.c_contiguous:
            raise TypeError(f"{where}: the array must be C-contiguous (the kernel indexes it "
                            "as a dense row-major block)")
        if not param.const and not arg.flags.writeable:
            raise TypeError(f"{where}: the kernel writes this array but it is read-only")
        for user, buffer, view in padded.values():
            if user is arg or (user.ctypes.data == arg.ctypes.data and user.nbytes == arg.nbytes):
                padded[id(arg)] = (arg, buffer, view)  # the same memory twice: one buffer
                return view
            if np.shares_memory(user, arg):
                raise TypeError(f"{where}: overlaps another array argument (the emulator "
                                "copies each array; partial overlaps are not supported)")
        margin = MARGIN_BYTES // arg.itemsize
        buffer = np.empty(arg.size + 2 * margin, dtype=arg.dtype)
        buffer.view(np.uint8)[:] = 0xFF
        view = buffer[margin:margin + arg.size]
        view[:] = arg.reshape(-1)
        padded[id(arg)] = (arg, buffer, view)
        return view

    def _scalar_argument(self, param, arg, i):
        where = f"{self.kernel.name} argument {i} '{param.name}' ({param.ctype})"
        wanted = param.dtype.type
        if type(arg) is not wanted:
            raise TypeError(
                f"{where}: pass np.{wanted.__name__}(...), got {type(arg).__name__} "
                "(CuPy passes a Python int as int64 and a float as double; the kernel would read "
                "garbage)")
        return CTYPES_SCALARS[wanted](arg)
