"""casam's torch-free edge runtime: numpy preprocessing, engines chained by the manifest.

It stands on ``casam_core`` (errors, files, names) and ``casam_io`` (readers, intensity);
the applications (``casam_infer``, ``casam_serve``) stand on it.
"""
