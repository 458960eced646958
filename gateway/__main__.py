from arqonbus_server.gateway.cli import main

raise SystemExit(main())
