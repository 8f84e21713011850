from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    # recovery's inner loop (csrc/replay.c): a plain CPython extension, because it
    # builds Python objects; recovery falls back to Python without it
    ext_modules=[Extension("walstate._replay", ["csrc/replay.c"], include_dirs=["csrc"],
                           extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"])],
)
