from radforge.cli import main

raise SystemExit(main())
