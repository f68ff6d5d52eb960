"""Stateful parts of the trainer, each in its own module (torchtitan style)."""
