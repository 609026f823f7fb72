"""Kubernetes NetworkPolicy: the model (model.py) and a pure compiler (compile.py).

Nothing here touches the kernel yet: the compiler's output is what a future
datapath will load into maps, and `compile.verdict` models what it will enforce.
"""
