"""``python -m fractalad`` (also what ``torchrun -m fractalad fit ...`` runs)."""
from .cli import main

main()
