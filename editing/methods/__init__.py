"""Editing methods: one sub-package per method, registered in ``editing.methods.registry``."""
