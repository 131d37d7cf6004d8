"""sftdist's Hydra config tree, importable so that installed copies find it (``pkg://sftdist.conf``)."""
