"""tune-cells: hyperparameter search for microscopy cell-image models.

Kept free of heavy imports: `import tune_cells` must not pull in torch, Ray or MLflow.
"""

__version__ = "0.1.0"
