"""The CUDA kernel's per-row math, compiled for the CPU and checked against the PyTorch reference; the kernel and the
TensorRT plugin compiled with nvcc / against TensorRT headers where those exist (skipped with a reason otherwise)."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastardiff.recipes.entropy_attention import attended_key_count, entropy_attention_reference, visible_keys_mask

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "runtime" / "plugin"
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
NVCC = shutil.which("nvcc")


def cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, the directory above nvcc, or /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        candidates.append(str(Path(NVCC).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c)
    return None


CUDA_HOME = cuda_home()


def tensorrt_version(include_dir: Path) -> str:
    """major.minor.patch from NvInferVersion.h (TRT_*_ENTERPRISE since 10.x, NV_TENSORRT_* before)."""
    header = include_dir / "NvInferVersion.h"
    text = header.read_text(errors="replace") if header.exists() else ""
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"#define\s+(?:TRT_{part}_ENTERPRISE|NV_TENSORRT_{part})\s+(\d+)", text)
        parts.append(m.group(1) if m else "?")
    return ".".join(parts)


def tensorrt_include_dirs() -> list[Path]:
    """Every TensorRT header set found, oldest first: $FASTARDIFF_TRT_HEADERS (directories separated by ':', each
    an include/ dir, a TensorRT root, or a folder of several, e.g. one per release), $TENSORRT_ROOT/include, and
    headers extracted under third_party/ (git-ignored, never shipped). None in CI: the tests below skip there."""
    roots = [Path(p) for p in os.environ.get("FASTARDIFF_TRT_HEADERS", "").split(os.pathsep) if p]
    if os.environ.get("TENSORRT_ROOT"):
        roots.append(Path(os.environ["TENSORRT_ROOT"]))
    roots.append(ROOT / "third_party")
    found = set()
    for root in roots:
        for pattern in ("NvInferRuntime.h", "include/NvInferRuntime.h", "*/include/NvInferRuntime.h",
                        "*/*/include/NvInferRuntime.h"):
            found.update(p.parent.resolve() for p in root.glob(pattern))
    key = lambda p: tuple(int(x) if x.isdigit() else -1 for x in tensorrt_version(p).split("."))  # noqa: E731
    return sorted(found, key=lambda p: (key(p), str(p)))


def run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def math_driver(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++/clang++) on PATH")
    exe = tmp_path_factory.mktemp("math") / "plugin_math_driver"
    run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{PLUGIN}", ROOT / "tests" / "plugin_math_driver.cpp",
         "-o", exe])
    return exe


def drive(exe, q, k, v, lengths, scale, normalize, tile):
    B, H, K, Dh = q.shape
    T = k.shape[2]
    lines = [f"{B} {H} {K} {T} {Dh} {scale!r} {int(normalize)} {tile}", " ".join(str(int(x)) for x in lengths)]
    for t in (q, k, v):
        lines.append(" ".join(f"{x:.9g}" for x in t.reshape(-1).tolist()))
    proc = run([exe], input="\n".join(lines) + "\n")
    vals = torch.tensor([float(x) for x in proc.stdout.split()], dtype=torch.float64)
    n_out, n_ent = q.numel(), B * H * K
    out, ent, ent_m, out_m = torch.split(vals, [n_out, n_ent, n_ent, n_out])
    return out.view(q.shape), ent.view(B, H, K), ent_m.view(B, H, K), out_m.view(q.shape)


def float64_oracle(q, k, v, lengths, offset, scale, normalize):
    """The reference's semantics evaluated in float64 (the reference itself computes in fp32)."""
    mask = visible_keys_mask(lengths, q.shape[-2], k.shape[-2], offset)
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v.double()
    ent = -torch.where(probs > 0, probs * torch.log(probs), torch.zeros_like(probs)).sum(-1)
    if normalize:
        n = attended_key_count(lengths, q.shape[-2]).double()
        ent = torch.where(n > 1, ent / torch.log(n), torch.zeros_like(ent))
    return out, ent


CASES = [  # B, H, K, cache, Dh, normalize, tile, score spread
    (1, 1, 1, 0, 16, True, 32, 1.0),      # a single key: entropy 0
    (3, 2, 5, 13, 16, True, 32, 1.0),
    (3, 2, 17, 70, 64, True, 7, 1.0),     # tiles that straddle cache / new-token boundaries
    (2, 2, 5, 40, 16, False, 1, 1.0),     # one key per tile: every key rescales
    (3, 1, 5, 33, 16, True, 32, 12.0),    # large scores: exp would overflow without the running max
]


@pytest.mark.parametrize("B,H,K,S,Dh,normalize,tile,spread", CASES)
def test_row_math_matches_reference(math_driver, B, H, K, S, Dh, normalize, tile, spread):
    g = torch.Generator().manual_seed(B * 1000 + K * 10 + S)
    q = torch.randn(B, H, K, Dh, generator=g) * spread
    k = torch.randn(B, H, S + K, Dh, generator=g) * spread
    if spread > 1:  # scores that grow along the key axis, so the max changes in almost every tile
        k = k + torch.linspace(0, spread, S + K).view(1, 1, -1, 1) * q.mean(dim=2, keepdim=True).sign()
    v = torch.randn(B, H, S + K, Dh, generator=g)
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    lengths[0] = S
    scale = Dh**-0.5
    ref_out, ref_ent = float64_oracle(q, k, v, lengths, S, scale, normalize)
    out, ent, ent_merged, out_merged = drive(math_driver, q, k, v, lengths, scale, normalize, tile)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ent_merged, ref_ent, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_merged, ref_out, atol=1e-4, rtol=1e-4)
    # and the project's reference op (fp32) agrees with the float64 oracle where fp32 can (ordinary scores)
    if spread == 1:
        fp32_out, fp32_ent = entropy_attention_reference(q, k, v, lengths, S, scale, normalize)
        torch.testing.assert_close(ent, fp32_ent.double(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, fp32_out.double(), atol=1e-4, rtol=1e-4)
    if K == 1 and S == 0:
        assert ent.abs().max() == 0
    if spread > 1:  # the case really is extreme: raw exp(scores) overflows fp32
        scores = (q @ k.transpose(-1, -2)) * scale
        assert scores.max() > 88.8


def test_row_math_catches_a_wrong_mask(math_driver):
    """The comparison is sharp enough to see a one-key change of the mask (here: a shorter cache length)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 1, 3, 16, generator=g)
    k, v = torch.randn(1, 1, 23, 16, generator=g), torch.randn(1, 1, 23, 16, generator=g)
    lengths = torch.tensor([20])
    out, ent, _, _ = drive(math_driver, q, k, v, lengths, 0.25, True, 32)
    wrong_out, wrong_ent = entropy_attention_reference(q, k, v, torch.tensor([19]), 20, 0.25, True)
    assert (ent - wrong_ent.double()).abs().max() > 1e-3 or (out - wrong_out.double()).abs().max() > 1e-3


MASK_DRIVER = r"""
// Per (row b, query i): n_i, then the keys the kernel scores and marks visible for a block whose last row is i and
// for one whose last row is K - 1 (fa_clamp_length, fa_row_offset, fa_key_range, fa_key_visible, as the kernel).
#include <cstdio>
#include "entropy_attention_math.cuh"
using namespace fastardiff;
int main() {
    int K, T, in_buffer, B;
    if (std::scanf("%d %d %d %d", &K, &T, &in_buffer, &B) != 4) return 2;
    for (int b = 0; b < B; ++b) {
        long long raw;
        if (std::scanf("%lld", &raw) != 1) return 2;
        const int length = fa_clamp_length(raw, T, K);
        const int offset = fa_row_offset(length, T, K, in_buffer);
        for (int i = 0; i < K; ++i) {
            std::printf("%d", fa_attended_keys(i, length, offset));
            const int row_lasts[2] = {i, K - 1};
            for (int row_last : row_lasts) {
                int lo[2], hi[2];
                for (int r = 0; r < 2; ++r) fa_key_range(r, length, offset, row_last, &lo[r], &hi[r]);
                if (lo[0] < 0 || hi[0] > lo[1] || hi[1] > T) return 3;  // out of bounds, or a key visited twice
                std::printf(" ");
                for (int j = 0; j < T; ++j) {
                    bool scored = (lo[0] <= j && j < hi[0]) || (lo[1] <= j && j < hi[1]);
                    std::printf("%d", scored && fa_key_visible(j, i, length, offset) ? 1 : 0);
                }
            }
            std::printf("\n");
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def mask_driver(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++/clang++) on PATH")
    d = tmp_path_factory.mktemp("mask")
    (d / "mask_driver.cpp").write_text(MASK_DRIVER)
    run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{PLUGIN}", d / "mask_driver.cpp", "-o",
         d / "mask_driver"])
    return d / "mask_driver"


def kernel_masks(exe, K, T, in_buffer, lengths):
    """(n [B, K], visible [B, K, T]) as the kernel's shared helpers compute them; both row_last cases agree."""
    proc = run([exe], input=f"{K} {T} {in_buffer} {len(lengths)}\n{' '.join(map(str, lengths))}\n")
    rows = [line.split() for line in proc.stdout.splitlines()]
    n = torch.tensor([int(r[0]) for r in rows]).view(len(lengths), K)
    masks = [torch.tensor([[c == "1" for c in r[col]] for r in rows]).view(len(lengths), K, T) for col in (1, 2)]
    assert torch.equal(masks[0], masks[1]), "a row's visible keys depend on which block it is in"
    return n, masks[0]


@pytest.mark.parametrize("K,S", [(1, 0), (1, 9), (5, 0), (5, 12), (17, 40)])
def test_kernel_masks_match_reference(mask_driver, K, S):
    """The kernel's per-row key ranges and masking equal the reference's in both layouts: in_buffer = 0 keys are
    [cache (S), new tokens (K)], in_buffer = 1 keys are a buffer with the new tokens at each row's length (row b's
    query i sees j <= lengths[b] + i). Lengths out of [0, S] are clamped, as the kernel does."""
    T = S + K
    lengths = [0, S, S // 2, S + 3, -2, max(S - 1, 0)]
    clamped = torch.tensor(lengths).clamp(0, S)
    for in_buffer, offset in ((0, S), (1, None)):
        n, mask = kernel_masks(mask_driver, K, T, in_buffer, lengths)
        assert torch.equal(mask, visible_keys_mask(clamped, K, T, offset)[:, 0])
        assert torch.equal(n, attended_key_count(clamped, K)[:, 0].long())
        assert torch.equal(mask.sum(-1), n)
    if S > 0:  # the layouts really differ here, so a kernel applying one rule for both would fail above
        assert not torch.equal(kernel_masks(mask_driver, K, T, 0, lengths)[1],
                               kernel_masks(mask_driver, K, T, 1, lengths)[1])


def nvcc_kernel(out: Path, arch: str = "sm_80") -> Path:
    """The kernel compiled with nvcc, host code with -Wall -Wextra, every warning an error."""
    cc = arch.split("_")[1]
    run([NVCC, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-Wall,-Wextra", "-Werror", "all-warnings",
         f"-gencode=arch=compute_{cc},code={arch}", PLUGIN / "entropy_attention_kernel.cu", "-o", out])
    return out


@pytest.fixture(scope="module")
def kernel_object(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not on PATH: the CUDA kernel is compiled only where the CUDA toolkit is installed")
    return nvcc_kernel(tmp_path_factory.mktemp("kernel") / "kernel.o")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_compiles_with_nvcc(tmp_path, kernel_object, arch):
    obj = kernel_object if arch == "sm_80" else nvcc_kernel(tmp_path / "kernel.o", arch)
    symbols = run(["nm", obj]).stdout
    assert "fastardiff_entropy_attention_launch" in symbols
    # every dtype x head-dim instantiation is in the object (fp32/fp16/bf16 x 4 lane widths)
    assert symbols.count("entropy_attention_kernel") >= 12
    # launches are checked with cudaGetLastError (reads and clears the error), never only peeked at
    undefined = set(run(["nm", "-u", obj]).stdout.split())
    assert "cudaGetLastError" in undefined and "cudaPeekAtLastError" not in undefined


@pytest.mark.parametrize("include_dir", tensorrt_include_dirs() or [None],
                         ids=lambda p: f"trt-{tensorrt_version(p)}" if p else "none")
def test_plugin_against_tensorrt_headers(tmp_path, kernel_object, include_dir):
    """Compile the IPluginV3 against each TensorRT header set found (tensorrt_include_dirs: 10.16 and 11.x where
    they were extracted) with -Wall -Wextra -Werror and no warning suppressed; link it with the kernel (no
    libnvinfer needed) and run the host driver: creator, fields, shapes, formats, serialisation, clean enqueue
    failure without a GPU."""
    if include_dir is None:
        pytest.skip("no TensorRT headers: set FASTARDIFF_TRT_HEADERS (or TENSORRT_ROOT) to extracted NVIDIA/TensorRT "
                    "include/ dirs")
    if CXX is None:
        pytest.skip("no C++ compiler on PATH")
    cuda_inc = CUDA_HOME / "include"
    flags = ["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-fPIC", "-isystem", include_dir,
             "-isystem", cuda_inc, f"-I{PLUGIN}"]
    compiled = run([CXX, *flags, "-c", PLUGIN / "entropy_attention_plugin.cpp", "-o", tmp_path / "plugin.o"])
    assert "warning" not in compiled.stderr, compiled.stderr
    cudart = next((p for p in (CUDA_HOME / "lib64", CUDA_HOME / "lib") if (p / "libcudart_static.a").exists()), None)
    if cudart is None:
        pytest.skip("libcudart_static.a not found beside nvcc")
    exe = tmp_path / "plugin_host_driver"
    run([CXX, *flags, ROOT / "tests" / "plugin_host_driver.cpp", tmp_path / "plugin.o", kernel_object,
         f"-L{cudart}", "-lcudart_static", "-ldl", "-lpthread", "-lrt", "-o", exe])
    proc = subprocess.run([exe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failure(s)" in proc.stdout
    assert proc.stdout.count("ok   ") >= 30


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """runtime/plugin built by the top-level CMakeLists.txt (for this GPU's architecture when there is one)."""
    cmake = shutil.which("cmake")
    if cmake is None or NVCC is None:
        pytest.skip("cmake and nvcc are needed to build runtime/plugin")
    include_dirs = tensorrt_include_dirs()
    arch = "80"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
    args = [f"-DTENSORRT_ROOT={include_dirs[-1].parent}"] if include_dirs else []
    build = tmp_path_factory.mktemp("cmake") / "build"
    run([cmake, "-S", ROOT, "-B", build, f"-DCMAKE_CUDA_ARCHITECTURES={arch}", *args])
    targets = ["fastardiff_entropy_attention"] + (["fastardiff_trt_plugin"] if include_dirs else [])
    run([cmake, "--build", build, "-j2", "--target", *targets])
    return build, bool(include_dirs)


def kernel_library(build):
    lib = ctypes.CDLL(str(build / "libfastardiff_entropy_attention.so"))
    lib.fastardiff_entropy_attention_launch.restype = ctypes.c_int
    lib.fastardiff_entropy_attention_launch.argtypes = (
        [ctypes.c_int, ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
        + [ctypes.c_void_p] * 7)  # ..., scale, normalize, in_buffer, q, k, v, lengths, out, entropy, stream
    lib.fastardiff_status_string.restype = ctypes.c_char_p
    return lib


def test_cmake_builds_plugin_library(cmake_build):
    """The top-level CMakeLists.txt builds the bare kernel library (C ABI callable through dlopen) and, with
    TensorRT headers, the plugin library whose getCreators entry point returns the creator."""
    build, with_plugin = cmake_build
    # one CUDA runtime, the shared one: nothing links libcudart_static, and the libraries need libcudart.so
    link_lines = [p.read_text() for p in build.glob("CMakeFiles/*/link*")]
    assert link_lines and not any("cudart_static" in line for line in link_lines)
    needed = run(["readelf", "-d", build / "libfastardiff_entropy_attention.so"]).stdout
    assert "libcudart.so" in needed
    bare = run(["nm", "-D", "--defined-only", build / "libfastardiff_entropy_attention.so"]).stdout
    assert "fastardiff_entropy_attention_launch" in bare
    lib = kernel_library(build)
    launch = lib.fastardiff_entropy_attention_launch
    p = ctypes.c_void_p(16)  # never dereferenced: argument checks come first
    assert launch(7, 0, 1, 1, 1, 1, 16, 0.25, 1, 0, p, p, p, p, p, p, None) == 1       # unknown dtype
    assert launch(0, 0, 1, 1, 1, 1, 300, 0.25, 1, 0, p, p, p, p, p, p, None) == 1      # head dim > 256
    assert launch(0, 0, 1, 1, 5, 3, 16, 0.25, 1, 0, p, p, p, p, p, p, None) == 1       # fewer keys than queries
    assert launch(0, 0, 1, 1, 1, 1, 16, 0.25, 1, 2, p, p, p, p, p, p, None) == 1       # in_buffer not 0/1
    assert launch(0, 0, 0, 1, 1, 1, 16, 0.25, 1, -1, p, p, p, p, p, p, None) == 1      # checked before the no-op
    assert launch(0, 0, 0, 1, 1, 1, 16, 0.25, 1, 1, p, p, p, p, p, p, None) == 0       # empty batch: no-op
    assert b"bad argument" in lib.fastardiff_status_string(1)
    if not torch.cuda.is_available():  # a real launch without a GPU reports a CUDA error instead of crashing
        for in_buffer in (0, 1):
            assert launch(0, 1, 1, 1, 1, 1, 16, 0.25, 1, in_buffer, p, p, p, p, p, p, None) == 2
    if with_plugin:
        exported = run(["nm", "-D", "--defined-only", build / "libfastardiff_trt_plugin.so"]).stdout
        assert "getCreators" in exported and "setLoggerFinder" in exported
        plugin = ctypes.CDLL(str(build / "libfastardiff_trt_plugin.so"))
        plugin.getCreators.restype = ctypes.POINTER(ctypes.c_void_p)
        plugin.getCreators.argtypes = [ctypes.POINTER(ctypes.c_int32)]
        count = ctypes.c_int32(-1)
        creators = plugin.getCreators(ctypes.byref(count))
        assert count.value == 1 and creators[0]


@pytest.mark.gpu
@pytest.mark.parametrize("in_buffer", [0, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
def test_cuda_kernel_matches_reference(cmake_build, dtype, tol, in_buffer):
    """The CUDA kernel through its C ABI vs the reference at full shapes (K up to 256, cache up to 1024), in both
    key layouts (in_buffer: k/v are a buffer of S + K positions holding the new keys at each row's length)."""
    lib = kernel_library(cmake_build[0])
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, H, K, S, Dh in [(1, 4, 1, 0, 64), (3, 4, 5, 1024, 64), (3, 2, 17, 70, 16), (2, 2, 256, 1024, 128)]:
        q = torch.randn(B, H, K, Dh, device="cuda", generator=g).to(dtype)
        k = torch.randn(B, H, S + K, Dh, device="cuda", generator=g).to(dtype)
        v = torch.randn(B, H, S + K, Dh, device="cuda", generator=g).to(dtype)
        lengths = torch.randint(0, S + 1, (B,), device="cuda", generator=g)
        lengths[0] = S
        out, ent = torch.empty_like(q), q.new_empty(B, H, K)
        status = lib.fastardiff_entropy_attention_launch(
            codes[dtype], 1, B, H, K, S + K, Dh, Dh**-0.5, 1, in_buffer, q.data_ptr(), k.data_ptr(), v.data_ptr(),
            lengths.data_ptr(), out.data_ptr(), ent.data_ptr(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert status == 0, lib.fastardiff_status_string(status)
        offset = None if in_buffer else S
        ref_out, ref_ent = entropy_attention_reference(q.float(), k.float(), v.float(), lengths, offset, Dh**-0.5,
                                                       True)
        torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(ent.float(), ref_ent, atol=tol, rtol=tol)
