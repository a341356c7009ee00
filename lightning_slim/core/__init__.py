"""The contract between techniques and the machinery that runs it inside a fit: the base class, the
step and set-up order, the checks before training, the clock, logging, validation and the registry."""
