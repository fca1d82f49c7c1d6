"""The library core: the finished analysis of a model (`Analysis`), masks, pruning, counting, saving, report.

Imports `atofx.passes` and `atofx.errors` only; knows nothing of training.
"""
