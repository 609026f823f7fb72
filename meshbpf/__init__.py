"""meshbpf: eBPF socket-level load balancing and socket redirection for Kubernetes nodes."""

__version__ = "0.2.0"
