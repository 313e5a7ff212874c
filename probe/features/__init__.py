"""Features: reading a dataset once through a frozen backbone into a sealed HDF5 cache.

Modules run one way, each importing only those before it: `cache` (the reader and the
format) -> `plan` -> `store` (the writer) -> `engines` -> `runtime` and the graph writer ->
`extract`, the entry point.
"""
