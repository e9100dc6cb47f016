"""Edge of the planning package: loaders and writers for profile, length and trace files.

Nothing in the pure core imports this package; callers at the edge (CLI, coordinator,
bench scripts) load files here and pass plain values into the core.
"""
