"""Example apps, and the side-by-side demo: ``python -m examples.demo``."""
