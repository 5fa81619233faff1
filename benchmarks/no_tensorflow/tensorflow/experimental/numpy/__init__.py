from tensorflow import __getattr__  # noqa: F401  (the placeholder, see tensorflow/__init__.py)
