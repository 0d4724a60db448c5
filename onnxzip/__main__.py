from onnxzip.cli import main

raise SystemExit(main())
