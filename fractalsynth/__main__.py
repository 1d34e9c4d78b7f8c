"""``python -m fractalsynth`` (the same commands as the ``fractalsynth`` script)."""
from .cli import main

main()
