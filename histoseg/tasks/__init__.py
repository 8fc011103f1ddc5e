"""Entry-point logic, one module per command: ``histoseg.tasks.train.train(cfg)``, ``evaluate``, ``predict``,
``superres``; ``utils`` holds what they share (error reporting, config checks).

Nothing is imported here, so ``histoseg.tasks.utils`` (the error reporting each entry point wraps itself in)
loads without torch and lightning, and ``python train.py --help`` / ``--cfg job`` answer in about a second."""
