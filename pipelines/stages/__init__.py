"""One module per stage, each only its ``run(ctx)`` and private helpers; stages never import each
other (what they share is in :mod:`pipelines.ops`)."""
