"""Datasets: data/prepare.py tokenizes and packs a corpus; data/shakespeare/prepare.py builds a small one."""
