"""The torch.fx passes of atofx: tracing, shape propagation, channel dependency, ZIG inference, FLOPs, rewrite.

The lowest layer of atofx: it imports nothing of atofx but `atofx.errors`. Inside it, the engines
(`dependency`, `rewrite`, `shape_prop`) read the op table (`op_rules.OPS`, one entry per op), and the
table is written in the vocabulary (`rule_context`, `registry`), which imports neither.
"""
