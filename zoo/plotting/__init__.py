"""Figures: ``plots`` (curves, densities, histograms on matplotlib's object interface, no global
backend) and ``views`` (the figures of each system's evaluations and generated data sets)."""
