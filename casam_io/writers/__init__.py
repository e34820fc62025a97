"""Mask writers: PNG, NIfTI (the source's grid) and DICOM SEG (referencing the source).

Each takes what a reader returned (a ``Scan``) and labels, and knows nothing of engines or
runs; the applications decide which to call and where (casam_infer writes into the staging
folder of ``casam_core.ownership.OutputDir``).
"""
