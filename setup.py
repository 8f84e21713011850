import glob

from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    # walstate._speedups: the engine's put, get and batch encoding and
    # recovery's inner loop (csrc/speedups/), a plain CPython extension because
    # they build Python objects. Required, like walstate._walc: both are C
    # built with the same compiler, and walstate does not run without either.
    ext_modules=[Extension("walstate._speedups", sorted(glob.glob("csrc/speedups/*.c")),
                           include_dirs=["csrc", "csrc/speedups"],
                           depends=sorted(glob.glob("csrc/speedups/*.h")) + ["csrc/wal_format.h"],
                           extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra",
                                               "-fvisibility=hidden"],
                           optional=False)],
)
