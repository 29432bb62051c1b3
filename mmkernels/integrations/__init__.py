"""Patches into other libraries. Nothing in mmkernels imports these; users import them by name."""
