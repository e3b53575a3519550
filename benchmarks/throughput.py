"""Offline throughput, miaotui vs transformers: see miaotui/bench/throughput.py (same as
`miaotui bench throughput`)."""

import sys

from miaotui.bench.throughput import main

if __name__ == "__main__":
    sys.exit(main())
