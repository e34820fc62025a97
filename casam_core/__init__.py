"""casam's torch-free foundation: errors, atomic files, names, fault points, metrics.

Every other casam package imports this one and it imports none of them, so the version of
the whole distribution lives here.
"""

__version__ = "0.1.0"
