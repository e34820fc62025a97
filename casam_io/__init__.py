"""Medical and picture I/O: the ``Scan`` type, the file readers, and intensity handling.

Torch-free and engine-free: the trainer, the exporter and the runtime all read images
through it, so a file means the same pixels at every stage.
"""
