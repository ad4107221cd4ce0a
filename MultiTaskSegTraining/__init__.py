"""Headless training, prediction and evaluation for MultiTaskSeg (the `mtseg` command).

Imports the core (MultiTaskSegLib) only — never the Slicer shell or the MRML adapter.
"""
