"""The ``universal-neurons`` console script (`cli.main.main`): the one package above both `app` and `precompute`."""
