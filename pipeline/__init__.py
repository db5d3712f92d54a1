"""scikit-learn estimators, model directories and the CLI on top of features."""

__all__: list[str] = []
