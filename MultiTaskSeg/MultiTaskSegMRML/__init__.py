"""MultiTaskSeg MRML adapter: Slicer scene nodes ↔ the core's images and results.

Takes the scene as an explicit argument and uses only slicer-core classes (no
``slicer.mrmlScene`` / ``slicer.app`` / ``slicer.modules``), so it runs inside Slicer and
under pytest with the ``slicer-core`` wheel. It imports the core; the core never imports it,
and it is not part of the pip package (it ships with the Slicer module only).
"""
