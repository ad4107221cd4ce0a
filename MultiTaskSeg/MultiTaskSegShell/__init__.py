"""The Slicer module's Logic, parameters and dependency checks: the parts of the shell that need
the Slicer application (slicer.mrmlScene, slicer.app, qt) but no widgets."""
