"""`python -m models.fetch NAME`: the short command the docs give for fetching a model into the local cache;
the code is models/load/fetch.py (the loading stage), which this runs."""

import sys

from models.load.fetch import main

if __name__ == "__main__":
    sys.exit(main())
