"""binllm on Ray: the commands that read a trained run (``pairs``, ``recommend``, ``nightly``) at
the top; the stage contract and what runs it in ``runtime``; one module per stage in ``stages``;
the Ray workers stages and commands share in ``ops``. See docs/ARCHITECTURE.md."""
