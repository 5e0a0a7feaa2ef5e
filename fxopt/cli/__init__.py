"""The ``fxopt`` command (:mod:`fxopt.cli.main`) and the model specs it takes (:mod:`fxopt.cli.model_spec`)."""
