from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    # the engine's put, get and batch encoding and recovery's inner loop
    # (csrc/speedups.c): a plain CPython extension, because they build Python
    # objects; walstate works without it
    ext_modules=[Extension("walstate._speedups", ["csrc/speedups.c"], include_dirs=["csrc"],
                           extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"])],
)
