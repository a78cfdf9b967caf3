"""The ``spark-ext`` commands: one module per verb (``spark-ext diagnose-credit`` is ``diagnose_credit``).

Each has ``main(argv) -> int`` and its own parser; what they share (argument types, the one-line-error
parser, run metadata) is in :mod:`spark_ext.commands._args`. No command imports another.
"""
