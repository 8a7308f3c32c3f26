"""Training: the shared loop (loop.py), run set-up (setup.py) and one module per method."""
