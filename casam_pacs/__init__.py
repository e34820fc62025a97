"""casam's DICOMweb client layer: a PACS as the place scans come from and segmentations go.

One concept per module, each usable on its own (casam-infer uses all of them; a datastore
that lists a server's studies and stores labels back reuses the same functions):

- ``errors``    PacsError and its kinds (authentication, not found), all CasamErrors: one line each;
- ``client``    the connection settings (URL, TLS, retries), the credentials from the environment
                only, and ``DicomWeb``: an opened client whose every call retries transient
                failures a bounded number of times and maps the rest to one-line errors;
- ``query``     QIDO-RS: a study's series, its image series (SEG, SR, PR … skipped), a series'
                instances, a server's studies;
- ``retrieve``  WADO-RS: one series into a folder, instance by instance, under a size cap;
- ``store``     STOW-RS: one request per SEG, its response checked.

It sits at layer 2 beside ``runtime`` and imports only casam_core and casam_io; the
``dicomweb-client`` package (the ``pacs`` extra) is imported through
``casam_core.optional.optional_import`` when a connection is opened, never at import time.
"""
