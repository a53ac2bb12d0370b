"""The lean PDF trainer (``train/run.py``). Empty until the trainer issue lands."""
