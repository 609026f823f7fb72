"""Maps the repository's top-level bpf/ into the package as meshbpf/_bpf.

The agent compiles bpf/*.c at start, so a wheel must carry them. They stay
at the top of the repository (the C tree is not Python); this mapping puts
them at meshbpf/_bpf in a built wheel, where datapath/source.py looks first.
Everything else about the package is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["meshbpf", "meshbpf.*"]) + ["meshbpf._bpf"],
    package_dir={"meshbpf._bpf": "bpf"},
    package_data={"meshbpf": ["examples/*.yaml"], "meshbpf._bpf": ["*.c", "lib/*.h"]},
)
