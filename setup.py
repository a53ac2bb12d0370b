"""Everything is in pyproject.toml except one rule it cannot state: bench/test_*.py (pytest-benchmark cases, run
from a checkout by ``python -m pdfkernels.bench``) stay out of the wheel; package data excludes only non-code."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package != "pdfkernels.bench":
            return modules
        return [(pkg, mod, path) for pkg, mod, path in modules if not mod.startswith("test_")]


setup(cmdclass={"build_py": BuildPy})
