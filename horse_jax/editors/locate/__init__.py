"""ROME, MEMIT and AlphaEdit: locate-then-edit weight editors (settings, keys and targets, covariance
statistics, closed-form solves, the sequential editor)."""
