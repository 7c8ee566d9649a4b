"""Synthetic white cells: one DCGAN per class, sampling, and quality checks that cannot flatter it.

``hematovision gan train|sample|report`` drive it from the command line; see ``docs/synthetic.md``.
"""
