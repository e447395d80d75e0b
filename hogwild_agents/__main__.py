from hogwild_agents.cli import main

raise SystemExit(main())
