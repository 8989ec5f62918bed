"""Headless matplotlib for every figure the package draws: the tools run on servers and in tests, never on a display."""


def headless_pyplot():
    """`matplotlib.pyplot` on the Agg backend (imported on first use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
