"""meshbpf: eBPF socket-level load balancing and socket redirection for Kubernetes nodes."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml holds the one version; an install records it here.
    __version__ = version("meshbpf")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
