"""Build: setuptools drives CMake, which compiles the C++ core and the pybind11 module.

No -march=native: the per-ISA kernel folders get their own flags and the best variant is
picked at run time. Set PYQKERN_NATIVE=1 for a machine-specific developer build.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPYQKERN_NATIVE={'ON' if os.environ.get('PYQKERN_NATIVE') == '1' else 'OFF'}",
        ]
        try:
            import ninja

            # the ninja of this build's environment, named explicitly: pip builds in a temporary
            # environment, and a build tree left by an earlier `pip install .` of this checkout
            # caches the path of that one's ninja, long deleted (the README's test command after
            # its main job failed with "ninja: no such file or directory")
            exe = shutil.which("ninja", path=ninja.BIN_DIR) or shutil.which("ninja")
            args += ["-G", "Ninja"] + ([f"-DCMAKE_MAKE_PROGRAM={exe}"] if exe else [])
        except ImportError:
            pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


setup(ext_modules=[CMakeExtension("pyqkern._native")], cmdclass={"build_ext": CMakeBuild})
