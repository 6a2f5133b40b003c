"""Files outside the tables: model artifacts, the writer lock, lineage identities, fault points."""
