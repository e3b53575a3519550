"""Benchmarks that run miaotui and a peer on the same work in one command and print ratios."""
