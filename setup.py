"""Puts bpf/ into built wheels as meshbpf/_bpf.

The agent compiles bpf/*.c at start, so a wheel must carry them. They stay
at the top of the repository (the C tree is not Python); this build step
copies them to meshbpf/_bpf in the built package, where
meshbpf/datapath/source.py looks first. An editable install reads bpf/ in
the checkout. Everything else about the package is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BPF = Path(__file__).resolve().parent / "bpf"


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        bundled = Path(self.build_lib) / "meshbpf" / "_bpf"
        for source in sorted([*BPF.glob("*.c"), *BPF.glob("lib/*.h")]):
            target = bundled / source.relative_to(BPF)
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildPyWithBpf})
