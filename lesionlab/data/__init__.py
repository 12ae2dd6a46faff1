"""Data: tables and ISIC CSV I/O, image decoding, validation, split, transforms, cache, torch Dataset, synthetic data.

Modules are imported one by one (`from lesionlab.data.split import make_split`): the CSV and split modules
need no torch, so `lesionlab evaluate` and `lesionlab ensemble` start without it.
"""
