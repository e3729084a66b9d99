"""The agent's RPC surface: the ``FlareAgent`` gRPC service (:mod:`.agent_service`), who
may call what (:mod:`.auth`), the audit log of every call (:mod:`.audit`), and the server
that verifies the kit and serves it all over mutual TLS (:mod:`.server`)."""
