"""Running one job across a dask (dask-cuda) cluster: partitions are the unit of work."""
