"""casam's torch-free edge runtime: numpy preprocessing, engines chained by the manifest.

The version of the whole casam distribution lives here because the runtime is the one
package every install has.
"""

__version__ = "0.1.0"
