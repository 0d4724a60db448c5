"""``python -m onnxzip`` (signals during start-up: ``_startup``; during the run: ``cli.main``)."""

from onnxzip.cli import main

raise SystemExit(main())
