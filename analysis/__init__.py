"""Metrics, plots and reports computed from searches and evaluations."""
