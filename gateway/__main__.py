from arqonbus_server.gateway.admin.cli import main

raise SystemExit(main())
