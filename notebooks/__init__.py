"""The analysis notebooks (*.ipynb), installed with the package so `python -m data.notebooks` finds them anywhere."""
