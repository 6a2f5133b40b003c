"""Source data: locating and reading files, their formats, the data protocol (samples, splits)."""
