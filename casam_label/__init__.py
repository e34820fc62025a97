"""casam-label: interactive segmentation over HTTP (a native JSON API, MONAI Label's API, a viewer)."""
