"""Data for the stages, from the data pipelines (filled in with data_pipelines)."""
