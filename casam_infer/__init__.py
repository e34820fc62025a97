"""``casam-infer``: the command-line application on top of the edge runtime."""
