"""Sidecar capture: which pods are meshed, their settings, and a reference of the decision."""
