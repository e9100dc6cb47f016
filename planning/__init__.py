"""Pure estimation and planning core of samullm.

Stdlib and numpy only: no I/O, no environment reads, no global random state. Loaders and
writers for files live in :mod:`planning.io`, which the core never imports.
"""
