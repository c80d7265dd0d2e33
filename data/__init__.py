"""Datasets. Commands: data/prepare.py tokenizes and packs a corpus; data/shakespeare/prepare.py builds a small one.
Libraries: data/tokenizer.py (text <-> ids), data/packed.py (the packed format, written and read), data/passkey.py
(the passkey task: prompt, keys, accuracy, training documents)."""
