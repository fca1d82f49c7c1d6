"""The application: the `atofx` command line, training jobs and recipes, datasets, CIFAR models, the model zoo, plots.

Imports every layer below it (`atofx.ato`, `atofx.core`, `atofx.passes`); nothing below imports it.
"""
