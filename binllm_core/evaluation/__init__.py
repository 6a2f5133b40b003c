"""AUC/UAUC as the official evaluation computes them, and the evaluation report."""
