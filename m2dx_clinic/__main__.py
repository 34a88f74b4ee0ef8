"""`python -m m2dx_clinic ...` is the same as `m2dx ...` (torchrun launches it this way)."""

from .cli import main

main()
