"""Check the CPU emulator of kernels.cu on arm64 Linux from an x86-64 Linux machine.

The workshop's route for notebook 4 on a Mac is a Linux container, which on Apple Silicon
is arm64 Linux: there the emulator (tests/cuda_emu.h) switches fibers with ucontext
instead of x86-64 assembly. This script builds the emulator exactly as tests/kernel_emu.py
does, but with g++'s aarch64 cross compiler, runs kernels under qemu-aarch64 through a
small C++ driver (ctypes cannot load an arm64 library into an x86-64 Python), and compares
with albor's NumPy code:
  * attention_forward (barriers, shuffles, shared memory tiles) and rmsnorm_forward (warps);
  * the notebook's experiment: without attention_forward's first __syncthreads, NaN
    (the emulator's garbage fill of shared memory) reaches the output.

    sudo apt install g++-aarch64-linux-gnu qemu-user     # Debian / Ubuntu
    python tests/emu_arm64_check.py

Not part of the pytest suite (it needs the cross tools); prints one line per check and
exits non-zero on a failure.
"""
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

import albor  # noqa: E402
import kernel_emu  # noqa: E402

CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]

# The driver: dlopen the library, fill the arguments from a spec file, launch, write the
# arrays back. Spec lines: "grid X Y Z", "block X Y Z", "array FILE COUNT" (float32 file,
# read and written back), "int N", "float F".
DRIVER = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <vector>
typedef int (*Launch)(const unsigned*, const unsigned*, unsigned long long, void**);
int main(int argc, char** argv) {
    void* lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    Launch launch = (Launch)dlsym(lib, (std::string("emu_launch_") + argv[2]).c_str());
    const char* (*last_error)() = (const char* (*)())dlsym(lib, "emu_last_error");
    FILE* spec = fopen(argv[3], "r");
    unsigned grid[3], block[3];
    std::vector<void*> args;
    std::vector<std::string> files;
    std::vector<float*> arrays;
    std::vector<long> counts;
    char kind[16];
    while (fscanf(spec, "%15s", kind) == 1) {
        if (!strcmp(kind, "grid")) fscanf(spec, "%u %u %u", &grid[0], &grid[1], &grid[2]);
        else if (!strcmp(kind, "block")) fscanf(spec, "%u %u %u", &block[0], &block[1], &block[2]);
        else if (!strcmp(kind, "int")) { int* v = new int; fscanf(spec, "%d", v); args.push_back(v); }
        else if (!strcmp(kind, "float")) { float* v = new float; fscanf(spec, "%f", v); args.push_back(v); }
        else if (!strcmp(kind, "array")) {
            char name[512]; long count;
            fscanf(spec, "%511s %ld", name, &count);
            float* data = (float*)malloc(count * sizeof(float));
            FILE* f = fopen(name, "rb"); fread(data, sizeof(float), count, f); fclose(f);
            float** slot = new float*(data);
            args.push_back(slot); files.push_back(name); arrays.push_back(data); counts.push_back(count);
        }
    }
    if (launch(grid, block, 0, args.data()) != 0) { fprintf(stderr, "launch: %s\n", last_error()); return 3; }
    for (size_t i = 0; i < files.size(); i++) {
        FILE* f = fopen(files[i].c_str(), "wb"); fwrite(arrays[i], sizeof(float), counts[i], f); fclose(f);
    }
    return 0;
}
"""


def build(folder, source, stem):
    """The emulator library of a CUDA source, for aarch64 (as kernel_emu.build, cross-compiled)."""
    cu = folder / f"{stem}.cu"
    cu.write_text(source)
    cpp = folder / f"{stem}.cpp"
    cpp.write_text(kernel_emu.generate_launchers(cu, kernel_emu.parse_kernels(source),
                                                 kernel_emu.extern_shared_arrays(source)))
    library = folder / f"{stem}.so"
    subprocess.run([CROSS_CXX, *kernel_emu.CXXFLAGS, "-Wno-comment", "-include", str(kernel_emu.HEADER),
                    "-o", str(library), str(cpp)], check=True)
    return library


def run(folder, driver, library, kernel, grid, block, args):
    """Launch kernel under qemu; args: NumPy float32 arrays (updated in place) or np.int32 /
    np.float32 scalars, in the kernel's order."""
    lines = ["grid " + " ".join(map(str, (tuple(grid) + (1, 1))[:3])),
             "block " + " ".join(map(str, (tuple(block) + (1, 1))[:3]))]
    files = []
    for i, arg in enumerate(args):
        if isinstance(arg, np.ndarray):
            path = folder / f"arg{i}.bin"
            arg.astype(np.float32).tofile(path)
            lines.append(f"array {path} {arg.size}")
            files.append((path, arg))
        elif isinstance(arg, np.int32):
            lines.append(f"int {int(arg)}")
        else:
            lines.append(f"float {float(arg)!r}")
    spec = folder / "spec.txt"
    spec.write_text("\n".join(lines) + "\n")
    subprocess.run(QEMU + [str(driver), str(library), kernel, str(spec)], check=True)
    for path, arg in files:
        arg[...] = np.fromfile(path, dtype=np.float32).reshape(arg.shape)


def error(got, want):
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def main():
    missing = [tool for tool in (CROSS_CXX, QEMU[0]) if shutil.which(tool) is None]
    if missing:
        sys.exit(f"needs {', '.join(missing)}: sudo apt install g++-aarch64-linux-gnu qemu-user")
    rng = np.random.default_rng(0)
    source = kernel_emu.KERNELS_CU.read_text()
    failures = 0
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        driver = folder / "driver"
        (folder / "driver.cpp").write_text(DRIVER)
        subprocess.run([CROSS_CXX, "-O1", "-o", str(driver), str(folder / "driver.cpp"), "-ldl"], check=True)
        library = build(folder, source, "kernels")
        print(f"built kernels.cu for aarch64: {subprocess.run(['file', '-b', str(library)], capture_output=True, text=True).stdout.split(',')[0]}")

        B, H, KVH, T, D = 2, 4, 2, 100, 16
        q, k, v = (rng.standard_normal(shape).astype(np.float32)
                   for shape in ((B, H, T, D), (B, KVH, T, D), (B, KVH, T, D)))
        want_out, want_lse = albor.attention_forward(q.astype(np.float64), k.astype(np.float64),
                                                     v.astype(np.float64))
        sizes = tuple(np.int32(n) for n in (H, KVH, T, D))
        out, lse = np.zeros_like(q), np.zeros((B, H, T), np.float32)
        run(folder, driver, library, "attention_forward", (math.ceil(T / 64), B * H), (256,),
            (q, k, v, out, lse) + sizes)
        for label, got, want in (("attention_forward out", out, want_out),
                                 ("attention_forward lse", lse, want_lse)):
            ok = error(got, want) < 1e-5
            failures += not ok
            print(f"{label:28} max error {error(got, want):.1e}  {'✓' if ok else '✗'}")

        rows, C = 50, 64
        x, weight = rng.standard_normal((rows, C)).astype(np.float32), rng.standard_normal(C).astype(np.float32)
        out_x, rstd = np.zeros_like(x), np.zeros(rows, np.float32)
        run(folder, driver, library, "rmsnorm_forward", (math.ceil(rows / 8),), (256,),
            (x, weight, out_x, rstd, np.int32(rows), np.int32(C), np.float32(1e-5)))
        want_x, _ = albor.rmsnorm_forward(x.astype(np.float64), weight.astype(np.float64), 1e-5)
        ok = error(out_x, want_x) < 1e-5
        failures += not ok
        print(f"{'rmsnorm_forward out':28} max error {error(out_x, want_x):.1e}  {'✓' if ok else '✗'}")

        start = source.index("attention_forward(const float*")
        barrier = source.index("__syncthreads();", start)
        broken = build(folder, source[:barrier] + source[barrier + len("__syncthreads();"):], "broken")
        bad_out, bad_lse = np.zeros_like(q), np.zeros((B, H, T), np.float32)
        run(folder, driver, broken, "attention_forward", (math.ceil(T / 64), B * H), (256,),
            (q, k, v, bad_out, bad_lse) + sizes)
        nan = int(np.isnan(bad_out).sum())
        failures += nan == 0
        print(f"{'barrier removed':28} {nan} of {bad_out.size} outputs NaN  {'✓' if nan else '✗ (expected NaN)'}")
    if failures:
        sys.exit(f"{failures} check(s) failed")
    print("the emulator runs kernels.cu on arm64 Linux")


if __name__ == "__main__":
    main()
