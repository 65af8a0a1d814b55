"""The search loop, its optimizers and soups."""

OPTIMIZERS = ("cma", "tpe", "optuna-cma", "nsga2", "random", "greedy-soup")
