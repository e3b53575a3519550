"""Hand-written CPU kernels, compiled on first use (kernels/cpu_build.py)."""
