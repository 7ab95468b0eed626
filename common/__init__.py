"""Leaf modules every layer may use (errors, progress bars, signals, full disks, atomic writes); they import nothing else of the project."""
