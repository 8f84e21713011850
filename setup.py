import glob

from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    # the engine's put, get and batch encoding and recovery's inner loop
    # (csrc/speedups/): a plain CPython extension, because they build Python
    # objects; walstate works without it
    ext_modules=[Extension("walstate._speedups", sorted(glob.glob("csrc/speedups/*.c")),
                           include_dirs=["csrc", "csrc/speedups"],
                           depends=sorted(glob.glob("csrc/speedups/*.h")) + ["csrc/wal_format.h"],
                           extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra",
                                               "-fvisibility=hidden"])],
)
