"""The Auto-Train-Once algorithm over a core `Analysis`: config, trainer, epoch loop, controller, projection,
regulariser, checkpoints, precision, distributed; and `ATOModel`, the analysis that can train itself.

Imports `atofx.core`, `atofx.passes` and `atofx.errors` only.
"""
