"""``python -m helpers.bench``: runs the benchmark (``runner.main``)."""
import sys

from .runner import main

sys.exit(main())
